"""The hash grid's table lookup as two fused Triton kernels: the 'triton' backend of `hashgrid.HashGrid`.

The torch backend builds (N, L, 8) corner rows, weights and hash temporaries (~1 KB a point at 16
levels); here one program takes a block of points at one level and keeps everything in registers:
  forward   out[n, l·F + f] = Σ_k w_k · table[row_k, f]   (the 8 corners k of the point's cell)
  backward  d table[row_k, f] += w_k · d out[n, l·F + f]  (atomic adds, fp32)
with the formulas of the module docstring of `hashgrid.py`: Instant-NGP (Müller et al. 2022) eq. 3
(per-level scale b) and eq. 4 (the spatial hash π1 = 1, π2 = 2654435761, π3 = 805459861, XOR,
modulo the table size), tiny-cuda-nn's `grid.h` layout (scale_l = 2^(l·log2 b)·N_min − 1,
p = scale_l·u + 0.5, dense indexing c_x + c_y·res + c_z·res² on the coarse levels, one flat table
level after level, F features per entry). Everything here follows `HashGrid.corner_indices`: the
same float32 level scales (`level_layout`), the same corner order k = (k&1, k>>1&1, k>>2&1) in
(x, y, z), the same weight products, fp32 throughout. The table is differentiated, and the positions
too where the grid is asked to (`HashGrid.position_grads`, the fine stage's colour field: its points
are the mesh's, so the colour loss reaches the vertices through them); first-order only, so positions
whose gradient is differentiated again (analytic normals) take the torch path (`HashGrid.forward`):
  d out[n, l·F + f] / d u_d = scale_l · Σ_k ∂w_k/∂frac_d · table[row_k, f],   ∂w_k/∂frac_d = ±Π_{e≠d} w_k,e
(+ where the corner's bit on axis d is 1, − where it is 0), as torch differentiates frac = p − floor(p).
Each level writes its share into a (L, N, 3) buffer summed after, in a fixed order (no atomics).

The backward's atomic adds (`HashGrid.atomics`, params `coarse.grid.atomics`): 'scalar' adds each
point's w · d out at each corner; 'runs', on the dense levels, first sums a run of
consecutive points in one cell (a segmented scan over the block: the renderer hands each ray's
samples over one after another, and at the coarse levels several fall in one cell) and adds the sum
once a corner from the run's last point. The same sums up to the order of the float adds, which the
atomics leave open anyway. On an H200, 2^22 points laid out as the renderer's (hashgrid_check.py):
10.30 → 6.01 ms the table gradient; on random points, which make no runs, 7.02 → 7.21 ms. Adding a
row's two features with one paired fp32×2 reduction (`red.global.add.v2.f32`, sm_90, inline PTX)
was tried in session 33 and gained nothing (10.22 → 9.96 and 6.94 → 7.21 ms): the L2 counts the
adds, not the instructions.

This module imports triton at its top: `hashgrid.py` imports it only when the 'triton' backend runs.
With TRITON_INTERPRET=1 in the environment before triton is imported (triton reads it when it
decorates a kernel, its own library functions included) the kernels run on CPU tensors through
Triton's interpreter; the tests run them that way in a child process.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

BLOCK = 128  # points per program


@triton.jit
def _level_cell(u_ptr, pts, m, scale):
    """The point's cell corner c = floor(p) and fraction p − c, p = scale·u + 0.5 (tcnn `pos_fract`)."""
    ux = tl.load(u_ptr + pts * 3 + 0, mask=m, other=0.0)
    uy = tl.load(u_ptr + pts * 3 + 1, mask=m, other=0.0)
    uz = tl.load(u_ptr + pts * 3 + 2, mask=m, other=0.0)
    px = ux * scale + 0.5  # a multiply then an add, as torch rounds them (launched without FMA fusion)
    py = uy * scale + 0.5
    pz = uz * scale + 0.5
    fx0 = tl.floor(px)
    fy0 = tl.floor(py)
    fz0 = tl.floor(pz)
    return fx0.to(tl.int32), fy0.to(tl.int32), fz0.to(tl.int32), px - fx0, py - fy0, pz - fz0


