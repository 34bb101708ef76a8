"""GroupNorm as Triton kernels that spread each group over many programs: the 'lift3d' `vae_kernels`
of the priors' VAE encoders (core.guidance.sd.use_vae_kernels).

In SDS the render's gradient goes back through the VAE encoder at every guided iteration (the ∂z/∂I
of Magic123 eq. 5), at batch 1. PyTorch's GroupNorm kernel reduces each (sample, group) in one
thread block, so at batch 1 with 32 groups the statistics of a 128-channel 512² activation run on
32 blocks of a 132-SM card (~145 µs a call on an H200, where reading the tensor takes ~15 µs;
reports/speed session 16). Here the (sample, group) row of M = (C/G)·H·W elements is cut into
chunks of CHUNK and every chunk is a program:

  forward   1. each chunk's count, mean and M2 = Σ (x − mean_chunk)² (fp32, exact within the chunk);
            2. each chunk combines its row's partials (Chan et al.'s parallel formula:
               mean = Σ n_i·mean_i / M, M2 = Σ M2_i + n_i·(mean_i − mean)²), var = M2 / M (biased,
               as torch), rstd = 1/√(var + eps), and writes y = (x − mean)·rstd·w_c + b_c;
  backward  with x̂ = (x − mean)·rstd and g = w_c·dy, dx = rstd·(g − mean(g) − x̂·mean(g·x̂)) over the
            row: 1. the chunks' Σ g and Σ g·x̂; 2. each chunk sums its row's partials and writes dx.

Everything is computed in fp32 and stored in x's dtype. The weight and bias gradients (not needed in
SDS: the VAE is frozen) are computed with torch ops when they are asked for. Inputs must be NCHW
contiguous, or dense with the channels innermost (channels-last; `sd.channels_last`: cuDNN's NHWC
convolutions without a layout conversion around each; a row's elements are then taken pixel by
pixel, its CG channels adjacent), on a CUDA device (or CPU tensors under TRITON_INTERPRET=1, the
tests); `TritonGroupNorm` falls back to torch's GroupNorm otherwise and under torch.compile
(Inductor fuses it there).

This module imports triton at its top; core.guidance.sd imports it only when the kernels are used.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import triton
import triton.language as tl
from torch import nn
from torch.autograd.function import once_differentiable

from core.representations.hashgrid import triton_interpreting

CHUNK = 4096     # elements a program (32 fp32 registers a thread at 4 warps)
MAX_CHUNKS = 4096  # chunks a row: beyond (rows of > 16M elements) torch's kernel is used
# rows shorter than this (the module) stay on torch's kernel: there its one block a row is quick, and
# the two Triton launches and the autograd Function cost more host time than torch's one launch (the
# encoder at 256² was launch-bound: 11.1 ms an encode with torch's GroupNorm, 17.8 with every
# GroupNorm here, reports/speed session 16). 2^18: SD's encoder at 512² runs its first three
# resolutions' GroupNorms (rows of 1M, 512K and 256K elements) here, its 64² ones on torch's
MIN_ROW = 1 << 18
# in a CUDA graph a launch costs the host nothing, so the graphs over the VAE encoder
# (core.guidance.sd.graph_vae_moments) are captured with rows of at least this on the kernels
# (`min_row_within`): there torch's one block a row is all that is left of the launch-bound case above
GRAPH_MIN_ROW = 0
# the partials a program combines: at least this many (masked), so that rows of 1 to 256 chunks
# share one compiled kernel; with the sizes not specialised (do_not_specialize) each kernel compiles
# once a dtype (a fresh process compiled nine variants in ~10 s before, session 16)
MIN_BLOCK_S = 256


@triton.jit
def _at(row, offs, M, HW, CG, G, CL: tl.constexpr):
    """Elements `offs` of row `row` (sample row // G, group row % G): their offsets in the tensor
    (int64) and their channels. NCHW: the row is one contiguous run, channel by channel
    (offs = (c − g·CG)·HW + pixel). Channels-last (CL): pixel by pixel (offs = pixel·CG + c − g·CG),
    each pixel's CG channels adjacent and pixels C = G·CG elements apart."""
    g = row % G
    if CL:
        j = offs % CG
        addr = (row // G).to(tl.int64) * M * G + (offs // CG).to(tl.int64) * (CG * G) + g * CG + j
        c = g * CG + j
    else:
        addr = row.to(tl.int64) * M + offs
        c = g * CG + offs // HW
    return addr, c


@triton.jit(do_not_specialize=["M", "S", "HW", "CG", "G"])
def _chunk_stats(x_ptr, part_ptr, M, S, HW, CG, G, CHUNK: tl.constexpr, CL: tl.constexpr):
    """part[row, s] = (mean, M2) of chunk s of row `row`."""
    row = tl.program_id(0)
    s = tl.program_id(1)
    offs = s * CHUNK + tl.arange(0, CHUNK)
    m = offs < M
    addr, _ = _at(row, offs, M, HW, CG, G, CL)
    x = tl.load(x_ptr + addr, mask=m, other=0.0).to(tl.float32)
    cnt = tl.minimum(M - s * CHUNK, CHUNK).to(tl.float32)
    mean = tl.sum(x, axis=0) / cnt
    d = tl.where(m, x - mean, 0.0)
    base = (row * S + s) * 2
    tl.store(part_ptr + base, mean)
    tl.store(part_ptr + base + 1, tl.sum(d * d, axis=0))


@triton.jit
def _row_stats(part_ptr, row, M, S, eps, CHUNK: tl.constexpr, BLOCK_S: tl.constexpr):
    """The row's mean and rstd from its chunks' (mean, M2) (Chan's parallel combination)."""
    si = tl.arange(0, BLOCK_S)
    ms = si < S
    pm = tl.load(part_ptr + (row * S + si) * 2, mask=ms, other=0.0)
    pm2 = tl.load(part_ptr + (row * S + si) * 2 + 1, mask=ms, other=0.0)
    cnt = tl.where(ms, tl.minimum(M - si * CHUNK, CHUNK).to(tl.float32), 0.0)
    mean = tl.sum(cnt * pm, axis=0) / M
    dm = tl.where(ms, pm - mean, 0.0)
    var = tl.sum(pm2 + cnt * dm * dm, axis=0) / M
    return mean, 1.0 / tl.sqrt(var + eps)


@triton.jit(do_not_specialize=["M", "S", "HW", "CG", "G"])
def _normalize(x_ptr, y_ptr, part_ptr, w_ptr, b_ptr, stats_ptr, M, S, HW, CG, G, eps,
               CHUNK: tl.constexpr, BLOCK_S: tl.constexpr, CL: tl.constexpr):
    row = tl.program_id(0)
    s = tl.program_id(1)
    mean, rstd = _row_stats(part_ptr, row, M, S, eps, CHUNK, BLOCK_S)
    if s == 0:
        tl.store(stats_ptr + row * 2, mean)
        tl.store(stats_ptr + row * 2 + 1, rstd)
    offs = s * CHUNK + tl.arange(0, CHUNK)
    m = offs < M
    addr, c = _at(row, offs, M, HW, CG, G, CL)  # the elements' offsets and channels
    x = tl.load(x_ptr + addr, mask=m, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + c, mask=m, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + c, mask=m, other=0.0).to(tl.float32)
    y = (x - mean) * rstd * w + b
    tl.store(y_ptr + addr, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _chunk_grads(x_ptr, dy_ptr, w_ptr, stats_ptr, row, s, M, HW, CG, G, CHUNK: tl.constexpr, CL: tl.constexpr):
    """Chunk s of row `row`: its elements' offsets in the tensor, mask, x̂ = (x − mean)·rstd,
    g = w_c·dy (fp32) and rstd."""
    mean = tl.load(stats_ptr + row * 2)
    rstd = tl.load(stats_ptr + row * 2 + 1)
    offs = s * CHUNK + tl.arange(0, CHUNK)
    m = offs < M
    addr, c = _at(row, offs, M, HW, CG, G, CL)
    x = tl.load(x_ptr + addr, mask=m, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + addr, mask=m, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + c, mask=m, other=0.0).to(tl.float32)
    return addr, m, (x - mean) * rstd, w * dy, rstd


@triton.jit(do_not_specialize=["M", "S", "HW", "CG", "G"])
def _backward_sums(x_ptr, dy_ptr, w_ptr, stats_ptr, part_ptr, M, S, HW, CG, G, CHUNK: tl.constexpr,
                   CL: tl.constexpr):
    """part[row, s] = (Σ g, Σ g·x̂) over chunk s, g = w_c·dy."""
    row = tl.program_id(0)
    s = tl.program_id(1)
    addr, m, xhat, g, rstd = _chunk_grads(x_ptr, dy_ptr, w_ptr, stats_ptr, row, s, M, HW, CG, G, CHUNK, CL)
    base = (row * S + s) * 2
    tl.store(part_ptr + base, tl.sum(g, axis=0))  # masked elements load as 0: g = 0 there
    tl.store(part_ptr + base + 1, tl.sum(g * xhat, axis=0))


@triton.jit(do_not_specialize=["M", "S", "HW", "CG", "G"])
def _backward_dx(x_ptr, dy_ptr, w_ptr, stats_ptr, part_ptr, dx_ptr, M, S, HW, CG, G,
                 CHUNK: tl.constexpr, BLOCK_S: tl.constexpr, CL: tl.constexpr):
    row = tl.program_id(0)
    s = tl.program_id(1)
    si = tl.arange(0, BLOCK_S)
    ms = si < S
    mean_g = tl.sum(tl.load(part_ptr + (row * S + si) * 2, mask=ms, other=0.0), axis=0) / M
    mean_gx = tl.sum(tl.load(part_ptr + (row * S + si) * 2 + 1, mask=ms, other=0.0), axis=0) / M
    addr, m, xhat, g, rstd = _chunk_grads(x_ptr, dy_ptr, w_ptr, stats_ptr, row, s, M, HW, CG, G, CHUNK, CL)
    dx = rstd * (g - mean_g - xhat * mean_gx)
    tl.store(dx_ptr + addr, dx.to(dx_ptr.dtype.element_ty), mask=m)


def _layout(x: torch.Tensor, groups: int) -> tuple[int, int, int, int, int]:
    """rows (N·G), M (elements a row), HW, channels a group, chunks a row."""
    n, c = x.shape[:2]
    hw = x[0, 0].numel()
    m = (c // groups) * hw
    return n * groups, m, hw, c // groups, triton.cdiv(m, CHUNK)


def _channels_last(x: torch.Tensor) -> bool:
    """x (N, C, …) is dense with its channels innermost (4-D: torch.channels_last; 3-D: (N, C, L) as
    the transpose of a contiguous (N, L, C), the attention block's GroupNorm input) but not dense in
    the default layout (a tensor dense in both, as with 1×1 images, takes the NCHW path)."""
    return x.dim() >= 3 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


def _like(t: torch.Tensor, cl: bool) -> torch.Tensor:
    """t (x's shape) dense in x's layout: channels innermost where `cl`, else contiguous."""
    return t.movedim(1, -1).contiguous().movedim(-1, 1) if cl else t.contiguous()


def _block_s(chunks: int) -> int:
    """The partials a program loads to combine a row of `chunks` chunks (MIN_BLOCK_S at least)."""
    return max(MIN_BLOCK_S, triton.next_power_of_2(chunks))


class TritonGroupNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, groups, weight, bias, eps):
        rows, m, hw, cg, s = _layout(x, groups)
        block_s = _block_s(s)
        part = torch.empty(rows, s, 2, device=x.device, dtype=torch.float32)
        stats = torch.empty(rows, 2, device=x.device, dtype=torch.float32)
        cl = _channels_last(x)
        y = torch.empty_like(x)  # x's layout
        _chunk_stats[(rows, s)](x, part, m, s, hw, cg, groups, CHUNK=CHUNK, CL=cl)
        _normalize[(rows, s)](x, y, part, weight, bias, stats, m, s, hw, cg, groups, eps, CHUNK=CHUNK, BLOCK_S=block_s,
                              CL=cl)
        ctx.save_for_backward(x, weight, stats)
        ctx.groups, ctx.cl = groups, cl
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, stats = ctx.saved_tensors
        groups, cl = ctx.groups, ctx.cl
        dy = _like(dy, cl)  # x's layout
        rows, m, hw, cg, s = _layout(x, groups)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            part = torch.empty(rows, s, 2, device=x.device, dtype=torch.float32)
            dx = torch.empty_like(x)
            _backward_sums[(rows, s)](x, dy, weight, stats, part, m, s, hw, cg, groups, CHUNK=CHUNK, CL=cl)
            _backward_dx[(rows, s)](x, dy, weight, stats, part, dx, m, s, hw, cg, groups,
                                    CHUNK=CHUNK, BLOCK_S=_block_s(s), CL=cl)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:  # torch ops: not on SDS's path
            n, c = x.shape[:2]
            mean, rstd = (t.view(n, groups, 1) for t in stats.unbind(-1))
            xhat = ((x.float().reshape(n, groups, -1) - mean) * rstd).view(n, c, -1)  # reshape: either layout
            dyf = dy.float().reshape(n, c, -1)
            dw = (dyf * xhat).sum((0, 2)).to(weight.dtype) if ctx.needs_input_grad[2] else None
            db = dyf.sum((0, 2)).to(weight.dtype) if ctx.needs_input_grad[3] else None
        return dx, None, dw, db, None


def runs_here(x: torch.Tensor, groups: int, min_row: int = 0) -> bool:
    """The kernels take x: NCHW-contiguous (any trailing dims) or dense with its channels innermost
    (channels-last), on a CUDA device or interpreted, rows of at least `min_row` and at most
    CHUNK·MAX_CHUNKS elements."""
    if x.dim() < 3 or not (x.is_contiguous() or _channels_last(x)) or x.shape[1] % groups:
        return False
    if not (x.is_cuda or (x.device.type == "cpu" and triton_interpreting())):
        return False
    _, m, _, _, chunks = _layout(x, groups)
    return m >= min_row and chunks <= MAX_CHUNKS


def group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5):
    """torch.nn.functional.group_norm(x, groups, weight, bias, eps) by the kernels above (affine only)."""
    return TritonGroupNormFn.apply(x, groups, weight, bias, eps)


class TritonGroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters and state dict) whose forward runs the kernels above where they
    apply (`runs_here`, rows of at least `min_row` elements, affine, not under torch.compile) and
    torch's GroupNorm elsewhere."""

    min_row = MIN_ROW

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.affine and not torch.compiler.is_compiling() and runs_here(x, self.num_groups, self.min_row):
            return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x)


@contextmanager
def min_row_within(module: nn.Module, min_row: int):
    """Every TritonGroupNorm in `module` takes rows of at least `min_row` onto the kernels inside the
    block (what a CUDA graph captured there keeps) and its own `min_row` again after it."""
    norms = [m for m in module.modules() if isinstance(m, TritonGroupNorm)]
    own = [m.__dict__.get("min_row") for m in norms]
    for m in norms:
        m.min_row = min_row
    try:
        yield
    finally:
        for m, value in zip(norms, own):
            if value is None:
                del m.min_row
            else:
                m.min_row = value
