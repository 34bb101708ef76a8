import math

import torch

from core.rendering.cameras import (Cameras, cartesian_to_spherical, orbit_cameras, reference_cameras, relative_pose,
                          sample_cameras, spherical_to_cartesian)
from core.params import load_params


def test_reference_view_is_the_front():
    cam = reference_cameras(load_params().camera)
    c = cam.centers[0]
    assert torch.allclose(c, torch.tensor([0.0, 0.0, 1.8]), atol=1e-6)
    c2w = cam.c2w()[0]
    # camera looks along its -z axis: towards the origin, i.e. world -z
    assert torch.allclose(-c2w[:3, 2], torch.tensor([0.0, 0.0, -1.0]), atol=1e-6)
    assert torch.allclose(c2w[:3, 1], torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)  # up is +y
    assert torch.allclose(c2w[:3, 0], torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)  # right is +x


def test_spherical_round_trip():
    g = torch.Generator().manual_seed(0)
    polar = 1 + 178 * torch.rand(200, generator=g)
    az = -179 + 358 * torch.rand(200, generator=g)
    r = 0.5 + 3 * torch.rand(200, generator=g)
    p2, a2, r2 = cartesian_to_spherical(spherical_to_cartesian(polar, az, r))
    assert torch.allclose(p2, polar, atol=1e-3) and torch.allclose(a2, az, atol=1e-3) and torch.allclose(r2, r, atol=1e-5)


def test_every_camera_looks_at_the_origin():
    cams = sample_cameras(load_params().camera, 64, torch.Generator().manual_seed(1))
    o, d = cams.rays(9, 9)
    centre_ray = d[:, 4, 4]  # the middle pixel of an odd-sized image
    to_origin = torch.nn.functional.normalize(-o[:, 4, 4], dim=-1)
    assert torch.allclose(centre_ray, to_origin, atol=1e-5)
    # the origin projects to the image centre
    uvz = cams.project(torch.zeros(len(cams), 1, 3), 9, 9)
    assert torch.allclose(uvz[..., :2], torch.full_like(uvz[..., :2], 4.5), atol=1e-4)
    assert torch.allclose(uvz[..., 2], cams.radius[:, None], atol=1e-5)


def test_sampled_cameras_stay_in_range():
    # without the released upper-hemisphere draws (uniform_sphere_rate; tests/test_fidelity_m123_views.py)
    p = load_params(overrides=["camera.uniform_sphere_rate=0"]).camera
    cams = sample_cameras(p, 500, torch.Generator().manual_seed(2))
    assert cams.polar.min() >= 45 and cams.polar.max() <= 135
    assert cams.azimuth.min() >= -180 and cams.azimuth.max() <= 180
    assert torch.allclose(cams.radius, torch.full((500,), 1.8))
    # with them (the base: 0.5) polar runs from the top (0°) to the range's bottom
    g = torch.Generator().manual_seed(2)
    camera = load_params().camera  # once: reading and validating params.yaml 500 times took ~35 s
    polar = torch.cat([sample_cameras(camera, 1, g).polar for _ in range(500)])
    assert polar.min() >= 0 and polar.max() <= 135 and (polar < 45).any()


def test_rays_and_projection_agree():
    cams = Cameras.make([70.0, 110.0], [30.0, -120.0], [1.8, 2.2], [40.0, 50.0])
    o, d = cams.rays(16, 16)
    pts = o[:, 3, 11] + 1.3 * d[:, 3, 11]
    uvz = cams.project(pts[:, None], 16, 16)[:, 0]
    assert torch.allclose(uvz[:, 0], torch.full((2,), 11.5), atol=1e-4)
    assert torch.allclose(uvz[:, 1], torch.full((2,), 3.5), atol=1e-4)
    # the fov: the top edge ray makes fovy/2 with the optical axis
    _, d_edge = cams.rays(2, 1)
    axis = -cams.c2w()[:, :3, 2]
    ang = torch.rad2deg(torch.acos((d_edge[:, 0, 0] * axis).sum(-1)))
    expect = torch.rad2deg(torch.atan(torch.tan(torch.deg2rad(cams.fovy) / 2) * 0.5))
    assert torch.allclose(ang, expect, atol=1e-3)