@triton.jit
def _corner(cx, cy, cz, fx, fy, fz, K: tl.constexpr, dense, res, entries, offset, hash_mask):
    """Corner K of the cell: its table row (int64) and trilinear weight."""
    BX: tl.constexpr = K & 1
    BY: tl.constexpr = (K >> 1) & 1
    BZ: tl.constexpr = (K >> 2) & 1
    x = cx + BX
    y = cy + BY
    z = cz + BZ
    if dense:
        # dense level: c_x + c_y·res + c_z·res², modulo the level's entries (the far face wraps, as in tcnn)
        idx = (x + y * res + z * res * res) % entries
    else:
        # Instant-NGP eq. 4 in uint32 arithmetic (products wrap mod 2^32), then modulo 2^T
        h = x.to(tl.uint32) ^ (y.to(tl.uint32) * 2654435761) ^ (z.to(tl.uint32) * 805459861)
        idx = (h & hash_mask).to(tl.int32)
    wx = fx if BX else 1.0 - fx
    wy = fy if BY else 1.0 - fy
    wz = fz if BZ else 1.0 - fz
    return idx.to(tl.int64) + offset, (wz * wy) * wx


@triton.jit
def _corner_slopes(fx, fy, fz, K: tl.constexpr):
    """∂w/∂frac on each axis of corner K's trilinear weight w = wx·wy·wz (_corner): ±wy·wz, ±wx·wz, ±wx·wy."""
    BX: tl.constexpr = K & 1
    BY: tl.constexpr = (K >> 1) & 1
    BZ: tl.constexpr = (K >> 2) & 1
    wx = fx if BX else 1.0 - fx
    wy = fy if BY else 1.0 - fy
    wz = fz if BZ else 1.0 - fz
    sx = wz * wy if BX else -(wz * wy)
    sy = wz * wx if BY else -(wz * wx)
    sz = wy * wx if BZ else -(wy * wx)
    return sx, sy, sz


@triton.jit
def _program_cells(u_ptr, scales_ptr, res_ptr, entries_ptr, offsets_ptr, n_points, n_dense,
                   F: tl.constexpr, FP: tl.constexpr, BLOCK: tl.constexpr):
    """What both kernels start from: program (i, l)'s points, their feature mask, level l's layout
    and each point's cell and fractions at that level."""
    lvl = tl.program_id(1)
    pts = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = pts < n_points
    feat = tl.arange(0, FP)
    fm = m[:, None] & (feat < F)[None, :]
    scale = tl.load(scales_ptr + lvl)
    res = tl.load(res_ptr + lvl).to(tl.int32)
    entries = tl.load(entries_ptr + lvl).to(tl.int32)
    offset = tl.load(offsets_ptr + lvl).to(tl.int64)
    dense = lvl < n_dense
    cx, cy, cz, fx, fy, fz = _level_cell(u_ptr, pts, m, scale)
    return lvl, pts, feat, fm, res, entries, offset, dense, cx, cy, cz, fx, fy, fz


@triton.jit
def _forward_kernel(u_ptr, table_ptr, out_ptr, scales_ptr, res_ptr, entries_ptr, offsets_ptr,
                    n_points, n_dense, hash_mask,
                    LEVELS: tl.constexpr, F: tl.constexpr, FP: tl.constexpr, BLOCK: tl.constexpr):
    """Program (i, l): points i·BLOCK … (i+1)·BLOCK − 1 at level l → out[n, l·F : (l+1)·F]."""
    lvl, pts, feat, fm, res, entries, offset, dense, cx, cy, cz, fx, fy, fz = _program_cells(
        u_ptr, scales_ptr, res_ptr, entries_ptr, offsets_ptr, n_points, n_dense, F, FP, BLOCK)
    acc = tl.zeros((BLOCK, FP), dtype=tl.float32)
    for k in tl.static_range(8):
        row, w = _corner(cx, cy, cz, fx, fy, fz, k, dense, res, entries, offset, hash_mask)
        v = tl.load(table_ptr + row[:, None] * F + feat[None, :], mask=fm, other=0.0)
        acc += w[:, None] * v
    tl.store(out_ptr + pts[:, None] * (LEVELS * F) + lvl * F + feat[None, :], acc, mask=fm)


