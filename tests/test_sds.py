"""SDS against the equations: Magic123 eq. 5 (SD, CFG 100) and eq. 6 (Zero-1-to-3, CFG 5), the
timestep range, and Zero-1-to-3's camera condition for known camera pairs."""
from __future__ import annotations

import math

import pytest
import torch

from core.rendering.cameras import Cameras
from core.guidance.base import RenderBatch
from core.guidance.sd import StableDiffusionGuidance, encode_prompts, load_stable_diffusion
from core.guidance.sds import sample_timesteps
from core.guidance.zero123 import Zero123Guidance, load_zero123, zero123_condition
from _tiny_priors import tiny_models


@pytest.fixture(scope="module")
def sd_guidance():
    parts = load_stable_diffusion(tiny_models()["sd"], "cpu", torch.float32)
    return StableDiffusionGuidance(parts, "a photo of a chair", guidance_scale=100.0, resolution=64, seed=3)


@pytest.fixture(scope="module")
def z123_guidance():
    parts = load_zero123(tiny_models()["zero123"], "cpu", torch.float32)
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(3, 80, 80, generator=g)
    return Zero123Guidance(parts, ref, Cameras.make(90.0, 0.0, 1.8, 40.0), guidance_scale=5.0, resolution=64, seed=3)


def _alpha_bar(scheduler, t):
    return scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1).float()


def test_sd_sds_gradient_is_w_t_times_cfg_residual(sd_guidance):
    g = sd_guidance
    gen = torch.Generator().manual_seed(11)
    z = torch.randn(2, 4, 8, 8, generator=gen).requires_grad_(True)
    noise = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([250, 530])
    loss, diag = g.sds(z, t=t, noise=noise)
    loss.backward()
    # by hand: z_t = √ᾱ z + √(1−ᾱ) ε; ε̂ = ε_u + 100 (ε_c − ε_u) with the UNet called directly
    ab = _alpha_bar(g.parts.scheduler, t)
    zt = ab.sqrt() * z.detach() + (1 - ab).sqrt() * noise
    emb = encode_prompts(g.parts, ["", "a photo of a chair"])
    with torch.no_grad():
        eu = g.parts.unet(zt, t, encoder_hidden_states=emb[:1].expand(2, -1, -1)).sample
        ec = g.parts.unet(zt, t, encoder_hidden_states=emb[1:].expand(2, -1, -1)).sample
    expected = (1 - ab) * ((eu + 100.0 * (ec - eu)) - noise)  # w(t) = 1 − ᾱ_t (DreamFusion)
    assert (ec - eu).abs().max() > 1e-4  # the text condition matters, so CFG is exercised
    torch.testing.assert_close(z.grad * z.shape[0], expected, rtol=1e-4, atol=1e-4)
    assert diag["loss"] == pytest.approx(0.5 * float((expected ** 2).sum()) / 2, rel=1e-4)


def test_sd_gradient_flows_through_the_vae_encoder(sd_guidance):
    rgb = torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    batch = RenderBatch(rgb=rgb, opacity=torch.ones(1, 1, 40, 40), depth=torch.zeros(1, 1, 40, 40), normal=None,
                        cameras=Cameras.make(90, 30, 1.8, 40), shading="albedo", light_dir=None)
    out = sd_guidance(batch)
    out.loss.backward()
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0
    assert not any(p.grad is not None for p in sd_guidance.parts.unet.parameters())
    assert 0.2 <= out.diagnostics["t"] <= 0.6


def test_timesteps_stay_in_0_2_to_0_6_of_the_schedule(sd_guidance):
    t = sample_timesteps(20000, 1000, (0.2, 0.6), torch.Generator().manual_seed(0))
    assert int(t.min()) == 200 and int(t.max()) == 600  # the whole range, nothing outside it
    ts = [sd_guidance.sds(torch.zeros(1, 4, 8, 8))[1]["t"] for _ in range(12)]
    assert all(0.2 <= v <= 0.6 for v in ts) and len(set(ts)) > 3


