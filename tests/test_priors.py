"""Joint prior (Magic123 eqs. 7–8), dynamic prior (Consistent123 eqs. 8–9) and the factory."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

from core.rendering.cameras import Cameras
from core.guidance.base import GuidanceOutput, RenderBatch
from core.guidance.factory import build_guidance
from core.guidance.priors import DynamicPrior, JointPrior, NoGuidance, dynamic_prior_weights, joint_prior_loss
from core.params import load_params
from core.models.cache import PRIORS
from _tiny_priors import tiny_models


class FakePrior:
    """A prior whose loss is a known multiple of the render sum; counts its calls."""

    def __init__(self, scale: float):
        self.scale, self.calls = scale, 0

    def __call__(self, batch):
        self.calls += 1
        return GuidanceOutput(loss=self.scale * batch.rgb.sum(), diagnostics={"t": 0.3})


def _batch(step=0, total=100, stage="coarse"):
    rgb = torch.full((1, 3, 4, 4), 0.5, requires_grad=True)
    return RenderBatch(rgb=rgb, opacity=torch.ones(1, 1, 4, 4), depth=torch.zeros(1, 1, 4, 4), normal=None,
                       cameras=Cameras.make(90, 45, 1.8, 40), shading="albedo", light_dir=None, step=step,
                       total_steps=total, stage=stage)


@pytest.mark.parametrize("kind", ["exp", "linear", "log"])
def test_dynamic_prior_weights_at_0_half_and_T_paper_reading(kind):
    """reading="paper": eq. 9 as printed in Consistent123 §4.4 (the released reading, the default,
    is tested in tests/test_fidelity_c123.py)."""
    T = 1000
    for t in (0, T // 2, T):
        w3, w2 = dynamic_prior_weights(t, T, kind, reading="paper")
        x = t / T
        if kind == "exp":  # Consistent123 eq. 8
            e3 = math.exp(-x)
        elif kind == "linear":  # eq. 9, as printed
            e3 = x
        else:  # eq. 9, as printed; t clamped to one iteration at t = 0
            e3 = math.log2(max(x, 1 / T))
        assert w3 == pytest.approx(e3) and w2 == pytest.approx(1 - e3)
    assert dynamic_prior_weights(0, T, "exp", reading="paper") == (1.0, 0.0)
    assert dynamic_prior_weights(T, T, "exp", reading="paper")[1] == pytest.approx(1 - math.exp(-1))
    with pytest.raises(ValueError):
        dynamic_prior_weights(1, T, "cosine", reading="paper")


def test_joint_prior_weights_and_ablations():
    sd, z = FakePrior(2.0), FakePrior(3.0)
    out = JointPrior(sd, z, lambda_2d=1.0, lambda_3d=40.0)(_batch())
    s = 0.5 * 48
    assert float(out.loss.detach()) == pytest.approx(1.0 * 2.0 * s + 40.0 * 3.0 * s)  # eq. 7
    assert out.diagnostics["sd/loss"] == pytest.approx(2.0 * s) and out.diagnostics["zero123/loss"] == pytest.approx(3.0 * s)
    # λ = 0 (the ablations): that prior does not run
    sd, z = FakePrior(2.0), FakePrior(3.0)
    out = JointPrior(sd, z, lambda_2d=0.0, lambda_3d=40.0)(_batch())
    assert sd.calls == 0 and z.calls == 1 and float(out.loss) == pytest.approx(40 * 3.0 * s)
    with pytest.raises(ValueError):
        JointPrior(None, None, 1.0, 40.0)
    assert float(joint_prior_loss(torch.tensor(2.0), None, 0.5, 40.0)) == pytest.approx(1.0)


def test_dynamic_prior_stage1_then_eq8_from_the_switch():
    sd, z = FakePrior(2.0), FakePrior(3.0)
    prior = DynamicPrior(sd, z, lambda_2d=1.0, lambda_3d=40.0, schedule="exp")
    out = prior(_batch(step=10, total=110))
    assert not prior.in_stage2 and sd.calls == 0 and out.diagnostics["w_3d"] == 1.0
    prior.start_stage2(10)
    prior.start_stage2(30)  # only the first switch counts
    assert prior.in_stage2 and prior.switch_step == 10
    out = prior(_batch(step=60, total=110))  # t = 50 of T = 100
    w3, w2 = math.exp(-0.5), 1 - math.exp(-0.5)
    s = 0.5 * 48
    assert out.diagnostics["w_3d"] == pytest.approx(w3) and out.diagnostics["w_2d"] == pytest.approx(w2)
    assert float(out.loss) == pytest.approx(40 * w3 * 3.0 * s + 1.0 * w2 * 2.0 * s)
    restored = DynamicPrior(sd, z, 1.0, 40.0)
    restored.load_state_dict(prior.state_dict())
    assert restored.weights(60, 110) == prior.weights(60, 110)


class _RecordingStreams:
    """core.guidance.priors.PriorStreams' interface off a GPU (there are no CUDA streams here): it
    records where the priors' calls fall. The GPU test runs the real one
    (tests/test_gpu_backends.py::test_two_streams_give_the_one_stream_sds_gradients)."""

    def __init__(self, events: list):
        self.events = events

    @contextlib.contextmanager
    def split(self, batch):
        self.events.append("split")
        yield
        self.events.append("join")

    @contextlib.contextmanager
    def beside(self):
        self.events.append("side")
        yield
        self.events.append("back")


class _NamedPrior(FakePrior):
    def __init__(self, scale: float, name: str, events: list):
        super().__init__(scale)
        self.name, self.events = name, events

    def __call__(self, batch):
        self.events.append(self.name)
        return super().__call__(batch)


def test_two_streams_run_the_second_prior_beside_and_join_before_the_loss():
    """guidance.streams two: the joint prior runs Zero-1-to-3 beside Stable Diffusion, the dynamic prior
    (stage 2) Stable Diffusion beside Zero-1-to-3; the streams join before the loss is formed, the loss
    is the one-stream loss, and a single prior (an ablation, stage 1) splits nothing."""
    s = 0.5 * 48
    ev: list = []
    out = JointPrior(_NamedPrior(2.0, "sd", ev), _NamedPrior(3.0, "zero123", ev), 1.0, 40.0,
                     streams=_RecordingStreams(ev))(_batch())
    assert ev == ["split", "sd", "side", "zero123", "back", "join"]
    assert float(out.loss) == pytest.approx(1.0 * 2.0 * s + 40.0 * 3.0 * s)
    ev.clear()
    JointPrior(_NamedPrior(2.0, "sd", ev), _NamedPrior(3.0, "zero123", ev), 0.0, 40.0, streams=_RecordingStreams(ev))(_batch())
    assert ev == ["zero123"]
    ev.clear()
    prior = DynamicPrior(_NamedPrior(2.0, "sd", ev), _NamedPrior(3.0, "zero123", ev), 1.0, 40.0,
                         streams=_RecordingStreams(ev))
    prior(_batch(step=10, total=110))
    assert ev == ["zero123"]  # stage 1: the 3D prior alone
    ev.clear()
    prior.start_stage2(10)
    out = prior(_batch(step=60, total=110))
    assert ev == ["split", "zero123", "side", "sd", "back", "join"]
    w3, w2 = math.exp(-0.5), 1 - math.exp(-0.5)
    assert float(out.loss) == pytest.approx(40 * w3 * 3.0 * s + 1.0 * w2 * 2.0 * s)


def test_two_streams_only_on_a_gpu_and_never_beside_graph_trees():
    """guidance.streams: 'one' off a GPU whatever is asked; on a GPU 'auto' is two unless a prior's UNet
    compiles to reduce-overhead (Inductor's graph trees share one memory pool), where 'two' is refused:
    by load_params, before any model loads, with a one-line message naming the keys. The defaults
    (compile auto, which is graphs on a GPU) take two."""
    from core.guidance.factory import guidance_streams
    from core.guidance.priors import prior_streams
    from core.params import ParamsError

    graphs = {"sd": "graphs", "zero123": "graphs"}
    assert load_params("magic123").guidance.streams == "auto"
    assert prior_streams("two", "cpu", graphs) == prior_streams("auto", "cpu", graphs) == "one"
    assert prior_streams("auto", "cuda", graphs) == prior_streams("two", "cuda", graphs) == "two"
    assert prior_streams("one", "cuda", graphs) == "one"
    trees = {"sd": "graphs", "zero123": "reduce-overhead"}
    assert prior_streams("auto", "cuda", trees) == prior_streams("two", "cuda", trees) == "one"
    with pytest.raises(ParamsError) as e:
        load_params("magic123", {"guidance.streams": "two", "sd.compile": "graphs", "zero123.compile": "reduce-overhead"})
    assert "(zero123.compile=reduce-overhead)" in str(e.value)  # the key at fault, alone
    assert "\n" not in str(e.value) and "got" not in str(e.value)
    assert load_params("magic123", {"guidance.streams": "two"}).guidance.streams == "two"  # auto compiles to graphs
    defaults = load_params("magic123")
    from core.guidance.sd import compile_mode
    resolved = {k: compile_mode(getattr(defaults, k).compile, "cuda", have_triton=True, have_cc=True) for k in ("sd", "zero123")}
    assert prior_streams(defaults.guidance.streams, "cuda", resolved) == "two"  # the defaults on a GPU
    p = _tiny_params("magic123", **{"guidance.streams": "two", "sd.compile": "graphs", "zero123.compile": "graphs"})
    assert guidance_streams(p, "cpu") == "one"
    assert build_guidance(p, torch.rand(3, 64, 64), "coarse", "cpu").streams is None


def _tiny_params(preset, **over):
    import os

    os.environ.setdefault("LIFT3D_TINY_DIR", str(__import__("pathlib").Path(tiny_models()["sd"]).parent))
    return load_params(preset, {"models.tiny": True, "device": "cpu", "sd.resolution": 64,
                                "zero123.resolution": 64, "prompt.text": "a chair", **over})


def test_factory_builds_joint_prior_and_skips_ablated_priors():
    ref = torch.rand(3, 64, 64)
    g = build_guidance(_tiny_params("magic123"), ref, "coarse", "cpu")
    assert isinstance(g, JointPrior) and g.sd is not None and g.zero123 is not None
    assert (g.lambda_2d, g.lambda_3d) == (1.0, 40.0)
    assert g.sd.prompt == "A high-resolution DSLR image of a chair"
    fine = build_guidance(_tiny_params("magic123"), ref, "fine", "cpu")
    assert (fine.lambda_2d, fine.lambda_3d) == (0.001, 0.01)
    only3d = build_guidance(_tiny_params("magic123-3d"), ref, "coarse", "cpu")
    assert only3d.sd is None and only3d.zero123 is not None
    only2d = build_guidance(_tiny_params("magic123-2d"), ref, "coarse", "cpu")
    assert only2d.zero123 is None and only2d.sd is not None
    out = g(_batch())
    out.loss.backward()
    for k in ("sd/loss", "zero123/loss", "sd/t", "zero123/t", "lambda_2d", "lambda_3d"):
        assert k in out.diagnostics
    # what the UNets computed stays on the device as 0-d tensors: the step does not wait for the
    # priors to log them (the engine reads them for a trace row or the progress bar); what the host
    # drew (t) or set (λ) is a float
    d = out.diagnostics
    for k in ("sd/loss", "zero123/loss", "sd/grad_norm", "zero123/grad_norm", "zero123/angle_weight", "loss"):
        assert isinstance(d[k], torch.Tensor) and d[k].dim() == 0 and not d[k].requires_grad, k
    assert all(isinstance(d[k], float) for k in ("sd/t", "zero123/t", "lambda_2d", "lambda_3d"))
    assert float(d["loss"]) == pytest.approx(float(out.loss))
    joint = 1.0 * float(d["sd/loss"]) + 40.0 * float(d["zero123/loss"])  # eq. 7, × the released 1/loss scale
    assert float(d["loss"]) == pytest.approx(joint * d["sds_multiplier"]) and d["sds_multiplier"] < 1


def test_factory_dynamic_and_none():
    ref = torch.rand(3, 64, 64)
    g = build_guidance(_tiny_params("consistent123"), ref, "coarse", "cpu")
    assert isinstance(g, DynamicPrior) and not g.in_stage2
    assert g.sd.prompt == "a chair"  # Consistent123: the plain description
    # the fine stage's switch comes from the coarse stage's state (or the fine stage loop), not the factory
    assert not build_guidance(_tiny_params("consistent123"), ref, "fine", "cpu").in_stage2
    assert isinstance(build_guidance(_tiny_params("magic123", **{"guidance.kind": "none"}), ref, "coarse", "cpu"),
                      NoGuidance)


def test_reference_is_reread_at_the_prior_resolution():
    from pathlib import Path

    import torch.nn.functional as F

    from core.guidance.factory import _reference_rgb_mask
    from core.inputs.images import load_reference

    chair = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "nerf4" / "chair" / "rgba.png"
    if not chair.is_file():
        pytest.skip("benchmark files not present")
    p = load_params("magic123")
    ref = load_reference(chair, None, size=64, object_scale=p.segment.object_scale)
    rgb, mask = _reference_rgb_mask(ref, 256, p)
    assert rgb.shape == (3, 256, 256) and mask.shape == (1, 256, 256)
    # the same framing: downsampled, it is the 64² reference
    assert float((F.interpolate(rgb[None], (64, 64), mode="area")[0] - ref.rgb).abs().mean()) < 0.02
    assert _reference_rgb_mask(ref, 32, p)[0].shape[-1] == 64  # big enough already: not re-read


def test_unet_compile_is_gpu_only_and_auto_by_default():
    """compile: auto (the default) is 'graphs' (Inductor's kernels, each SDS step one CUDA graph of
    lift3d's) on a GPU where Inductor can build (Triton and a C compiler) and eager where it cannot;
    any mode is eager on the CPU."""
    from core.guidance.sd import compile_mode, compile_unet

    p = load_params("magic123")
    assert p.sd.compile == "auto" and p.zero123.compile == "auto"
    unet = torch.nn.Linear(2, 2)
    assert compile_unet(unet, "reduce-overhead", "cpu") is unet
    assert compile_unet(unet, "auto", "cpu") is unet
    assert compile_unet(unet, "none", "cuda") is unet
    assert compile_mode("auto", "cuda", have_triton=True, have_cc=True) == "graphs"  # reduce-overhead until session 34
    assert compile_mode("auto", "cuda", have_triton=False, have_cc=True) == "none"
    assert compile_mode("auto", "cuda", have_triton=True, have_cc=False) == "none"
    assert compile_mode("auto", "cpu", have_triton=True, have_cc=True) == "none"
    assert compile_mode("default", "cuda", have_triton=False, have_cc=False) == "default"  # asked for: as asked
    with pytest.raises(Exception):
        load_params("magic123", {"sd.compile": "fast"})


def test_the_bar_names_the_priors_compiling_at_the_first_guided_iteration_on_a_gpu(monkeypatch):
    """core.guidance.factory.first_call_note: a GPU stage whose priors in use compile (any UNet or VAE
    encoder setting not 'none'; 'auto' only where Inductor builds) says so on its bar at its first guided
    iteration; nothing on a CPU, with compiling off, or for a prior the stage does not use."""
    import core.perf
    from core.guidance.factory import first_call_note

    p = load_params("magic123")  # every compile setting 'auto'
    monkeypatch.setattr(core.perf, "inductor_missing", lambda: "")
    assert "compiling" in first_call_note(p, "cuda", True, True)
    assert first_call_note(p, "cpu", True, True) == ""
    monkeypatch.setattr(core.perf, "inductor_missing", lambda: "no triton")
    assert first_call_note(p, "cuda", True, True) == ""  # auto comes to eager there
    off = load_params("magic123", {"sd.compile": "none", "sd.vae_compile": "none", "zero123.compile": "none",
                                   "zero123.vae_compile": "none"})
    assert first_call_note(off, "cuda", True, True) == ""
    only_sd = load_params("magic123", {"zero123.compile": "none", "zero123.vae_compile": "none",
                                       "sd.compile": "default"})
    assert "compiling" in first_call_note(only_sd, "cuda", True, True)  # asked for: compiles even without auto's checks
    assert first_call_note(only_sd, "cuda", False, True) == ""  # Stable Diffusion not in this stage


def test_unet_compile_layout_is_forced_channels_last_where_it_may_and_inductors_on_request(monkeypatch):
    """sd/zero123.compile_layout: 'auto' by default, which forces Inductor's channels-last layout with
    compile 'graphs' or 'default' (mode 'default' given the option) and leaves Inductor its own under
    'reduce-overhead' (torch.compile takes a mode or options); 'inductor' gives the mode alone; an
    explicit 'channels_last' reaches each prior's UNet from the factory and with 'reduce-overhead' is
    refused when the params load. Eager on a CPU whatever is asked."""
    import core.guidance.sd as sd_module
    from core.guidance.sd import compile_unet, unet_layout

    p = load_params("magic123")
    assert p.sd.compile_layout == "auto" and p.zero123.compile_layout == "auto"
    assert unet_layout("auto", "auto", "cuda", have_triton=True, have_cc=True) == "channels_last"
    assert unet_layout("auto", "auto", "cuda", have_triton=False, have_cc=True) == "inductor"  # eager there
    assert unet_layout("reduce-overhead", "auto", "cuda") == "inductor"
    assert unet_layout("default", "auto", "cuda") == "channels_last"
    assert unet_layout("graphs", "inductor", "cuda") == "inductor"
    assert unet_layout("graphs", "channels_last", "cpu") == "inductor"  # not compiled off a GPU
    unet = torch.nn.Linear(2, 2)
    assert compile_unet(unet, "graphs", "cpu", "channels_last") is unet
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    compile_unet(unet, "graphs", "cuda")
    compile_unet(unet, "graphs", "cuda", "inductor")
    compile_unet(unet, "default", "cuda", "channels_last")
    compile_unet(unet, "reduce-overhead", "cuda")
    forced = {"dynamic": False, "options": {"force_layout_optimization": True}}
    assert seen == [forced, {"dynamic": False, "mode": "default"}, forced, {"dynamic": False, "mode": "reduce-overhead"}]
    monkeypatch.undo()
    with pytest.raises(Exception, match="zero123.compile_layout"):
        load_params("magic123", {"zero123.compile": "reduce-overhead", "zero123.compile_layout": "channels_last",
                                 "guidance.streams": "one"})
    assert load_params("magic123", {"zero123.compile": "reduce-overhead", "guidance.streams": "one"}) \
        .zero123.compile_layout == "auto"  # the default stays valid with reduce-overhead
    assert load_params("magic123", {"sd.compile": "graphs", "sd.compile_layout": "channels_last"}).sd.compile_layout \
        == "channels_last"

    layouts = []
    real = sd_module.compile_unet
    PRIORS.clear()  # a prior's compiled UNet is built once per loaded prior (per_prior): load afresh
    monkeypatch.setattr(sd_module, "compile_unet", lambda unet, mode, device, layout="auto":
                        layouts.append(layout) or real(unet, mode, device, layout))
    build_guidance(_tiny_params("magic123", **{"sd.compile_layout": "inductor"}), torch.rand(3, 64, 64),
                   "coarse", "cpu")
    assert sorted(layouts) == ["auto", "inductor"]  # Zero-1-to-3's default, SD's as asked
    PRIORS.clear()


def test_vae_compile_is_auto_gpu_only_and_traces_the_encoder_whole(monkeypatch):
    """sd/zero123.vae_compile (torch.compile of the VAE encoder that SDS differentiates through,
    eq. 5): 'auto' by default, which is 'channels_last' on a GPU where Inductor builds and eager
    where it cannot; eager on a CPU whatever is asked, and the guidances take the compiled copy.
    The tiny real AutoencoderKL's `vae_moments` compiles as one graph forward and backward
    (fullgraph=True fails on any graph break) and gives the eager moments and input gradient; the
    same with Inductor's kernels is tests/test_gpu_backends.py's."""
    from diffusers import AutoencoderKL

    from core.guidance.sd import compile_vae_moments, vae_compile_mode, vae_moments

    p = load_params("magic123")
    assert p.sd.vae_compile == "auto" and p.zero123.vae_compile == "auto"
    assert vae_compile_mode("auto", "cuda", have_triton=True, have_cc=True) == "channels_last"
    assert vae_compile_mode("auto", "cuda", have_triton=True, have_cc=False) == "none"  # no C compiler: eager
    assert vae_compile_mode("auto", "cuda", have_triton=False, have_cc=True) == "none"
    assert vae_compile_mode("default", "cuda", have_triton=False, have_cc=False) == "default"  # asked for: as asked
    for mode in ("auto", "default", "channels_last"):
        assert vae_compile_mode(mode, "cpu") == "none"
        assert compile_vae_moments(mode, "cpu") is vae_moments
    assert compile_vae_moments("none", "cuda") is vae_moments
    with pytest.raises(Exception):
        load_params("magic123", {"zero123.vae_compile": "reduce-overhead"})
    # torch.compile is lazy: no GPU needed here
    for mode in ("default", "channels_last"):
        assert compile_vae_moments(mode, "cuda") is not vae_moments
    # what torch.compile is asked for: Inductor's own layout, or its layout forced channels-last
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append((fn, kw)) or fn)
    compile_vae_moments("default", "cuda")
    compile_vae_moments("channels_last", "cuda")
    assert seen == [(vae_moments, {"dynamic": False, "mode": "default"}),
                    (vae_moments, {"dynamic": False, "options": {"force_layout_optimization": True}})]
    monkeypatch.undo()
    g = build_guidance(_tiny_params("magic123", **{"sd.vae_compile": "default", "zero123.vae_compile": "default"}),
                       torch.rand(3, 64, 64), "coarse", "cpu")
    assert g.sd.moments is vae_moments and g.zero123.moments is vae_moments  # CPU: the eager function

    # the factory hands each prior what compile_vae_moments makes of its own setting, and the SDS
    # encodes through it
    import core.guidance.sd as sd_module

    calls, asked = [], []

    def recording(mode, device):
        asked.append(mode)

        def moments(vae, images):
            calls.append((mode, images.shape[-1]))
            return vae_moments(vae, images)
        return moments

    monkeypatch.setattr(sd_module, "compile_vae_moments", recording)
    PRIORS.clear()  # the encode function is built once per loaded prior (per_prior): load afresh
    g = build_guidance(_tiny_params("magic123", **{"sd.vae_compile": "default"}), torch.rand(3, 64, 64), "coarse", "cpu")
    assert sorted(asked) == ["auto", "default"]  # SD's setting, Zero-1-to-3's default
    g(_batch(step=50, total=100))
    assert sorted(calls) == [("auto", 64), ("default", 64)]  # SD's encoder, Zero-1-to-3's, once each
    PRIORS.clear()  # the recording encode functions stay with the loaded priors: not for the next test

    vae = AutoencoderKL.from_pretrained(tiny_models()["sd"], subfolder="vae").eval().requires_grad_(False)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    traced = torch.compile(vae_moments, backend="aot_eager", fullgraph=True, dynamic=False)
    out = {}
    for name, fn in (("eager", vae_moments), ("traced", traced)):
        img = x.clone().requires_grad_(True)
        mean, std = fn(vae, img)
        (mean.square().sum() + std.sum()).backward()
        out[name] = (mean.detach(), std.detach(), img.grad)
    for a, b in zip(out["eager"], out["traced"]):
        assert a.abs().max() > 0 and torch.allclose(a, b, rtol=1e-4, atol=1e-6), float((a - b).abs().max())


def test_vae_kernels_setting_swaps_only_its_priors_encoder():
    """sd/zero123.vae_kernels: 'auto' for both priors by default; 'auto' is lift3d only on a GPU with
    Triton; 'lift3d' puts that prior's VAE encoder (not its decoder, not the other prior's) on TritonGroupNorm
    and AttnProcessor, and the guidance encodes through it with diffusers' numbers (on a CPU the
    GroupNorm falls back to torch's; the kernels' own check is tests/test_group_norm_triton.py)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from core.guidance.group_norm_triton import TritonGroupNorm
    from core.guidance.sd import vae_kernels_mode
    from core.representations.hashgrid import triton_available

    p = load_params("magic123")
    assert p.sd.vae_kernels == "auto" and p.zero123.vae_kernels == "auto"
    with pytest.raises(Exception):
        load_params("magic123", {"sd.vae_kernels": "triton"})
    assert vae_kernels_mode("auto", "cpu") == "diffusers" and vae_kernels_mode("lift3d", "cpu") == "lift3d"
    assert vae_kernels_mode("auto", "cuda") == ("lift3d" if triton_available() else "diffusers")

    def kinds(module):
        return ({type(m) for m in module.modules() if isinstance(m, torch.nn.GroupNorm)},
                {type(m.processor) for m in module.modules() if hasattr(m, "processor")})

    ref = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    plain = build_guidance(_tiny_params("magic123"), ref, "coarse", "cpu")
    fast = build_guidance(_tiny_params("magic123", **{"sd.vae_kernels": "lift3d"}), ref, "coarse", "cpu")
    assert kinds(fast.sd.parts.vae.encoder) == ({TritonGroupNorm}, {AttnProcessor})
    assert kinds(fast.sd.parts.vae.decoder) == ({torch.nn.GroupNorm}, {AttnProcessor2_0})
    assert kinds(fast.zero123.parts.vae.encoder) == ({torch.nn.GroupNorm}, {AttnProcessor2_0})
    assert kinds(plain.sd.parts.vae.encoder) == ({torch.nn.GroupNorm}, {AttnProcessor2_0})  # its own load
    out = []
    for g in (plain, fast):
        b = _batch(step=50, total=100)
        g(b).loss.backward()
        out.append(b.rgb.grad)
    assert out[0].abs().max() > 0
    torch.testing.assert_close(out[1], out[0], rtol=1e-4, atol=1e-7)


