"""Multiresolution hash encoding (Instant-NGP, Müller et al. 2022), as tiny-cuda-nn computes it.

Three backends with one parameter layout, chosen like nerfstudio's `HashEncoding`:
- 'tcnn': tiny-cuda-nn's `tinycudann.Encoding` (when it imports and the device is CUDA);
- 'triton': two fused Triton kernels (`hashgrid_triton.py`) for the table lookup and its table
  gradient (when triton imports and the device is CUDA); positions that need gradients take the
  torch code, on the same `table`;
- 'torch': the pure-PyTorch version below, vectorised over levels and corners.
'auto' picks tcnn, else triton, else torch, and says (logs) which one runs.

What both compute, level by level (l = 0 … L−1), for a point x ∈ [−bound, bound]³ mapped to
u = (x + bound) / 2·bound ∈ [0, 1]³ (tiny-cuda-nn's GridEncoding, `grid.h`):
  per-level scale b     = exp((ln N_max − ln N_min) / (L − 1))
  scale_l               = 2^(l·log2 b) · N_min − 1          (N_min counts grid *vertices*)
  resolution_l          = ceil(scale_l) + 1
  p = scale_l·u + 0.5,  corner c = floor(p),  fraction f = p − c
  entries in level l    = min(next_multiple(resolution_l³, 8), 2^log2_table_size)
  index(c)              = c_x + c_y·res + c_z·res²               when res³ ≤ entries (dense level)
                        = (c_x·1) XOR (c_y·2654435761) XOR (c_z·805459861) (uint32) otherwise
                          ("coherent prime" spatial hash), then modulo the level's entries
  feature               = trilinear interpolation of the 8 corners' F-vectors with weights from f
The output is (N, L·F), level-major. Parameters are one flat table, level after level, entry after
entry, F features per entry: exactly tiny-cuda-nn's layout, so `copy_hashgrid_params` is a copy.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

PRIMES = (1, 2654435761, 805459861)  # tiny-cuda-nn's coherent_prime_hash factors for x, y, z
_U32 = 0xFFFFFFFF


def tcnn_available() -> bool:
    try:
        import tinycudann  # noqa: F401
    except Exception:  # ImportError, or a broken build raising OSError/RuntimeError at import
        return False
    return True


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def triton_kind(setting: str, device, key: str) -> str:
    """What a Triton-or-torch setting (auto | torch | triton; `key` names it, e.g. fine.coverage)
    comes to on `device`: 'auto' is the Triton kernel on a GPU where Triton imports, torch's tensors
    elsewhere; 'triton' off a GPU is a one-line error."""
    if setting not in ("auto", "torch", "triton"):
        raise ValueError(f"unknown {key} {setting!r} (auto | torch | triton)")
    on_gpu = torch.device(device).type == "cuda"
    if setting == "triton" and not (on_gpu and triton_available()):
        from core.errors import Lift3DError

        why = "the device is not CUDA" if not on_gpu else "triton does not import"
        raise Lift3DError(f"{key} is 'triton' but {why}; use {key}=auto or torch")
    if setting == "auto":
        return "triton" if on_gpu and triton_available() else "torch"
    return setting


def triton_interpreting() -> bool:
    """Triton's interpreter is on (TRITON_INTERPRET=1): its kernels run on CPU tensors (the tests)."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except Exception:
        return False


def per_level_scale(levels: int, base_resolution: int, max_resolution: int) -> float:
    """b = exp((ln N_max − ln N_min) / (L − 1)) (Instant-NGP eq. 3; threestudio's config)."""
    if levels <= 1:
        return 1.0
    return float(math.exp((math.log(max_resolution) - math.log(base_resolution)) / (levels - 1)))


