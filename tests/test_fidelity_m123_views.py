"""The released code's view handling (docs/fidelity.md items 2, 3, 4, 12), against numbers worked
out by hand from its definitions:

2. view-dependent prompts: "<prompt>, front/side/back view" mixed linearly in |Δazimuth|
   (guochengqian/Magic123 nerf/utils.py:709-732; lyk412/Consistent123 nerf/utils.py:850-879);
3. the Zero-1-to-3 SDS gradient × γ/180°, γ the angle to the reference camera
   (Magic123 guidance/zero123_utils.py:129-137, :197);
4. novel-view cameras: with probability uniform_sphere_rate (0.5) a normalised half-cube draw on the
   upper hemisphere (Magic123 nerf/provider.py:86-107), and Consistent123's progressive view ranges
   (nerf/utils.py:693-703);
12. the consistent123 preset as its released scripts and main.py run it.
"""
from __future__ import annotations

import math

import pytest
import torch

from core.guidance.base import RenderBatch
from core.guidance.sd import StableDiffusionGuidance, encode_prompts, load_stable_diffusion, view_prompt_weights
from core.guidance.zero123 import Zero123Guidance, angle_to_reference, angle_weight, load_zero123
from core.params import load_params
from core.rendering.cameras import (Cameras, cartesian_to_spherical, sample_cameras, upper_hemisphere_directions,
                                    view_ranges)
from _tiny_priors import tiny_models


# ------------------------------------------------------------------------ item 2: view-dependent prompts
@pytest.mark.parametrize("azimuth, expected", [
    (0.0, (1.0, 0.0, 0.0)),          # front
    (60.0, (1 / 3, 2 / 3, 0.0)),     # r = 1 − 60/90 = ⅓ of front, ⅔ of side
    (-60.0, (1 / 3, 2 / 3, 0.0)),    # r = 1 + (−60)/90: the same
    (90.0, (0.0, 1.0, 0.0)),         # side
    (-90.0, (0.0, 1.0, 0.0)),        # the released first branch (Δ ≥ −90): r = 0 → side
    (120.0, (0.0, 2 / 3, 1 / 3)),    # r = 1 − (120 − 90)/90 = ⅔ of side, ⅓ of back
    (180.0, (0.0, 0.0, 1.0)),        # back
    (-180.0, (0.0, 0.0, 1.0)),
    (150.0, (0.0, 1 / 3, 2 / 3)),
])
def test_view_prompt_weights_by_hand(azimuth, expected):
    w = view_prompt_weights(torch.tensor([azimuth]))[0]
    torch.testing.assert_close(w, torch.tensor(expected), atol=1e-6, rtol=0)