def test_vae_graphs_is_on_by_default_gpu_only_and_wraps_the_chosen_encode(monkeypatch):
    """sd/zero123.vae_graphs (the SDS encode's forward and backward replayed as CUDA graphs): on by
    default, and false leaves the encode as vae_compile chose it; off a GPU the encode function is the one vae_compile chose, untouched; on a GPU it
    wraps that one (the capture itself is tests/test_gpu_backends.py's)."""
    import core.guidance.sd as sd_module
    from core.guidance.sd import encoder_moments, graph_vae_moments, vae_moments

    p = load_params("magic123")
    assert p.sd.vae_graphs is True and p.zero123.vae_graphs is True
    # the encoder eager (vae_compile none; its 'auto' compiles on a GPU where Inductor builds), so that
    # what the graphs wrap is vae_moments itself
    eager = {"sd.vae_compile": "none"}
    on, off = load_params("magic123", eager), load_params("magic123", {**eager, "sd.vae_graphs": False})
    assert graph_vae_moments(vae_moments, "cpu") is vae_moments
    assert encoder_moments(on.sd, "cpu") is vae_moments and encoder_moments(off.sd, "cuda") is vae_moments
    PRIORS.clear()  # built afresh here, not as an earlier test left them
    g = build_guidance(_tiny_params("magic123", **{"sd.vae_graphs": True, "zero123.vae_graphs": True}),
                       torch.rand(3, 64, 64), "coarse", "cpu")
    assert g.sd.moments is vae_moments and g.zero123.moments is vae_moments
    wrapped = []
    monkeypatch.setattr(sd_module, "graph_vae_moments", lambda fn, device: wrapped.append((fn, str(device))) or "graphed")
    assert encoder_moments(on.sd, "cuda") == "graphed" and wrapped == [(vae_moments, "cuda")]


def test_graphed_call_off_a_gpu_is_the_function_itself():
    """core.perf.GraphedCall (compile 'graphs' on a GPU: tests/test_gpu_backends.py) calls its function
    on CPU tensors and captures nothing."""
    from core.perf import GraphedCall

    g = GraphedCall(lambda x, y: x * 2 + y)
    x, y = torch.arange(4.0), torch.ones(4)
    assert torch.equal(g(x, y), x * 2 + y) and not g.graphs and not g.ready(x, y)


def test_untimed_scopes_are_ranges_only_in_their_own_thread(monkeypatch):
    """core.perf.untimed (a CUDA graph's warm-ups and capture): the scopes inside it stay out of
    SCOPE_TIMES, while another thread's scopes meanwhile (the textual inversion's views) are timed."""
    import threading

    from core import perf

    monkeypatch.setattr(perf, "SCOPE_TIMES", {})
    with perf.untimed():
        with perf.scope("inside"):
            other = threading.Thread(target=lambda: perf.scope("other").__enter__().__exit__(None, None, None))
            other.start()
            other.join()
    with perf.scope("after"):
        pass
    assert set(perf.SCOPE_TIMES) == {"other", "after"}
