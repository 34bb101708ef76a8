"""core.guidance.group_norm_triton (`sd.vae_kernels` / `zero123.vae_kernels: lift3d`): the Triton
GroupNorm gives torch's GroupNorm, forward and backward, and the tiny real VAE encoder on lift3d's
kernels gives diffusers' moments and image gradient. The kernels run on CPU tensors through Triton's
interpreter in a child process (tests/_interpreted.py); the tensors come back here. On the GPU:
tests/test_gpu_backends.py."""
from __future__ import annotations

import pytest
import torch
from _interpreted import run_interpreted
from _tiny_priors import tiny_models

# (shape, groups, channels-last): rows shorter than a chunk, rows of several chunks with a ragged last
# one, channels that straddle chunks (HW < chunk), a 3-D input, batch > 1; channels-last inputs
# (`sd.channels_last`): a row's pixels then straddle chunks, with one and with several channels a group
CASES = [((1, 8, 33, 35), 4, False), ((2, 12, 70, 70), 3, False), ((1, 4, 5), 2, False), ((1, 8, 16, 16), 2, False),
         ((3, 6, 9, 11), 6, False), ((2, 12, 70, 70), 3, True), ((1, 8, 33, 35), 8, True), ((3, 6, 9, 11), 2, True),
         ((2, 8, 300), 4, True)]

_CHILD = r"""
import sys, torch
import torch.nn.functional as F
from core.guidance.group_norm_triton import TritonGroupNorm, group_norm, runs_here
from core.guidance.sd import lift3d_encoder_kernels, vae_moments
from diffusers import AutoencoderKL

cases, tiny_sd, out = eval(sys.argv[1]), sys.argv[2], sys.argv[3]
gen = torch.Generator().manual_seed(0)
res = {"cases": []}
for shape, groups, cl in cases:
    x = torch.randn(shape, generator=gen) * 3 + 5   # an offset mean: the variance must not cancel
    w, b = torch.randn(shape[1], generator=gen), torch.randn(shape[1], generator=gen)
    up = torch.randn(shape, generator=gen)
    if cl:  # channels innermost: 4-D torch.channels_last, 3-D the transpose of a contiguous (N, L, C)
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    r = {"runs_here": runs_here(x, groups), "cl": x.movedim(1, -1).is_contiguous() and not x.is_contiguous()}
    for name, fn in (("torch", F.group_norm), ("triton", group_norm)):
        xx, ww, bb = (t.clone().requires_grad_(True) for t in (x, w, b))
        y = fn(xx, groups, ww, bb, 1e-6)
        (y * up).sum().backward()
        r[name] = dict(y=y.detach(), dx=xx.grad, dw=ww.grad, db=bb.grad, fn=type(y.grad_fn).__name__,
                       layouts=(y.stride() == x.stride(), xx.grad.stride() == x.stride()))
    # the upstream gradient in the other layout (the backward takes x's)
    xx = x.clone().requires_grad_(True)
    other = up.contiguous() if cl else up.movedim(1, -1).contiguous().movedim(-1, 1)
    (group_norm(xx, groups, w, b, 1e-6) * other).sum().backward()
    r["dx_other_layout"] = xx.grad
    xh = x.half()
    r["half"] = dict(torch=F.group_norm(xh.float(), groups, w, b, 1e-6), triton=group_norm(xh, groups, w.half(), b.half(), 1e-6))
    res["cases"].append(r)

# the module: frozen weights (no weight gradient asked), an input dense in neither layout falls back to torch's
m = torch.nn.GroupNorm(2, 8).requires_grad_(False)
m.__class__ = TritonGroupNorm
m.min_row = 4 * 144  # rows of 4 channels × 12²: the kernels; the 11² input below: torch's
x = torch.randn(1, 8, 12, 12, generator=gen).requires_grad_(True)
y = m(x)
y.square().sum().backward()
res["module"] = dict(fn=type(y.grad_fn).__name__, dx=x.grad,
                     fallback=type(m(x.detach().transpose(2, 3).requires_grad_(True)).grad_fn).__name__,
                     channels_last=type(m(x.detach().to(memory_format=torch.channels_last).requires_grad_(True)).grad_fn).__name__,
                     short=type(m(torch.randn(1, 8, 11, 11).requires_grad_(True)).grad_fn).__name__)

# min_row_within: short rows on the kernels inside the block, each norm's own min_row after it (its
# instance value, or the class's); graph_group_norms: what a VAE graph's capture runs in
from core.guidance.group_norm_triton import GRAPH_MIN_ROW, MIN_ROW, min_row_within
from core.guidance.sd import graph_group_norms
m2 = torch.nn.GroupNorm(2, 8).requires_grad_(False)
m2.__class__ = TritonGroupNorm  # the class's min_row
short_x = torch.randn(1, 8, 11, 11).requires_grad_(True)
kind = lambda q: type(q(short_x).grad_fn).__name__  # noqa: E731
before = [kind(m), kind(m2)]
with min_row_within(torch.nn.Sequential(m, m2), 1):
    inside = [kind(m), kind(m2)]
res["within"] = dict(before=before, inside=inside, after=[kind(m), kind(m2)], m_row=m.min_row,
                     m2_own="min_row" in m2.__dict__, m2_row=m2.min_row, class_row=MIN_ROW)
vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae")
lift3d_encoder_kernels(vae.encoder)
rows = lambda: sorted({q.min_row for q in vae.encoder.modules() if isinstance(q, TritonGroupNorm)})  # noqa: E731
with graph_group_norms(vae):
    inside = rows()
res["graph_rows"] = dict(inside=inside, after=rows(), graph=GRAPH_MIN_ROW)

# the tiny real VAE encoder, diffusers' kernels against lift3d's: moments and the image gradient
img = torch.rand(1, 3, 64, 64, generator=gen)
enc = {}
for kind in ("diffusers", "lift3d", "lift3d channels-last"):
    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae").eval().requires_grad_(False)
    if kind == "lift3d channels-last":
        vae.to(memory_format=torch.channels_last)  # what sd.channels_last does (core.guidance.sd.to_channels_last)
    if kind != "diffusers":
        lift3d_encoder_kernels(vae.encoder)
        for q in vae.encoder.modules():
            if isinstance(q, TritonGroupNorm):
                q.min_row = 1  # the tiny encoder's rows are all short: every GroupNorm on the kernels
    seen = []  # the layouts the GroupNorms are given
    hooks = [q.register_forward_pre_hook(lambda q, a: seen.append(a[0].movedim(1, -1).is_contiguous()
                                                                    and not a[0].is_contiguous()))
             for q in vae.encoder.modules() if isinstance(q, torch.nn.GroupNorm)]
    xx = img.clone().requires_grad_(True)
    mean, std = vae_moments(vae, xx)
    (mean.square().sum() + std.sum()).backward()
    enc[kind] = dict(mean=mean.detach(), std=std.detach(), grad=xx.grad,
                     triton_norms=sum(type(q) is TritonGroupNorm for q in vae.encoder.modules()),
                     channels_last_inputs=sum(seen), inputs=len(seen))
res["encoder"] = enc
torch.save(res, out)
"""


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    return run_interpreted(_CHILD, tmp_path_factory.mktemp("gn") / "results.pt", repr(CASES), tiny_models()["sd"])


