"""Procedural objects: SDF signs, normals, renders consistent with depth; oracle guidance."""
import torch

from core.rendering.cameras import Cameras, orbit_cameras, reference_cameras
from core.guidance.base import RenderBatch
from core.oracle.guidance import OracleGuidance
from core.oracle.objects import BOUNDING_RADIUS, OBJECTS, make_object
from core.params import load_params


def test_sdf_signs_and_extent():
    inside = {"torus": [0.36, 0.0, 0.0], "blocks": [-0.12, -0.2, 0.0], "snowman": [0.0, -0.25, 0.0]}
    for name, obj in OBJECTS.items():
        assert obj.sdf(torch.tensor([inside[name]])).item() < 0, name
        assert obj.sdf(torch.tensor([[0.0, 0.0, 0.9]])).item() > 0, name
        pts = obj.sample_surface(500)
        assert pts.shape == (500, 3)
        assert obj.sdf(pts).abs().max() < 1e-3
        assert pts.norm(dim=-1).max() < BOUNDING_RADIUS
    assert OBJECTS["torus"].sdf(torch.zeros(1, 3)).item() > 0  # the hole: not convex


def test_normals_unit_and_renders_consistent_with_depth():
    cams = Cameras.make([70.0, 110.0], [30.0, -120.0], 1.8, 40.0)
    for name, obj in OBJECTS.items():
        r = obj.render(cams, 32, shading="lambertian")
        hit = r["opacity"][:, 0] > 0.5
        assert hit.float().mean() > 0.05, name
        n = r["normal"].permute(0, 2, 3, 1)[hit]
        assert torch.allclose(n.norm(dim=-1), torch.ones(n.shape[0]), atol=1e-4)
        # back-project: z-depth / (ray · camera axis) along the ray lands on the surface
        o, d = cams.rays(32)
        fwd = -cams.c2w()[:, :3, 2]
        cos = (d * fwd[:, None, None, :]).sum(-1)
        t = r["depth"][:, 0] / cos
        p = (o + d * t[..., None])[hit]
        assert obj.sdf(p).abs().max() < 2e-3, name
        assert (r["rgb"].permute(0, 2, 3, 1)[~hit] == 1).all()  # white background
        assert (r["depth"][:, 0][~hit] == 0).all()


def test_oracle_guidance_is_zero_when_render_matches():
    p = load_params("smoke")
    obj = make_object("snowman")
    g = OracleGuidance(obj, p)
    cams = orbit_cameras(2, 80.0)
    light = torch.nn.functional.normalize(cams.centers + torch.tensor([0.3, 0.5, 0.0]), dim=-1)
    t = obj.render(cams, 24, shading="lambertian", light_dir=light, ambient=p.coarse.shading.ambient,
                   diffuse=p.coarse.shading.diffuse)
    batch = RenderBatch(rgb=t["rgb"].clone().requires_grad_(True), opacity=t["opacity"].clone(), depth=t["depth"],
                        normal=t["normal"], cameras=cams, shading="lambertian", light_dir=light)
    out = g(batch)
    assert out.loss.item() == 0.0
    batch.rgb = (t["rgb"] * 0.5).requires_grad_(True)
    out = g(batch)
    assert out.loss.item() > 0 and out.diagnostics["oracle_rgb_mse"] > 0
    out.loss.backward()
    assert batch.rgb.grad.abs().sum() > 0
    ref = obj.render(reference_cameras(p.camera), 24)
    assert ref["opacity"].sum() > 0


def test_dense_and_compacted_sphere_tracing_agree():
    cams = orbit_cameras(3, 70.0)
    for name, obj in OBJECTS.items():
        a = obj.render(cams, 32, shading="lambertian", dense_march=False)
        b = obj.render(cams, 32, shading="lambertian", dense_march=True)
        assert (a["opacity"] != b["opacity"]).float().mean() < 0.003, name
        both = (a["opacity"] * b["opacity"]).bool().expand_as(a["rgb"])
        assert (a["rgb"][both] - b["rgb"][both]).abs().max() < 0.02, name