def test_view_prompt_weights_are_relative_to_the_reference_azimuth():
    w = view_prompt_weights(torch.tensor([90.0, -150.0, 30.0]), reference_azimuth=30.0)  # Δ = 60, 180, 0
    torch.testing.assert_close(w, torch.tensor([[1 / 3, 2 / 3, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]),
                               atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def sd_parts():
    return load_stable_diffusion(tiny_models()["sd"], "cpu", torch.float32)


def _sd(parts, prompt, view_dependent):
    return StableDiffusionGuidance(parts, prompt, guidance_scale=100.0, resolution=64, seed=3,
                                   view_dependent=view_dependent)


def test_view_prompts_are_the_released_texts_encoded_once(sd_parts):
    g = _sd(sd_parts, "a photo of a chair", True)
    texts = ["a photo of a chair, front view", "a photo of a chair, side view", "a photo of a chair, back view"]
    torch.testing.assert_close(g.view_embeddings, encode_prompts(sd_parts, texts).float())
    torch.testing.assert_close(g.text_embeddings, encode_prompts(sd_parts, ["a photo of a chair"]))
    # a camera at Δazimuth 60° is guided by ⅓ front + ⅔ side; at 0° and 180° by one prompt alone
    cams = Cameras.make(90.0, [60.0, 0.0, 180.0], 1.8, 40.0)
    emb = g.text_embeddings_for(cams)
    e = g.view_embeddings
    torch.testing.assert_close(emb[0], e[0] / 3 + 2 * e[1] / 3, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb[1], e[0])
    torch.testing.assert_close(emb[2], e[2])


@pytest.mark.parametrize("azimuth, suffix", [(0.0, ", front view"), (90.0, ", side view"), (180.0, ", back view")])
def test_view_dependent_sds_is_the_sds_of_that_views_prompt(sd_parts, azimuth, suffix):
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(1, 4, 8, 8, generator=gen)
    noise = torch.randn(1, 4, 8, 8, generator=gen)
    t = torch.tensor([400])
    z1 = z.clone().requires_grad_(True)
    _sd(sd_parts, "a photo of a chair", True).sds(z1, t=t, noise=noise,
                                                  cameras=Cameras.make(90.0, azimuth, 1.8, 40.0))[0].backward()
    z2 = z.clone().requires_grad_(True)
    _sd(sd_parts, "a photo of a chair" + suffix, False).sds(z2, t=t, noise=noise)[0].backward()
    torch.testing.assert_close(z1.grad, z2.grad, atol=1e-5, rtol=1e-5)
    assert z1.grad.abs().max() > 0


def test_view_dependent_prompt_defaults_and_factory():
    assert load_params().sd.view_dependent_prompt and load_params("consistent123").sd.view_dependent_prompt
    from core.guidance.factory import build_guidance
    import os
    from pathlib import Path

    os.environ.setdefault("LIFT3D_TINY_DIR", str(Path(tiny_models()["sd"]).parent))
    over = {"models.tiny": True, "device": "cpu", "sd.resolution": 64, "zero123.resolution": 64,
            "prompt.text": "a chair"}
    g = build_guidance(load_params("magic123", over), torch.rand(3, 64, 64), "coarse", "cpu")
    assert g.sd.view_dependent and g.sd.view_embeddings.shape[0] == 3
    assert g.zero123.angle_weighting and g.sd.t_range == (0.2, 0.6) and g.zero123.t_range == (0.2, 0.6)
    off = build_guidance(load_params("magic123", {**over, "sd.view_dependent_prompt": False,
                                                  "zero123.angle_weighting": False}), torch.rand(3, 64, 64),
                         "coarse", "cpu")
    assert not off.sd.view_dependent and off.sd.view_embeddings is None and not off.zero123.angle_weighting
    # item 12 / released fine stage: t ∈ [0.02, 0.5] (Magic123 main.py:413), [0.2, 0.5] (Consistent123 main.py:352)
    fine = build_guidance(load_params("magic123", over), torch.rand(3, 64, 64), "fine", "cpu")
    assert fine.sd.t_range == (0.02, 0.5) and fine.zero123.t_range == (0.02, 0.5)
    c_fine = build_guidance(load_params("consistent123", over), torch.rand(3, 64, 64), "fine", "cpu")
    assert c_fine.sd.t_range == (0.2, 0.5) and c_fine.zero123.t_range == (0.2, 0.5)
    same = build_guidance(load_params("magic123", {**over, "sd.fine_t_range": None}), torch.rand(3, 64, 64),
                          "fine", "cpu")
    assert same.sd.t_range == (0.2, 0.6)


# ------------------------------------------------------------------------ item 3: Zero-1-to-3 angle weight
REF = Cameras.make(90.0, 0.0, 1.8, 40.0)


@pytest.mark.parametrize("polar, azimuth, radius, gamma", [
    (90.0, 0.0, 1.8, 0.0),       # the reference view itself: no 3D-prior gradient
    (90.0, 60.0, 1.8, 60.0),
    (45.0, 0.0, 1.8, 45.0),
    (90.0, 180.0, 1.8, 180.0),   # the back: the full λ_3D
    (30.0, 90.0, 1.8, 90.0),     # cos γ = sin30·sin90·cos90 + cos30·cos90 = 0
    (60.0, 120.0, 1.8, math.degrees(math.acos(math.sin(math.radians(60)) * math.cos(math.radians(120))))),  # 115.66°
    (90.0, 60.0, 3.0, 60.0),     # the radius plays no part
    (135.0, -90.0, 1.8, 90.0),   # cos γ = sin135·cos(−90) = 0
])
def test_angle_weight_by_hand(polar, azimuth, radius, gamma):
    tgt = Cameras.make(polar, azimuth, radius, 40.0)
    assert angle_to_reference(REF, tgt).item() == pytest.approx(gamma, abs=1e-3)
    assert angle_weight(REF, tgt).item() == pytest.approx(gamma / 180.0, abs=1e-5)
    # with Magic123's λ_3D = 40 the view's weight is 40·γ/180 (13.33 at 60°, 40 at the back)
    assert 40 * angle_weight(REF, tgt).item() == pytest.approx(40 * gamma / 180, abs=1e-3)


@pytest.fixture(scope="module")
def z123_parts():
    return load_zero123(tiny_models()["zero123"], "cpu", torch.float32)


def _z123(parts, weighting):
    ref = torch.rand(3, 80, 80, generator=torch.Generator().manual_seed(0))
    return Zero123Guidance(parts, ref, REF, guidance_scale=5.0, resolution=64, seed=3, angle_weighting=weighting)


def test_angle_weighted_gradient_is_k_times_the_plain_one(z123_parts):
    cams = Cameras.make([90.0, 60.0, 45.0], [60.0, 120.0, 0.0], 1.8, 40.0)
    k = torch.tensor([60.0, 115.6589, 45.0]) / 180.0
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(3, 4, 8, 8, generator=gen)
    noise = torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([300, 420, 550])
    z_on, z_off = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    loss, diag = _z123(z123_parts, True).sds(z_on, cams, t=t, noise=noise)
    loss.backward()
    _z123(z123_parts, False).sds(z_off, cams, t=t, noise=noise)[0].backward()
    torch.testing.assert_close(z_on.grad, k.reshape(-1, 1, 1, 1) * z_off.grad, atol=1e-5, rtol=1e-4)
    assert diag["angle_weight"] == pytest.approx(float(k.mean()), abs=1e-4)
    # drawn t and ε: the weighted prior draws them from the same stream, in the same order
    z_on, z_off = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    _z123(z123_parts, True).sds(z_on, cams)[0].backward()
    _z123(z123_parts, False).sds(z_off, cams)[0].backward()
    torch.testing.assert_close(z_on.grad, k.reshape(-1, 1, 1, 1) * z_off.grad, atol=1e-5, rtol=1e-4)


def test_angle_weighted_prior_zero_at_the_reference_view(z123_parts):
    rgb = torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    batch = RenderBatch(rgb=rgb, opacity=torch.ones(1, 1, 40, 40), depth=torch.zeros(1, 1, 40, 40), normal=None,
                        cameras=REF, shading="albedo", light_dir=None)
    _z123(z123_parts, True)(batch).loss.backward()
    assert rgb.grad.abs().max() == 0


# ------------------------------------------------------------------------ item 4: novel-view cameras
def _camera(preset="magic123", **over):
    p = load_params(preset).camera
    return p.model_copy(update=over)


def test_cube_draw_polar_bands_by_hand():
    """A point uniform in the half-cube [−1,1]×[0,1]×[−1,1] (volume 4) lies within γ of +y when it
    is in the cone ρ ≤ y·tan γ, 0 ≤ y ≤ 1 (inside the cube for γ ≤ 45°): volume π·tan²γ/3. So
    P(θ ≤ 45°) = π/12 = 0.2618 and P(θ ≤ 30°) = π/36 = 0.0873 (uniform on the hemisphere:
    1 − cos γ = 0.2929 and 0.1340)."""
    d = upper_hemisphere_directions(20000, "cube", torch.Generator().manual_seed(0))
    polar = cartesian_to_spherical(d)[0]
    assert polar.min() >= 0 and polar.max() <= 90.0 + 1e-4
    assert (polar <= 45).float().mean().item() == pytest.approx(math.pi / 12, abs=0.01)
    assert (polar <= 30).float().mean().item() == pytest.approx(math.pi / 36, abs=0.008)
    # the azimuth is symmetric about the front
    az = cartesian_to_spherical(d)[1]
    assert (az.abs() <= 90).float().mean().item() == pytest.approx(0.5, abs=0.015)


def test_gaussian_draw_is_uniform_on_the_hemisphere():
    d = upper_hemisphere_directions(20000, "gaussian", torch.Generator().manual_seed(0))
    polar = cartesian_to_spherical(d)[0]
    assert (polar <= 45).float().mean().item() == pytest.approx(1 - math.cos(math.radians(45)), abs=0.01)
    assert (polar <= 60).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_released_magic123_sampler_mixes_half_sphere_draws():
    """Magic123's base: rate 0.5, polar otherwise U[45°, 135°]. Over 20k one-camera draws:
    P(θ < 45°) = 0.5·π/12 = 0.1309, P(θ > 90°) = 0.5·0.5 = 0.25, P(θ ≤ 30°) = 0.5·π/36 = 0.0436."""
    p = _camera()
    assert p.uniform_sphere_rate == 0.5 and p.uniform_sphere_draw == "cube"
    g = torch.Generator().manual_seed(7)
    polar = torch.cat([sample_cameras(p, 1, g).polar for _ in range(20000)])
    assert polar.min() >= 0 and polar.max() <= 135
    assert (polar < 45).float().mean().item() == pytest.approx(0.5 * math.pi / 12, abs=0.01)
    assert (polar > 90).float().mean().item() == pytest.approx(0.25, abs=0.012)
    assert (polar <= 30).float().mean().item() == pytest.approx(0.5 * math.pi / 36, abs=0.007)


def test_one_branch_draw_per_batch():
    p = _camera()
    kinds = set()
    for seed in range(40):
        c = sample_cameras(p, 64, torch.Generator().manual_seed(seed))
        on_sphere = bool((c.polar <= 90).all()) and bool((c.polar < 45).any())
        in_range = bool((c.polar >= 45).all())
        assert on_sphere != in_range  # the whole batch comes from one branch
        kinds.add(on_sphere)
        assert torch.allclose(c.radius, torch.full((64,), 1.8)) and torch.allclose(c.fovy, torch.full((64,), 40.0))
    assert kinds == {True, False}


def test_rate_zero_draws_what_the_plain_uniform_sampler_draws():
    p = _camera(uniform_sphere_rate=0.0)
    c = sample_cameras(p, 50, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    u = [torch.rand(50, generator=g) for _ in range(4)]
    torch.testing.assert_close(c.polar, 45 + 90 * u[0])
    torch.testing.assert_close(c.azimuth, -180 + 360 * u[1])


def test_progressive_view_ranges_by_hand():
    """Consistent123: r = min(1, 0.2 + 2·progress); bound = reference·(1 − r) + full·r, with the
    reference (90°, 0°, 3.2, 20°) and the full ranges [45, 105], [−180, 180], [3.0, 3.5], [20, 20]."""
    p = _camera("consistent123")
    r0 = view_ranges(p, 0.0)  # r = 0.2
    assert r0["polar"] == pytest.approx((81.0, 93.0)) and r0["azimuth"] == pytest.approx((-36.0, 36.0))
    assert r0["radius"] == pytest.approx((3.16, 3.26)) and r0["fovy"] == pytest.approx((20.0, 20.0))
    r1 = view_ranges(p, 0.2)  # r = 0.6
    assert r1["polar"] == pytest.approx((63.0, 99.0)) and r1["azimuth"] == pytest.approx((-108.0, 108.0))
    full = {"polar": (45.0, 105.0), "azimuth": (-180.0, 180.0), "radius": (3.0, 3.5), "fovy": (20.0, 20.0)}
    for prog in (0.4, 0.9, None):
        assert {k: pytest.approx(v) for k, v in view_ranges(p, prog).items()} == full
    c = sample_cameras(p, 2000, torch.Generator().manual_seed(0), progress=0.0)
    assert c.polar.min() >= 81 and c.polar.max() <= 93 and c.azimuth.abs().max() <= 36
    # Magic123 has no progressive view: the full ranges whatever the progress
    assert view_ranges(_camera(), 0.0)["polar"] == (45.0, 135.0)


# ------------------------------------------------------------------------ item 12: the consistent123 preset
def test_consistent123_preset_is_the_released_run():
    c = load_params("consistent123")
    cam = c.camera
    assert (cam.ref_polar, cam.ref_azimuth, cam.radius, cam.fovy) == (90, 0, 3.2, 20)  # main.py:111-114
    assert tuple(cam.polar_range) == (45, 105) and tuple(cam.azimuth_range) == (-180, 180)  # main.py:107-108
    assert tuple(cam.radius_range) == (3.0, 3.5) and tuple(cam.fovy_range) == (20, 20)  # main.py:106, :292
    assert cam.ref_every == 4 and cam.ref_prob is None  # main.py:35
    assert cam.uniform_sphere_rate == 0 and cam.progressive_view and cam.progressive_init_ratio == 0.2
    assert c.sd.model == "stabilityai/stable-diffusion-2-1-base" and c.zero123.model == "kxic/zero123-xl"
    assert c.sd.guidance_scale == 10 and c.zero123.guidance_scale == 10  # main.py:285, one scale for both
    assert tuple(c.sd.t_range) == (0.2, 0.6) and tuple(c.sd.fine_t_range) == (0.2, 0.5)
    assert tuple(c.zero123.t_range) == (0.2, 0.6) and tuple(c.zero123.fine_t_range) == (0.2, 0.5)
    assert c.sd.view_dependent_prompt and c.zero123.angle_weighting
    g = c.guidance
    assert (g.coarse.lambda_2d, g.coarse.lambda_3d, g.fine.lambda_2d, g.fine.lambda_3d) == (1, 1, 1, 1)
    L = c.coarse.losses
    assert (L.rgb, L.mask, L.depth) == (1000, 500, 20)  # depth: 10·(1 − ρ) = 20·½(1 − ρ)
    assert (L.normal_smooth, L.entropy, L.orientation) == (10, 1, 1)
    F = c.fine.losses
    assert (F.rgb, F.mask, F.depth, F.normal_consistency, F.laplacian) == (1000, 500, 0, 100, 100)
    assert c.fine.mask_erode_px == 0 and c.coarse.shading.normal_only == 0
    # the base stays Magic123's
    m = load_params("magic123")
    assert (m.camera.radius, m.camera.fovy, m.sd.guidance_scale, m.zero123.guidance_scale) == (1.8, 40, 100, 5)
    assert (m.guidance.coarse.lambda_3d, m.coarse.losses.rgb) == (40, 5)