@triton.jit
def _backward_kernel(u_ptr, grad_ptr, grad_table_ptr, table_ptr, grad_u_ptr, scales_ptr, res_ptr, entries_ptr,
                     offsets_ptr, n_points, n_dense, hash_mask,
                     LEVELS: tl.constexpr, F: tl.constexpr, FP: tl.constexpr, BLOCK: tl.constexpr,
                     RUNS: tl.constexpr, TABLE: tl.constexpr, POSITIONS: tl.constexpr):
    """The forward's corners recomputed. TABLE: w · d out added into the table gradient atomically
    (points share corners, within a block and across blocks); RUNS (atomics 'runs'), on the dense
    levels: a run of consecutive points in one cell (a ray's samples at the coarse levels) sums its
    w · d out first (a segmented scan) and adds once a corner, from its last point. POSITIONS: the
    level's share of each point's d/du (the module docstring) stored at grad_u[l, n, :]."""
    lvl, pts, feat, fm, res, entries, offset, dense, cx, cy, cz, fx, fy, fz = _program_cells(
        u_ptr, scales_ptr, res_ptr, entries_ptr, offsets_ptr, n_points, n_dense, F, FP, BLOCK)
    g = tl.load(grad_ptr + pts[:, None] * (LEVELS * F) + lvl * F + feat[None, :], mask=fm, other=0.0)
    if POSITIONS:
        dx = tl.zeros((BLOCK,), dtype=tl.float32)
        dy = tl.zeros((BLOCK,), dtype=tl.float32)
        dz = tl.zeros((BLOCK,), dtype=tl.float32)
        for k in tl.static_range(8):
            row, w_unused = _corner(cx, cy, cz, fx, fy, fz, k, dense, res, entries, offset, hash_mask)
            v = tl.load(table_ptr + row[:, None] * F + feat[None, :], mask=fm, other=0.0)
            gv = tl.sum(v * g, axis=1)  # d out · table row, over the level's features
            sx, sy, sz = _corner_slopes(fx, fy, fz, k)
            dx += gv * sx
            dy += gv * sy
            dz += gv * sz
        scale = tl.load(scales_ptr + lvl)
        at = grad_u_ptr + (lvl.to(tl.int64) * n_points + pts) * 3
        m = pts < n_points
        tl.store(at + 0, dx * scale, mask=m)
        tl.store(at + 1, dy * scale, mask=m)
        tl.store(at + 2, dz * scale, mask=m)
    if TABLE:
        if RUNS and dense:
            scale = tl.load(scales_ptr + lvl)
            first = tl.program_id(0).to(tl.int64) * BLOCK
            last = tl.minimum(first + BLOCK, n_points) - 1
            px, py, pz, _, _, _ = _level_cell(u_ptr, pts - 1, (pts > first) & (pts <= last), scale)
            nx, ny, nz, _, _, _ = _level_cell(u_ptr, pts + 1, pts < last, scale)
            head = (pts == first) | (px != cx) | (py != cy) | (pz != cz)
            tail = (pts >= last) | (nx != cx) | (ny != cy) | (nz != cz)
            flags = tl.broadcast_to(head[:, None].to(tl.int32), (BLOCK, FP))
            for k in tl.static_range(8):
                row, w = _corner(cx, cy, cz, fx, fy, fz, k, dense, res, entries, offset, hash_mask)
                _, total = tl.associative_scan((flags, w[:, None] * g), 0, _segment_sum)
                tl.atomic_add(grad_table_ptr + row[:, None] * F + feat[None, :], total, mask=fm & tail[:, None],
                              sem="relaxed")
        else:
            for k in tl.static_range(8):
                row, w = _corner(cx, cy, cz, fx, fy, fz, k, dense, res, entries, offset, hash_mask)
                tl.atomic_add(grad_table_ptr + row[:, None] * F + feat[None, :], w[:, None] * g, mask=fm,
                              sem="relaxed")


