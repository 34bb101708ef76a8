"""The torch rasteriser's coverage pass (which triangle is nearest at each pixel) as one Triton
kernel: `fine.coverage: triton` (`auto` on a GPU where Triton imports).

core.rendering.raster._coverage enumerates every (triangle, pixel-in-its-box) candidate as tensors,
in chunks whose sizes the host must read (syncs, then a compaction with `nonzero` a chunk, then two
scatter-reduces). On an H200 at 1024² that took 3.1 ms at 79k faces and 16 ms at 994k
(reports/speed, session 19), and each sync stops the host from queueing the rest of the iteration.
Here a program takes one triangle and walks its pixel box BLOCK pixels at a time: the same edge
functions and depth as _coverage, in the same order of operations, and for each pixel inside an
atomic min of a 64-bit key per pixel:

    key = depth's bits mapped to an order-preserving int32  << 32  |  (2^32 − 1 − triangle id)

so the nearest depth wins and, at equal depth, the larger triangle id (as _coverage's amin, then
amax over the depth's winners). −0.0 is made +0.0 first, so the two zeros tie as they do there.
Nothing is read back on the host. The boxes and what is rejected (behind the camera, zero area,
off-screen) are _coverage's own (raster._boxes). One program walks a whole box, so a triangle that
covers most of a 1024² image takes ~32k steps alone: fine for meshes of thousands of small triangles
(the fine stage's, the texture bake's), not the kernel for a handful of huge ones.

On a GPU the compiler may fuse a multiply and an add where torch rounds twice, so a pixel whose
centre lies on an edge or at an exact depth tie can differ from _coverage's choice; under Triton's
interpreter (CPU, tests/test_coverage_triton.py) the result is _coverage's exactly.

This module imports triton at its top; raster imports it only when the kernel is used.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 32  # pixels a program tests at once: at 1024² a triangle's box is ~1–40 pixels
_LOW = (1 << 32) - 1  # the key's low word: _LOW − triangle id (the larger id, the smaller key)
_EMPTY = (1 << 63) - 1  # no triangle: the largest int64
_LOW_K = tl.constexpr(_LOW)  # the same, for the kernel (a jit function reads constexpr globals only)


@triton.jit
def _corners(ptr, t):
    """Triangle t's three values of (B·F, 3) `ptr`."""
    return tl.load(ptr + t * 3), tl.load(ptr + t * 3 + 1), tl.load(ptr + t * 3 + 2)


@triton.jit
def _cover(tx_ptr, ty_ptr, tz_ptr, box_ptr, key_ptr, F, H, W, BLOCK: tl.constexpr):
    t = tl.program_id(0)  # batch · F + triangle
    count = tl.load(box_ptr + t * 4 + 3)  # 0 for a rejected triangle
    if count > 0:
        x0 = tl.load(box_ptr + t * 4)
        y0 = tl.load(box_ptr + t * 4 + 1)
        bw = tl.load(box_ptr + t * 4 + 2)
        X0, X1, X2 = _corners(tx_ptr, t)
        Y0, Y1, Y2 = _corners(ty_ptr, t)
        Z0, Z1, Z2 = _corners(tz_ptr, t)
        A = (X1 - X0) * (Y2 - Y0) - (X2 - X0) * (Y1 - Y0)  # as raster._boxes' area
        sgn = tl.where(A > 0, 1.0, -1.0)  # A ≠ 0 for every triangle with a count
        b = t // F
        low = _LOW_K - (t % F).to(tl.int64)
        for start in range(0, count, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            px = x0 + idx % bw
            py = y0 + idx // bw
            cx = px.to(tl.float32) + 0.5
            cy = py.to(tl.float32) + 0.5
            # raster._coverage's edge functions (signed areas: barycentric i × A) and depth
            e0 = (X1 - cx) * (Y2 - cy) - (X2 - cx) * (Y1 - cy)
            e1 = (X2 - cx) * (Y0 - cy) - (X0 - cx) * (Y2 - cy)
            e2 = (X0 - cx) * (Y1 - cy) - (X1 - cx) * (Y0 - cy)
            z = (e0 * Z0 + e1 * Z1 + e2 * Z2) / A
            inside = (idx < count) & (e0 * sgn >= 0) & (e1 * sgn >= 0) & (e2 * sgn >= 0) & (z >= -1.0) & (z <= 1.0)
            zi = (z + 0.0).to(tl.int32, bitcast=True)  # + 0.0: −0.0 → +0.0
            zk = zi ^ ((zi >> 31) & 0x7FFFFFFF)  # float order as int32 order
            key = (zk.to(tl.int64) << 32) | low
            tl.atomic_min(key_ptr + (b * H + py).to(tl.int64) * W + px, key, mask=inside)


def triton_coverage(tx: torch.Tensor, ty: torch.Tensor, tz: torch.Tensor, box: torch.Tensor,
                    B: int, F: int, H: int, W: int) -> torch.Tensor:
    """The nearest triangle's index at each pixel (B, H, W), −1 where none, from raster._boxes'
    screen-space corners tx, ty, tz (B·F, 3) float32 and boxes (B·F, 4) int32 (x0, y0, width, count)."""
    key = torch.full((B * H * W,), _EMPTY, dtype=torch.int64, device=tx.device)
    if B * F > 0:
        _cover[(B * F,)](tx, ty, tz, box, key, F, H, W, BLOCK=BLOCK)
    best = torch.where(key == _EMPTY, -1, _LOW - (key & _LOW))
    return best.view(B, H, W)
