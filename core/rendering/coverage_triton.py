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
Nothing is read back on the host. Each program first projects its triangle's three corners from the
clip positions and finds its box and whether it is rejected (behind the camera, zero area,
off-screen) as raster._boxes does, in the same order of operations: one launch where _boxes' ~60
tensor operations over the faces were as many launches from the host (session 23). One program
walks a whole box, so a triangle that covers most of a 1024² image takes ~32k steps alone: fine for
meshes of thousands of small triangles (the fine stage's, the texture bake's), not the kernel for a
handful of huge ones.

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
def _screen_corner(pos_ptr, tri_ptr, b, f, i, V, H, W):
    """Corner i of triangle f in view b: raster._screen's pixel-space x, y and z/w, and w, from the
    clip positions (B, V, 4) and the faces (F, 3), in _screen's order of operations."""
    v = tl.load(tri_ptr + f * 3 + i).to(tl.int64)
    at = (b * V + v) * 4
    x, y, z, w = tl.load(pos_ptr + at), tl.load(pos_ptr + at + 1), tl.load(pos_ptr + at + 2), tl.load(pos_ptr + at + 3)
    return (x / w * 0.5 + 0.5) * W, (y / w * 0.5 + 0.5) * H, z / w, w


@triton.jit
def _cover(pos_ptr, tri_ptr, key_ptr, F, V, H, W, BLOCK: tl.constexpr):
    t = tl.program_id(0)  # batch · F + triangle
    b = t // F
    f = t % F
    X0, Y0, Z0, W0 = _screen_corner(pos_ptr, tri_ptr, b, f, 0, V, H, W)
    X1, Y1, Z1, W1 = _screen_corner(pos_ptr, tri_ptr, b, f, 1, V, H, W)
    X2, Y2, Z2, W2 = _screen_corner(pos_ptr, tri_ptr, b, f, 2, V, H, W)
    # raster._boxes: the signed doubled area, the pixel box, and what is rejected (a corner behind the
    # camera, zero area, entirely off-screen)
    A = (X1 - X0) * (Y2 - Y0) - (X2 - X0) * (Y1 - Y0)
    xmin, xmax = tl.minimum(tl.minimum(X0, X1), X2), tl.maximum(tl.maximum(X0, X1), X2)
    ymin, ymax = tl.minimum(tl.minimum(Y0, Y1), Y2), tl.maximum(tl.maximum(Y0, Y1), Y2)
    x0 = tl.minimum(tl.maximum(tl.ceil(xmin - 0.5), 0.0), W - 1.0)
    x1 = tl.minimum(tl.maximum(tl.floor(xmax - 0.5), -1.0), W - 1.0)
    y0 = tl.minimum(tl.maximum(tl.ceil(ymin - 0.5), 0.0), H - 1.0)
    y1 = tl.minimum(tl.maximum(tl.floor(ymax - 0.5), -1.0), H - 1.0)
    ok = (W0 > 1e-8) & (W1 > 1e-8) & (W2 > 1e-8) & (tl.abs(A) > 1e-12)
    ok = ok & ~((xmax < 0.5) | (xmin > W - 0.5) | (ymax < 0.5) | (ymin > H - 0.5))
    if ok:
        bw = tl.maximum(x1 - x0 + 1.0, 0.0).to(tl.int32)
        count = bw * tl.maximum(y1 - y0 + 1.0, 0.0).to(tl.int32)
        sgn = tl.where(A > 0, 1.0, -1.0)  # A ≠ 0 for every triangle kept
        low = _LOW_K - f.to(tl.int64)
        x0i = x0.to(tl.int32)
        y0i = y0.to(tl.int32)
        for start in range(0, count, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            px = x0i + idx % bw
            py = y0i + idx // bw
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


def triton_coverage(pos: torch.Tensor, tri: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """The nearest triangle's index at each pixel (B, H, W), −1 where none, from the clip positions
    pos (B, V, 4) float32 and the faces tri (F, 3): one program a (view, triangle), which projects its
    corners, rejects it or finds its pixel box as raster._boxes does, then walks the box."""
    B, V = pos.shape[0], pos.shape[1]
    F = tri.shape[0]
    key = torch.full((B * H * W,), _EMPTY, dtype=torch.int64, device=pos.device)
    if B * F > 0:
        _cover[(B * F,)](pos.float().contiguous(), tri.contiguous(), key, F, V, H, W, BLOCK=BLOCK)
    best = torch.where(key == _EMPTY, -1, _LOW - (key & _LOW))
    return best.view(B, H, W)