def test_zero123_sds_gradient_with_zeroed_unconditional_branch(z123_guidance):
    g = z123_guidance
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(2, 4, 8, 8, generator=gen).requires_grad_(True)
    noise = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([300, 420])
    cams = Cameras.make([60.0, 100.0], [45.0, -120.0], [1.8, 2.0], [40.0, 40.0])
    loss, _ = g.sds(z, cams, t=t, noise=noise)
    loss.backward()
    ab = _alpha_bar(g.parts.scheduler, t)
    zt = ab.sqrt() * z.detach() + (1 - ab).sqrt() * noise
    pose = torch.tensor([[math.radians(-30), math.sin(math.radians(45)), math.cos(math.radians(45)), 0.0],
                         [math.radians(10), math.sin(math.radians(-120)), math.cos(math.radians(-120)), 0.2]])
    with torch.no_grad():
        emb = g.parts.cc_projection(torch.cat([g.clip_embedding.expand(2, -1, -1), pose[:, None]], -1))
        ref = g.reference_latent.expand(2, -1, -1, -1)
        ec = g.parts.unet(torch.cat([zt, ref], 1), t, encoder_hidden_states=emb).sample
        eu = g.parts.unet(torch.cat([zt, torch.zeros_like(ref)], 1), t, encoder_hidden_states=torch.zeros_like(emb)).sample
    expected = (1 - ab) * ((eu + 5.0 * (ec - eu)) - noise)
    torch.testing.assert_close(z.grad * 2, expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- Zero-1-to-3 camera condition
def _zero123_native(polar, azimuth, radius):
    """Zero-1-to-3's own pose: our y-up world turned into its z-up Blender world by a proper
    rotation (x, y, z) → (x, −z, y), then its cartesian_to_spherical (θ from +z, φ = atan2(y, x))."""
    c = Cameras.make(polar, azimuth, radius, 40.0).centers[0].double()
    x, y, z = c[0], -c[2], c[1]
    theta = torch.atan2(torch.sqrt(x * x + y * y), z)
    return theta, torch.atan2(y, x), torch.sqrt(x * x + y * y + z * z)


def _zero123_get_T(ref, tgt):
    th_r, ph_r, r_r = _zero123_native(*ref)
    th_t, ph_t, r_t = _zero123_native(*tgt)
    d_az = (ph_t - ph_r) % (2 * math.pi)
    return torch.stack([th_t - th_r, torch.sin(d_az), torch.cos(d_az), r_t - r_r]).float()


@pytest.mark.parametrize("tgt,expected", [
    ((90.0, 90.0, 1.8), (0.0, 1.0, 0.0, 0.0)),  # a quarter turn counter-clockwise seen from above
    ((90.0, -90.0, 1.8), (0.0, -1.0, 0.0, 0.0)),
    ((45.0, 0.0, 1.8), (-math.pi / 4, 0.0, 1.0, 0.0)),  # camera raised 45°: polar decreases
    ((120.0, 180.0, 2.3), (math.pi / 6, 0.0, -1.0, 0.5)),  # below and behind, further away
])
def test_zero123_condition_known_pairs(tgt, expected):
    ref = Cameras.make(90.0, 0.0, 1.8, 40.0)
    got = zero123_condition(ref, Cameras.make(*tgt, 40.0))[0]
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-5, rtol=0)


def test_zero123_condition_matches_zero123_get_T():
    gen = torch.Generator().manual_seed(2)
    for _ in range(25):
        r = torch.rand(6, generator=gen)
        ref = (30 + 120 * r[0].item(), -180 + 360 * r[1].item(), 1.5 + r[2].item())
        tgt = (30 + 120 * r[3].item(), -180 + 360 * r[4].item(), 1.5 + r[5].item())
        got = zero123_condition(Cameras.make(*ref, 40.0), Cameras.make(*tgt, 40.0))[0]
        torch.testing.assert_close(got, _zero123_get_T(ref, tgt), atol=1e-4, rtol=0)


@pytest.mark.parametrize("prior", ["sd", "sd_views", "zero123", "zero123_weighted"])
def test_the_graphed_gradient_is_the_eager_sds_step(prior):
    """compile 'graphs' replays an SDS step's no-grad middle (noising, guided ε̂, the angle weight,
    w(t)(ε̂ − ε)) as one CUDA graph (core.perf.GraphedCall; tests/test_gpu_backends.py on a GPU). Off a
    GPU the same function runs as it is: the same loss and latent gradient as the eager step, bit for
    bit, so the graph holds the step's own arithmetic."""
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(2, 4, 8, 8, generator=gen)
    noise = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([260, 480])
    cams = Cameras.make([80.0, 60.0], [40.0, -130.0], 1.8, 40.0)
    res = []
    for graphed in (False, True):
        if prior.startswith("sd"):
            parts = load_stable_diffusion(tiny_models()["sd"], "cpu", torch.float32)
            g = StableDiffusionGuidance(parts, "a photo of a chair", guidance_scale=100.0, resolution=64, seed=3,
                                        view_dependent=prior == "sd_views", graphed=graphed)
            step = lambda x: g.sds(x, t=t, noise=noise, cameras=cams)  # noqa: E731
        else:
            parts = load_zero123(tiny_models()["zero123"], "cpu", torch.float32)
            ref = torch.rand(3, 80, 80, generator=torch.Generator().manual_seed(0))
            g = Zero123Guidance(parts, ref, Cameras.make(90.0, 0.0, 1.8, 40.0), guidance_scale=5.0, resolution=64,
                                seed=3, angle_weighting=prior == "zero123_weighted", graphed=graphed)
            step = lambda x: g.sds(x, cams, t=t, noise=noise)  # noqa: E731
        assert (g.graphed_gradient is not None) == graphed
        x = z.clone().requires_grad_(True)
        loss, _ = step(x)
        loss.backward()
        res.append((loss.detach(), x.grad))
    assert res[0][1].abs().max() > 0
    assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])