@pytest.mark.parametrize("case", range(len(CASES)))
def test_triton_group_norm_equals_torch_forward_and_backward(interpreted, case):
    r = interpreted["cases"][case]
    assert r["runs_here"] and r["triton"]["fn"] == "TritonGroupNormFnBackward"  # the kernels ran
    assert r["cl"] == CASES[case][2]
    a, b = r["torch"], r["triton"]
    assert b["layouts"] == (True, True)  # the output and the input gradient in x's layout
    torch.testing.assert_close(b["y"], a["y"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b["dx"], a["dx"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r["dx_other_layout"], b["dx"], rtol=0, atol=0)
    torch.testing.assert_close(b["dw"], a["dw"], rtol=1e-4, atol=1e-3)  # sums of many terms, another order
    torch.testing.assert_close(b["db"], a["db"], rtol=1e-4, atol=1e-3)
    h = r["half"]  # fp16 in and out, fp32 inside: within fp16's rounding of the fp32 result
    assert h["triton"].dtype == torch.half
    torch.testing.assert_close(h["triton"].float(), h["torch"], rtol=2e-3, atol=2e-3)


def test_the_module_runs_the_kernels_on_frozen_weights_in_either_layout_and_falls_back_for_others_and_short_rows(interpreted):
    r = interpreted["module"]
    assert r["fn"] == "TritonGroupNormFnBackward" and r["dx"].abs().sum() > 0
    assert r["channels_last"] == "TritonGroupNormFnBackward"
    assert r["fallback"] == r["short"] == "NativeGroupNormBackward0"  # torch's


def test_the_tiny_vae_encoder_on_lift3d_kernels_gives_diffusers_moments_and_gradient(interpreted):
    a = interpreted["encoder"]["diffusers"]
    assert a["triton_norms"] == 0
    for kind in ("lift3d", "lift3d channels-last"):
        b = interpreted["encoder"][kind]
        assert b["triton_norms"] > 0
        # channels-last weights: every GroupNorm of the encoder is given an activation with its
        # channels innermost (the attention's own, 3-D, too); NCHW weights: most are NCHW (those
        # after the attention block are not: its output is (b, h·w, c) memory viewed as NCHW, and
        # the residual sum keeps that layout)
        cl, n = b["channels_last_inputs"], b["inputs"]
        assert n > 0 and (cl == n if kind.endswith("channels-last") else cl < n / 2)
        for key in ("mean", "std", "grad"):
            assert a[key].abs().max() > 0
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)


def test_min_row_within_puts_short_rows_on_the_kernels_for_the_block_only(interpreted):
    """What a VAE graph is captured in (core.guidance.sd.graph_group_norms): every lift3d GroupNorm of
    the encoder takes rows of at least GRAPH_MIN_ROW onto the kernels, and its own threshold after."""
    w = interpreted["within"]
    assert w["before"] == ["NativeGroupNormBackward0"] * 2  # 8/2 channels × 11² = 484 < both thresholds
    assert w["inside"] == ["TritonGroupNormFnBackward"] * 2
    assert w["after"] == w["before"]
    assert w["m_row"] == 4 * 144 and not w["m2_own"] and w["m2_row"] == w["class_row"]
    g = interpreted["graph_rows"]
    assert g["inside"] == [g["graph"]] and g["after"] == [w["class_row"]]