@triton.jit
def _segment_sum(f1, a1, f2, a2):
    """The segmented sum's combine: a head flag (f2) starts a new run."""
    return f1 | f2, tl.where(f2 != 0, a2, a1 + a2)


def _launch(kernel, u: torch.Tensor, *data: torch.Tensor, grid, **flags) -> None:
    """`kernel` over (blocks of BLOCK points, levels), with its tensors `data` after the positions u."""
    n = u.shape[0]
    f = grid.features_per_level
    kernel[(triton.cdiv(n, BLOCK), grid.levels)](
        u, *data, grid.scales, grid.resolutions, grid.entries, grid.offsets, n, grid.n_dense, grid.hash_mask,
        LEVELS=grid.levels, F=f, FP=triton.next_power_of_2(f), BLOCK=BLOCK, num_warps=4, **flags,
        # p = scale·u + 0.5 rounded as a multiply then an add, like the torch backend: a fused
        # multiply-add can move p across a cell boundary at the finest levels (one ulp of p)
        enable_fp_fusion=False)


def encode_forward(table: torch.Tensor, u: torch.Tensor, grid) -> torch.Tensor:
    """u (N, 3) fp32 in [0, 1] → (N, L·F) fp32."""
    out = torch.empty(u.shape[0], grid.output_dim, device=u.device, dtype=torch.float32)
    if u.shape[0]:
        _launch(_forward_kernel, u, table, out, grid=grid)
    return out


def grads(u: torch.Tensor, grad: torch.Tensor, grid, table: torch.Tensor | None = None,
          of_table: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """∂/∂table (entries, F) fp32 of Σ (out · grad) where `of_table`, and ∂/∂u (N, 3) fp32 where the
    `table` values are given (None otherwise), in one launch."""
    n, dev = u.shape[0], u.device
    gt = torch.zeros(grid.n_entries, grid.features_per_level, device=dev, dtype=torch.float32) if of_table else None
    gu = torch.empty(grid.levels, n, 3, device=dev, dtype=torch.float32) if table is not None else None
    if n and (of_table or table is not None):
        keep = torch.empty(0, device=dev, dtype=torch.float32)  # stands for a pointer not read
        _launch(_backward_kernel, u, grad.float().contiguous(), gt if of_table else keep,
                table.detach().float().contiguous() if table is not None else keep, gu if gu is not None else keep,
                grid=grid, RUNS=grid.atomics == "runs", TABLE=of_table, POSITIONS=table is not None)
    # the levels' shares summed in a fixed order: the same bits every run
    return gt, (gu.sum(0) if gu is not None else None)


def table_grad(u: torch.Tensor, grad: torch.Tensor, grid) -> torch.Tensor:
    """∂/∂table of Σ (out · grad): (entries, F) fp32."""
    return grads(u, grad, grid)[0]


class TritonLookup(torch.autograd.Function):
    """The table lookup, differentiable in the table and, where u requires it, in the positions
    (first order: once_differentiable); saves only the positions (12 bytes a point) and the table."""

    @staticmethod
    def forward(ctx, table, u, grid):
        ctx.save_for_backward(u, table)
        ctx.grid = grid
        return encode_forward(table.detach().float().contiguous(), u.detach(), grid)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        u, table = ctx.saved_tensors
        need_table, need_u = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gt, gu = grads(u, grad, ctx.grid, table if need_u else None, of_table=need_table)
        return (gt.to(table.dtype) if gt is not None else None), gu, None


def encode(table: torch.Tensor, u: torch.Tensor, grid) -> torch.Tensor:
    """The 'triton' backend's encoding of positions u (N, 3) in [0, 1]: constants, or positions whose
    gradient is wanted once (HashGrid.position_grads 'triton')."""
    u = u.float().contiguous()
    if torch.is_grad_enabled() and (table.requires_grad or u.requires_grad):
        return TritonLookup.apply(table, u, grid)
    return encode_forward(table.detach().float().contiguous(), u, grid)
