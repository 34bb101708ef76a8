"""The priors are loaded once per process and reused by every asset (core.models.cache), without one
asset's token or textual inversion reaching the next."""
from __future__ import annotations

import torch

from core.models.cache import PRIORS, ModelCache
from core.params import load_params


def test_a_model_is_loaded_once_then_reused_and_counted():
    cache = ModelCache(capacity=2)
    made = []

    def load(name):
        return lambda: made.append(name) or {"model": name}

    a = cache.get("a", load("a"))
    assert cache.get("a", load("a")) is a
    cache.get("b", load("b"))
    cache.get("c", load("c"))  # over capacity: a, the least recently used, goes
    cache.get("a", load("a"))
    assert made == ["a", "b", "c", "a"]
    s = cache.stats()
    assert s["loads"] == 4 and s["reuses"] == 1 and s["by_model"]["a"] == {"loads": 2, "reuses": 1}
    off = ModelCache(capacity=0)
    off.get("a", load("a"))
    off.get("a", load("a"))
    assert off.stats()["loads"] == 2


def test_two_assets_share_the_priors_but_not_their_tokens():
    """Two builds of the joint prior (two assets, or a coarse and a fine stage): one load of each prior,
    the same UNets; the first build's learned token does not reach the second's text encoder, and the
    shared modules are as loaded (the second guidance equals one built from a fresh load)."""
    from core.guidance.factory import build_guidance, stable_diffusion_parts
    from core.guidance.sd import load_stable_diffusion
    from core.models.sources import prior_model

    PRIORS.clear()
    p = load_params("tiny", ["prompt.text=a chair"])
    ref = torch.rand(3, 32, 32)
    first = build_guidance(p, ref, "coarse", "cpu")
    width = first.sd.parts.text_encoder.get_input_embeddings().weight.shape[1]
    token = {"<e>": torch.randn(width)}
    from core.guidance.factory import resolve_token

    resolve_token(p, first.sd.parts, None, token)
    second = build_guidance(p, ref, "coarse", "cpu")
    s = PRIORS.stats()
    assert s["loads"] == 2 and s["reuses"] == 2, s
    assert second.sd.parts.unet is first.sd.parts.unet and second.zero123.parts.unet is first.zero123.parts.unet
    assert second.sd.parts.text_encoder is not first.sd.parts.text_encoder
    assert "<e>" not in second.sd.parts.tokenizer.get_vocab()
    fresh = load_stable_diffusion(prior_model(p, "sd"), torch.device("cpu"), torch.float32, p.models)
    ours = stable_diffusion_parts(p, "cpu")
    for a, b in ((ours.text_encoder, fresh.text_encoder), (ours.unet, fresh.unet), (ours.vae, fresh.vae)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    PRIORS.clear()


def test_the_stages_of_a_process_run_one_compiled_unet_and_encoder_per_prior(monkeypatch):
    """A coarse and a fine stage (or two assets) in one process: each prior's UNet is compiled, and its
    encode function built, once (core.guidance.sd.per_prior), so that the fine stage neither traces
    the UNets again nor captures new encoder graphs. Built for a GPU here (nothing runs: torch.compile
    and the graphed encode are lazy): the same objects for the same settings, new ones for other
    settings or a prior loaded afresh."""
    import core.guidance.sd as sd_mod
    from core.guidance.factory import build_guidance, sds_modules, stable_diffusion_parts, zero123_parts

    PRIORS.clear()
    p = load_params("tiny", ["prompt.text=a chair", "sd.compile=default", "sd.vae_compile=default"])
    gpu = torch.device("cuda")
    a_unet, a_enc = sds_modules(stable_diffusion_parts(p, "cpu"), p.sd, gpu)
    b_unet, b_enc = sds_modules(stable_diffusion_parts(p, "cpu"), p.sd, gpu)
    assert isinstance(a_unet, torch._dynamo.eval_frame.OptimizedModule) and a_enc is not sd_mod.vae_moments
    assert b_unet is a_unet and b_enc is a_enc
    z_unet, _ = sds_modules(zero123_parts(p, "cpu"), p.sd, gpu)  # another prior: its own
    assert z_unet is not a_unet and z_unet._orig_mod is zero123_parts(p, "cpu").unet
    other = p.model_copy(update={"sd": p.sd.model_copy(update={"compile_layout": "inductor"})})
    assert sds_modules(stable_diffusion_parts(p, "cpu"), other.sd, gpu)[0] is not a_unet
    monkeypatch.setenv("LIFT3D_PRIOR_CACHE", "0")  # loaded afresh: compiled afresh
    assert sds_modules(stable_diffusion_parts(p, "cpu"), p.sd, gpu)[0] is not a_unet
    monkeypatch.delenv("LIFT3D_PRIOR_CACHE")

    compiled = []  # build_guidance goes through it: one compile per prior over a coarse and a fine stage
    real = sd_mod.compile_unet
    monkeypatch.setattr(sd_mod, "compile_unet", lambda unet, *a: compiled.append(unet) or real(unet, *a))
    PRIORS.clear()
    ref = torch.rand(3, 32, 32)
    coarse, fine = build_guidance(p, ref, "coarse", "cpu"), build_guidance(p, ref, "fine", "cpu")
    assert len(compiled) == 2 and fine.sd.moments is coarse.sd.moments and fine.zero123.moments is coarse.zero123.moments
    PRIORS.clear()


def test_channels_last_priors_are_their_own_cache_entry_and_guide_the_same():
    """sd/zero123.channels_last (issue 15): the UNets' and VAEs' 4-d weights channels-last, loaded
    as a cache entry of their own (the default-layout one is untouched), and the same SDS gradient
    on the same render and draws (on this CPU up to the convolution's order of additions)."""
    from core.guidance.factory import build_guidance
    from core.rendering.batch import RenderBatch
    from core.rendering.cameras import Cameras

    PRIORS.clear()
    ref = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    rgb0 = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    grads, built = [], []
    for cl in (False, True):
        p = load_params("tiny", {"prompt.text": "a chair", "sd.channels_last": cl, "zero123.channels_last": cl,
                                 "guidance.sds_gradient_scale": "none"})
        g = build_guidance(p, ref, "coarse", "cpu")
        built.append(g)
        rgb = rgb0.clone().requires_grad_(True)
        r = g(RenderBatch(rgb=rgb, opacity=torch.ones_like(rgb[:, :1]), depth=torch.ones_like(rgb[:, :1]),
                          normal=None, cameras=Cameras.make(70.0, 45.0, 2.0, 40.0), step=50, total_steps=100))
        r.loss.backward()
        grads.append(rgb.grad)
    assert PRIORS.stats()["loads"] == 4  # two layouts × two priors
    for g, cl in zip(built, (False, True)):
        for m in (g.sd.parts.unet, g.sd.parts.vae, g.zero123.parts.unet, g.zero123.parts.vae):
            w = next(p for p in m.parameters() if p.dim() == 4)
            assert w.is_contiguous(memory_format=torch.channels_last) == cl
            assert w.is_contiguous() == (not cl)
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-5 * float(grads[0].abs().max())), \
        float((grads[0] - grads[1]).abs().max())
    PRIORS.clear()