def test_mvp_maps_origin_to_centre_and_is_consistent_with_project():
    cams = orbit_cameras(8)
    pts = torch.tensor([[0.3, -0.2, 0.1]]).expand(8, 1, 3)
    clip = torch.einsum("bij,bnj->bni", cams.mvp(), torch.cat([pts, torch.ones(8, 1, 1)], -1))
    ndc = clip[..., :2] / clip[..., 3:]
    uv = cams.project(pts, 32, 32)[..., :2]
    assert torch.allclose((ndc[..., 0] + 1) * 16, uv[..., 0], atol=1e-3)
    assert torch.allclose((1 - ndc[..., 1]) * 16, uv[..., 1], atol=1e-3)


def test_relative_pose_wraps_azimuth():
    ref = Cameras.make(90.0, 170.0, 1.8, 40.0)
    tgt = Cameras.make(60.0, -170.0, 2.0, 40.0)
    dp, da, dr = relative_pose(ref, tgt)
    assert math.isclose(dp.item(), -30.0, abs_tol=1e-5) and math.isclose(da.item(), 20.0, abs_tol=1e-4)
    assert math.isclose(dr.item(), 0.2, abs_tol=1e-6)


def test_to_device_keeps_values_and_dtype_and_blocks_towards_the_host():
    """core.perf.to_device: the values and the asked dtype; a host→host move is the same
    tensor; only a host→GPU copy is non-blocking (a GPU→host one must block: it would land in pinned
    memory and could be read before it is written)."""
    from core.perf import to_device

    t = torch.tensor([1.5, -2.0, 3.25], dtype=torch.float64)
    assert to_device(t, "cpu") is t
    assert to_device(t, "cpu", torch.float32).dtype == torch.float32
    cams = Cameras.make([60.0, 90.0], [0.0, 45.0], 2.0, 40.0).to("cpu")
    assert torch.equal(cams.azimuth, torch.tensor([0.0, 45.0]))
    if torch.cuda.is_available():
        g = to_device(t, "cuda")
        back = to_device(g, "cpu")
        assert not back.is_pinned() and torch.equal(back, t)


def test_cameras_moved_off_the_host_compute_their_few_numbers_there(monkeypatch):
    """Cameras moved from the host to a device keep their host copy: centre, c2w, w2c, projection,
    mvp and focal length are computed on it and sent (here to the meta device, which stands for a
    GPU: it keeps shapes, not values), `to('cpu')` gives the copy back without a copy, and indexing
    by position keeps it."""
    from core.rendering import cameras as cam_mod

    host = Cameras.make([60.0, 120.0], [10.0, -170.0], 1.8, 40.0)
    moved = host.to("meta")
    assert moved.host is host and moved.to("cpu") is host and moved.for_small_math() is host
    seen = []
    real = cam_mod.look_at
    monkeypatch.setattr(cam_mod, "look_at", lambda eye, target=None: seen.append(eye.device.type) or real(eye, target))
    for out, shape in ((moved.centers, (2, 3)), (moved.c2w(), (2, 4, 4)), (moved.w2c(), (2, 4, 4)),
                       (moved.projection(), (2, 4, 4)), (moved.mvp(), (2, 4, 4)), (moved.focal(64), (2,))):
        assert out.device.type == "meta" and tuple(out.shape) == shape
    assert seen and set(seen) == {"cpu"}  # look_at ran on the host copy every time
    one = moved[1]
    assert one.host is not None and torch.equal(one.host.azimuth, host.azimuth[1:])
    assert moved[torch.tensor([1], device="meta")].host is None  # a device index: no host copy to take from
    # on the host itself nothing changes: the same numbers as computing them directly
    torch.testing.assert_close(host.mvp(), host.projection() @ torch.linalg.inv(cam_mod.look_at(host.centers)), rtol=0, atol=0)