def level_layout(levels: int, base_resolution: int, b: float, log2_table_size: int):
    """Per level: scale (float32, as tcnn computes it), resolution, entries, offset, dense flag."""
    log2_b = np.float32(np.log2(np.float32(b)))
    scales, res, entries, offsets, dense = [], [], [], [], []
    offset = 0
    for lvl in range(levels):
        s = np.float32(np.exp2(np.float32(lvl) * log2_b, dtype=np.float32) * np.float32(base_resolution) - np.float32(1.0))
        r = int(math.ceil(float(s))) + 1
        n_dense = min(r ** 3, _U32 // 2)
        n = min(-(-n_dense // 8) * 8, 1 << log2_table_size)
        scales.append(float(s))
        res.append(r)
        entries.append(n)
        offsets.append(offset)
        # tcnn: dense indexing when res ≤ 0x659 (no uint32 overflow) and res³ ≤ entries
        dense.append(r <= 0x659 and r ** 3 <= n)
        offset += n
    return scales, res, entries, offsets, dense, offset


def choose_backend(backend: str, device: torch.device) -> str:
    """The backend `HashGrid(backend=..., device=...)` runs: 'auto' → tcnn, else triton, else torch."""
    if backend not in ("auto", "torch", "tcnn", "triton"):
        raise ValueError(f"hash grid backend must be auto, torch, tcnn or triton, not {backend!r}")
    if backend == "torch":
        return "torch"
    cuda = device.type == "cuda"
    if backend == "triton":
        # on a CPU only under Triton's interpreter (tests); 'auto' never picks it there
        if not (triton_available() and (cuda or triton_interpreting())):
            raise RuntimeError("hash grid backend 'triton' asked for, but triton does not import or the device is not CUDA")
        return "triton"
    ok = tcnn_available() and cuda
    if backend == "tcnn" and not ok:
        raise RuntimeError("hash grid backend 'tcnn' asked for, but tinycudann does not import or the device is not CUDA")
    if ok:
        return "tcnn"
    return "triton" if cuda and triton_available() else "torch"


class HashGrid(nn.Module):
    """x (N, 3) in [−bound, bound]³ → features (N, levels·features_per_level)."""

    def __init__(self, levels: int = 16, features_per_level: int = 2, log2_table_size: int = 19,
                 base_resolution: int = 16, max_resolution: int = 2048, bound: float = 1.0,
                 backend: str = "auto", device: Optional[torch.device | str] = None, seed: int = 1337):
        super().__init__()
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.levels, self.features_per_level = int(levels), int(features_per_level)
        self.log2_table_size, self.base_resolution, self.max_resolution = int(log2_table_size), int(base_resolution), int(max_resolution)
        self.bound = float(bound)
        self.per_level_scale = per_level_scale(levels, base_resolution, max_resolution)
        self.output_dim = self.levels * self.features_per_level
        scales, res, entries, offsets, dense, total = level_layout(
            self.levels, self.base_resolution, self.per_level_scale, self.log2_table_size)
        self.n_entries = total
        self.backend = choose_backend(backend, device)
        if self.backend == "tcnn":
            import tinycudann as tcnn

            self.tcnn_encoding = tcnn.Encoding(3, self.tcnn_config(), seed=seed, dtype=torch.float32).to(device)
            n = self.tcnn_encoding.params.numel()
            if n != total * self.features_per_level:
                raise RuntimeError(f"tinycudann hash grid has {n} parameters, the torch layout {total * self.features_per_level}")
        else:
            g = torch.Generator().manual_seed(seed)
            # tiny-cuda-nn initialises the table uniformly in [−1e−4, 1e−4]
            init = (torch.rand(total, self.features_per_level, generator=g) * 2 - 1) * 1e-4
            self.table = nn.Parameter(init.to(device))
        self.register_buffer("scales", torch.tensor(scales, dtype=torch.float32, device=device), persistent=False)
        self.register_buffer("resolutions", torch.tensor(res, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("entries", torch.tensor(entries, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("dense", torch.tensor(dense, dtype=torch.bool, device=device), persistent=False)
        # tcnn's layout: the dense levels are the coarsest, a prefix; every hash level has 2^T entries
        self.n_dense = int(sum(dense))
        if any(dense[self.n_dense:]) or not all(dense[:self.n_dense]):
            raise RuntimeError("hash grid: dense levels are expected to come first")
        if any(e != (1 << self.log2_table_size) for e in entries[self.n_dense:]):
            raise RuntimeError("hash grid: every hashed level is expected to have 2^log2_table_size entries")
        self.hash_mask = (1 << self.log2_table_size) - 1
        self.recompute_backward = True  # torch backend: see _RecomputedLookup
        self.chunk = 1 << 20  # torch backend (and triton's torch fallback): points per evaluation (0: all at once)
        self.atomics = "runs"  # triton backend: the backward's atomic adds (coarse.grid.atomics: runs | scalar)
        # triton backend, positions that need gradients: 'torch' (any order, double backward included)
        # | 'triton' (the kernels, first order only: fine.grid_position_grads)
        self.position_grads = "torch"
        log.info("hash grid: %s backend (%d levels × %d features, table 2^%d, resolution %d→%d, b=%.4f)",
                 self.backend, self.levels, self.features_per_level, self.log2_table_size,
                 self.base_resolution, self.max_resolution, self.per_level_scale)

    # -------------------------------------------------------------------------------------- backend
    def tcnn_config(self) -> dict:
        return {
            "otype": "HashGrid", "n_levels": self.levels, "n_features_per_level": self.features_per_level,
            "log2_hashmap_size": self.log2_table_size, "base_resolution": self.base_resolution,
            "per_level_scale": self.per_level_scale, "interpolation": "Linear",
        }

    def config(self) -> dict:
        return dict(levels=self.levels, features_per_level=self.features_per_level, log2_table_size=self.log2_table_size,
                    base_resolution=self.base_resolution, max_resolution=self.max_resolution, bound=self.bound)

    @property
    def flat_params(self) -> torch.Tensor:
        """The parameters as tiny-cuda-nn holds them: one flat vector."""
        return self.tcnn_encoding.params if self.backend == "tcnn" else self.table.view(-1)

    # ------------------------------------------------------------------------------------ encoding
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return ((x + self.bound) / (2.0 * self.bound)).clamp(0.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.normalize(x.reshape(-1, 3).float())
        if self.backend == "tcnn":
            return self.tcnn_encoding(u.contiguous()).float()
        if (self.backend == "triton" and (not u.requires_grad or self.position_grads == "triton")
                and self.table.dtype == torch.float32):
            # fused kernels, no (N, L, 8) temporaries: no chunks. Positions that need gradients fall
            # through to the torch code below, which reads the same `self.table` and differentiates
            # again (analytic normals: a double backward), unless the grid is told their gradient is
            # wanted once (position_grads 'triton': the fine stage's colour field, whose points are
            # the mesh's); the kernels differentiate them then, first order only
            from . import hashgrid_triton

            return hashgrid_triton.encode(self.table, u, self)
        c = self.chunk
        if c and u.shape[0] > c:
            # the corner rows, weights and hash arithmetic are (N, L, 8) temporaries (~1 KB a
            # point at 16 levels, several alive at once): chunks bound them; the same values
            return torch.cat([self._torch_encode(u[i:i + c]) for i in range(0, u.shape[0], c)])
        return self._torch_encode(u)

    def corner_indices(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u (N, 3) in [0, 1] → table rows (N, L, 8) int32 and trilinear weights (N, L, 8).

        Corner k = (k & 1, k >> 1 & 1, k >> 2 & 1) in (x, y, z), tcnn's loop order. Dense levels
        are the coarsest ones (tcnn's layout makes them a prefix); hash levels all have 2^T entries,
        so the XOR hash modulo 2^T only needs each axis' product masked to T bits (int32 arithmetic
        on the big (N, L, 8) tensors, int64 only for the per-axis products)."""
        n = u.shape[0]
        nd = self.n_dense
        pos = u[:, None, :] * self.scales[None, :, None] + 0.5  # (N, L, 3)
        cell = torch.floor(pos)
        frac = pos - cell
        cell = cell.to(torch.int32)
        one = torch.arange(2, device=u.device, dtype=torch.int32)  # made there: no copy from the host
        ax = cell[..., 0, None] + one  # (N, L, 2): each axis' two corner coordinates
        ay = cell[..., 1, None] + one
        az = cell[..., 2, None] + one
        parts = []
        if nd > 0:
            r = self.resolutions[:nd].to(torch.int32)[None, :, None]
            d = (ax[:, :nd, None, None, :] + (ay[:, :nd] * r)[:, :, None, :, None]
                 + (az[:, :nd] * r * r)[:, :, :, None, None])  # (N, nd, 2z, 2y, 2x)
            ent = self.entries[:nd].to(torch.int32)[None, :, None, None, None]
            off = self.offsets[:nd].to(torch.int32)[None, :, None, None, None]
            parts.append((torch.remainder(d, ent) + off).reshape(n, nd, 8))
        if nd < self.levels:
            m = self.hash_mask
            hx = ax[:, nd:] & m  # prime 1
            hy = ((ay[:, nd:].long() * PRIMES[1]) & m).to(torch.int32)
            hz = ((az[:, nd:].long() * PRIMES[2]) & m).to(torch.int32)
            h = hx[:, :, None, None, :] ^ hy[:, :, None, :, None] ^ hz[:, :, :, None, None]
            off = self.offsets[nd:].to(torch.int32)[None, :, None, None, None]
            parts.append((h + off).reshape(n, self.levels - nd, 8))
        idx = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        wx = torch.stack([1 - frac[..., 0], frac[..., 0]], -1)
        wy = torch.stack([1 - frac[..., 1], frac[..., 1]], -1)
        wz = torch.stack([1 - frac[..., 2], frac[..., 2]], -1)
        w = wz[:, :, :, None, None] * wy[:, :, None, :, None] * wx[:, :, None, None, :]
        return idx, w.reshape(n, self.levels, 8)

    def _torch_encode(self, u: torch.Tensor) -> torch.Tensor:
        if not u.requires_grad:
            # positions are constants: a fused op that keeps only the corner rows and weights for
            # its backward (a quarter of autograd's memory, and fewer kernels), or only the
            # positions, the rows and weights recomputed in the backward
            if self.recompute_backward and torch.is_grad_enabled() and self.table.requires_grad:
                return _RecomputedLookup.apply(self.table, u, self).reshape(u.shape[0], self.output_dim)
            return _TableLookup.apply(self.table, *self.corner_indices(u)).reshape(u.shape[0], self.output_dim)
        # positions need gradients (analytic normals: a double backward): plain autograd
        n = u.shape[0]
        idx, w = self.corner_indices(u)
        # int64 rows: index_select's backward (index_add_) is ~15x slower on CPU with int32 indices
        feats = self.table.index_select(0, idx.reshape(-1).long()).view(n, self.levels, 8, self.features_per_level)
        out = (feats * w[..., None]).sum(2)  # (N, L, F)
        return out.reshape(n, self.output_dim)


class _TableLookup(torch.autograd.Function):
    """out[n, l] = Σ_k w[n, l, k] · table[idx[n, l, k]]: the trilinear blend of the corner features,
    differentiable in the table only (idx int32 (N, L, 8), w (N, L, 8) → (N, L, F))."""

    @staticmethod
    def forward(ctx, table, idx, w):
        ctx.save_for_backward(idx, w)
        ctx.table_shape = table.shape
        return _blend(table, idx, w)

    @staticmethod
    def backward(ctx, grad):
        idx, w = ctx.saved_tensors
        return _table_grad(idx, w, grad, ctx.table_shape), None, None


def _blend(table: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ_k w[n, l, k] · table[idx[n, l, k]] → (N, L, F)."""
    n, levels, _ = idx.shape
    feats = table.index_select(0, idx.reshape(-1).long()).view(n, levels, 8, table.shape[1])
    # a product and a sum over the 8 corners, not einsum: einsum makes this a batched matrix-vector
    # product of N·L (8 × F) matrices, which CUDA runs as thousands of gemv launches (52% of a
    # coarse step's GPU time on an H200, reports/speed)
    return (feats * w[..., None]).sum(2)


def _table_grad(idx: torch.Tensor, w: torch.Tensor, grad: torch.Tensor, shape) -> torch.Tensor:
    """∂/∂table of Σ_k w[n, l, k] · table[idx[n, l, k]]: the weighted output gradients scattered to the rows."""
    g = (w[..., None] * grad[:, :, None, :]).reshape(-1, grad.shape[-1])
    return torch.zeros(shape, device=grad.device, dtype=grad.dtype).index_add_(0, idx.reshape(-1).long(), g)


class _RecomputedLookup(torch.autograd.Function):
    """_TableLookup that saves only the positions u (N, 3): the corner rows and weights (~1 KB a
    point at 16 levels) are recomputed in the backward, by the same ops, so the gradient is the
    same bit for bit."""

    @staticmethod
    def forward(ctx, table, u, grid):
        ctx.save_for_backward(u)
        ctx.grid, ctx.table_shape = grid, table.shape
        return _blend(table, *grid.corner_indices(u))

    @staticmethod
    def backward(ctx, grad):
        (u,) = ctx.saved_tensors
        return _table_grad(*ctx.grid.corner_indices(u), grad, ctx.table_shape), None, None


@torch.no_grad()
def copy_hashgrid_params(src: HashGrid, dst: HashGrid) -> None:
    """Copy the table of one hash grid into another (either backend): equal parameters, equal encoding."""
    if src.config() != dst.config():
        raise ValueError(f"hash grids differ: {src.config()} vs {dst.config()}")
    s = src.flat_params.detach().reshape(-1)
    d = dst.flat_params
    d.data.copy_(s.to(device=d.device, dtype=d.dtype).view_as(d))
