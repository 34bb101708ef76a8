"""Mesh rasterisation with one interface and two backends (DESIGN.md 'Backends').

- `nvdiffrast` (Laine et al. 2020, its CUDA context `dr.RasterizeCudaContext`) when it imports and the
  device is CUDA: fast at 1024² and above.
- `torch`: a pure-PyTorch rasteriser for CPU tests and small resolutions; on a GPU its coverage
  pass is one Triton kernel (core.rendering.coverage_triton, `fine.coverage`).

The interface follows nvdiffrast's conventions so the backends are interchangeable:
  rasterize(pos (B,V,4) clip space, tri (F,3), (H, W)) -> rast (B,H,W,4) = (u, v, z/w, triangle_id + 1),
     with 0 in all four channels where no triangle covers the pixel. Pixel (row i, column j) has its
     centre at NDC x = 2(j+0.5)/W − 1, y = 2(i+0.5)/H − 1: row 0 is at y = −1 (OpenGL's bottom row).
     (u, v) are perspective-correct barycentrics of vertices 0 and 1 (vertex 2 has 1 − u − v).
  interpolate(attr (B|1,V,C) or (V,C), rast, tri) -> (B,H,W,C): u·a0 + v·a1 + (1−u−v)·a2, zero where empty.
  antialias(color (B,H,W,C), rast, pos, tri) -> (B,H,W,C): silhouette-edge blending.

How the torch backend works:
  * rasterize: each triangle's pixel bounding box is enumerated (vectorised, chunked over triangles),
    the pixel centres are tested against the three edge functions (no back-face culling, like
    nvdiffrast; pixels outside the depth range −1 ≤ z/w ≤ 1 are dropped), and a z-buffer
    (scatter_reduce 'amin' on z/w, ties to the larger triangle id) keeps the nearest. Which triangle
    covers a pixel is not differentiable; the barycentrics of the winner are then recomputed from the
    clip-space positions with autograd, so attributes interpolated with them carry gradients to the
    vertex positions (as nvdiffrast's do).
  * antialias: the analytic silhouette-edge blending of nvdiffrast's antialias op, re-derived in
    PyTorch. For every pair of horizontally or vertically adjacent pixels with different triangle ids,
    take the nearer triangle T (the covered one if the other is background) and find where the segment
    between the two pixel centres leaves T (parameter t ∈ [0, 1] from T's pixel, through T's edge
    functions). If that edge is a silhouette (a boundary edge, or one whose neighbouring triangle folds
    back to T's side in screen space) and runs more across than along the pair's direction, the two
    pixels' colours are blended as if each pixel were a unit square cut by the edge:
        t < ½: T's pixel takes (½ − t) of the other's colour;  t > ½: the other takes (t − ½) of T's.
    t is a function of the edge's projected vertices, so mask and silhouette losses reach the geometry.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from core.ops import gather_rows, sorted_edge_keys
from core.perf import compile_kind, compiled_twin, device_constant

log = logging.getLogger(__name__)

_CANDIDATE_CHUNK = 4_000_000  # (triangle, pixel) candidates per chunk in the torch rasteriser


def nvdiffrast_available() -> bool:
    try:
        import nvdiffrast.torch  # noqa: F401
    except Exception:
        return False
    return True


@dataclass
class Rasterizer:
    backend: str  # 'torch' | 'nvdiffrast'
    device: torch.device
    _ctx: object = None
    coverage: str = "torch"  # the torch backend's coverage pass: 'torch' | 'triton' (_coverage)
    compiled: bool = False  # the torch backend's pixel and pixel-pair arithmetic under torch.compile (fine.compile)

    def rasterize(self, pos: torch.Tensor, tri: torch.Tensor, resolution: tuple[int, int]) -> torch.Tensor:
        if self.backend == "nvdiffrast":
            import nvdiffrast.torch as dr

            rast, _ = dr.rasterize(self._ctx, pos.float().contiguous(), tri.int().contiguous(), tuple(resolution))
            return rast
        return torch_rasterize(pos, tri, resolution, coverage=self.coverage, compiled=self.compiled)

    def interpolate(self, attr: torch.Tensor, rast: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
        if attr.dim() == 2:
            attr = attr[None]
        if self.backend == "nvdiffrast":
            import nvdiffrast.torch as dr

            return dr.interpolate(attr.float().contiguous(), rast, tri.int().contiguous())[0]
        return torch_interpolate(attr, rast, tri, compiled=self.compiled)

    def antialias(self, color: torch.Tensor, rast: torch.Tensor, pos: torch.Tensor, tri: torch.Tensor,
                  edges: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                  pairs: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`edges`: the torch backend's sorted edge keys of `tri` (core.ops.sorted_edge_keys) where
        the caller has them; nvdiffrast finds its own. `pairs`: the torch backend's pixel pairs of
        `rast` where the caller has them (`compactions`)."""
        if self.backend == "nvdiffrast":
            import nvdiffrast.torch as dr

            return dr.antialias(color.float().contiguous(), rast, pos.float().contiguous(), tri.int().contiguous())
        return torch_antialias(color, rast, pos, tri, compiled=self.compiled, edges=edges, pairs=pairs)

    def compactions(self, covered: torch.Tensor, rast: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The covered pixels' flat indices (torch.nonzero of `covered` (B, H, W), flattened) and, for
        the torch backend, its antialias's pixel pairs of `rast` (`pixel_pairs`; None for nvdiffrast):
        both sizes read from the device in one wait, where two nonzeros waited once each (the second
        after the colour field's forward had been queued, so the host could not run ahead of it)."""
        flat = covered.reshape(-1)
        if self.backend == "nvdiffrast":
            return torch.nonzero(flat).squeeze(1), None
        across = pixel_pairs(rast[..., 3].detach())  # triangle id + 1: differs where the id does
        n_pix, n_pairs = torch.stack([flat.sum(), across.sum()]).tolist()
        return (torch.nonzero_static(flat, size=n_pix).squeeze(1),
                torch.nonzero_static(across, size=n_pairs).squeeze(1))


def coverage_kind(coverage: str, device) -> str:
    """What params.fine.coverage (auto | torch | triton) comes to on `device`: 'auto' is the Triton
    kernel on a GPU where Triton imports, torch's pass elsewhere; 'triton' off a GPU is an error."""
    from core.representations.hashgrid import triton_kind

    return triton_kind(coverage, device, "fine.coverage")


def make_rasterizer(kind: str = "auto", device="cpu", coverage: str = "auto", compile: str = "none") -> Rasterizer:
    """`kind` is params.fine.rasterizer: auto | torch | nvdiffrast; `coverage` params.fine.coverage,
    the torch backend's coverage pass (`coverage_kind`); `compile` params.fine.compile, its per-pixel
    arithmetic under torch.compile (`compile_kind`). Logs which backend runs."""
    device = torch.device(device)
    if kind not in ("auto", "torch", "nvdiffrast"):
        raise ValueError(f"unknown rasterizer {kind!r} (auto | torch | nvdiffrast)")
    use_nv = False
    if kind in ("auto", "nvdiffrast"):
        if device.type == "cuda" and nvdiffrast_available():
            use_nv = True
        elif kind == "nvdiffrast":
            from core.errors import Lift3DError

            why = "the device is not CUDA" if device.type != "cuda" else "nvdiffrast does not import"
            raise Lift3DError(f"fine.rasterizer is 'nvdiffrast' but {why}; use fine.rasterizer=auto or torch")
    if use_nv:
        import nvdiffrast.torch as dr

        r = Rasterizer("nvdiffrast", device, dr.RasterizeCudaContext(device=device))
    else:
        r = Rasterizer("torch", device, coverage=coverage_kind(coverage, device),
                       compiled=compile_kind(compile, device) == "default")
    log.info("mesh rasteriser: %s%s (fine.rasterizer=%s, device %s)", r.backend,
             f", {r.coverage} coverage pass{', compiled' if r.compiled else ''}" if r.backend == "torch" else "",
             kind, device)
    return r


# ------------------------------------------------------------------------------------------- torch backend
def _screen(pos: torch.Tensor, H: int, W: int):
    """Clip positions (…, 4) → pixel-space x, y (column, row units; centres at +0.5) and z/w."""
    w = pos[..., 3]
    x = (pos[..., 0] / w * 0.5 + 0.5) * W
    y = (pos[..., 1] / w * 0.5 + 0.5) * H
    return x, y, pos[..., 2] / w


def _boxes(pos: torch.Tensor, tri: torch.Tensor, H: int, W: int):
    """Each triangle's screen-space corners tx, ty, tz (B, F, 3), signed doubled area (B, F), pixel
    box x0, y0, bw (B, F) long, and its candidates count (B·F,) long: bw·bh, 0 where the triangle is
    rejected (a vertex behind the camera, zero area, entirely off-screen)."""
    sx, sy, sz = _screen(pos.float(), H, W)  # (B, V)
    tx, ty, tz = sx[:, tri], sy[:, tri], sz[:, tri]  # (B, F, 3)
    w_ok = (pos[:, :, 3][:, tri] > 1e-8).all(-1)
    area = (tx[..., 1] - tx[..., 0]) * (ty[..., 2] - ty[..., 0]) - (tx[..., 2] - tx[..., 0]) * (ty[..., 1] - ty[..., 0])
    x0 = torch.ceil(tx.min(-1).values - 0.5).clamp(0, W - 1)
    x1 = torch.floor(tx.max(-1).values - 0.5).clamp(-1, W - 1)
    y0 = torch.ceil(ty.min(-1).values - 0.5).clamp(0, H - 1)
    y1 = torch.floor(ty.max(-1).values - 0.5).clamp(-1, H - 1)
    bw = (x1 - x0 + 1).clamp_min(0).long()
    bh = (y1 - y0 + 1).clamp_min(0).long()
    # triangles entirely off-screen give an empty box through the clamps above
    offscreen = (tx.max(-1).values < 0.5) | (tx.min(-1).values > W - 0.5) | (ty.max(-1).values < 0.5) | (ty.min(-1).values > H - 0.5)
    ok = w_ok & (area.abs() > 1e-12) & ~offscreen
    count = torch.where(ok, bw * bh, torch.zeros_like(bw)).reshape(-1)  # (B*F,)
    return tx, ty, tz, area, x0.long(), y0.long(), bw, count


@torch.no_grad()
def _coverage(pos: torch.Tensor, tri: torch.Tensor, H: int, W: int, kind: str = "torch") -> torch.Tensor:
    """Index of the nearest triangle at each pixel (B, H, W), −1 where none. `kind` 'triton': one
    kernel, no host sync (core.rendering.coverage_triton); 'torch': the candidates as tensors, below."""
    if kind == "triton":  # the boxes inside the kernel
        from core.rendering.coverage_triton import triton_coverage

        return triton_coverage(pos, tri, H, W)
    B = pos.shape[0]
    F = tri.shape[0]
    dev = pos.device
    tx, ty, tz, area, x0, y0, bw, count = _boxes(pos, tri, H, W)
    zbuf = torch.full((B * H * W,), float("inf"), device=dev)
    best = torch.full((B * H * W,), -1, dtype=torch.long, device=dev)
    ids = torch.nonzero(count > 0).squeeze(1)
    if ids.numel() == 0:
        return best.view(B, H, W)
    csum = torch.cumsum(count[ids], 0)
    # the chunks: runs of triangles cut where the running sum of candidates passes a multiple of
    # _CANDIDATE_CHUNK (so a chunk holds at most _CANDIDATE_CHUNK more than its first triangle's), found
    # on the device; the host reads the total, then only the cuts and the running sum there (two syncs
    # of a few numbers. Copying the whole running sum, 8 bytes a triangle, was nearly all the bytes of
    # the 8.8 ms of device-to-host copies in session 18's profile of 3 iterations at 993,600 faces.)
    # Chunking changes which candidates are evaluated together, not the result: its reductions are
    # amin / amax.
    cuts = torch.searchsorted(csum, torch.arange(1, int(csum[-1]) // _CANDIDATE_CHUNK + 1, device=dev)
                              * _CANDIDATE_CHUNK, right=True)
    ends = torch.cat([cuts, cuts.new_tensor([ids.numel()])])
    ends_h, sums_h = torch.stack([ends, csum[(ends - 1).clamp_min(0)]]).tolist()
    flat = lambda t: t.reshape(B * F, *t.shape[2:])  # noqa: E731
    TX, TY, TZ, AREA = flat(tx), flat(ty), flat(tz), area.reshape(-1)
    X0, Y0, BW = x0.reshape(-1), y0.reshape(-1), bw.reshape(-1)
    results = []
    start, base = 0, 0
    for end, upto in zip(ends_h, sums_h):
        if end <= start:
            continue
        sel = ids[start:end]
        n = count[sel]
        total = int(upto) - base  # this chunk's candidates (output_size: no sync to count them)
        owner = torch.repeat_interleave(sel, n, output_size=total)
        local = torch.arange(total, device=dev) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n, output_size=total)
        px = X0[owner] + local % BW[owner]
        py = Y0[owner] + torch.div(local, BW[owner], rounding_mode="floor")
        cx, cy = px.float() + 0.5, py.float() + 0.5
        X, Y, Z, A = TX[owner], TY[owner], TZ[owner], AREA[owner]
        # edge functions, each the signed area of (v_{i+1}, v_{i+2}, p): barycentric i × area
        e0 = (X[:, 1] - cx) * (Y[:, 2] - cy) - (X[:, 2] - cx) * (Y[:, 1] - cy)
        e1 = (X[:, 2] - cx) * (Y[:, 0] - cy) - (X[:, 0] - cx) * (Y[:, 2] - cy)
        e2 = (X[:, 0] - cx) * (Y[:, 1] - cy) - (X[:, 1] - cx) * (Y[:, 0] - cy)
        sgn = torch.sign(A)
        inside = (e0 * sgn >= 0) & (e1 * sgn >= 0) & (e2 * sgn >= 0)
        z = (e0 * Z[:, 0] + e1 * Z[:, 1] + e2 * Z[:, 2]) / A
        inside &= (z >= -1) & (z <= 1)
        b = torch.div(owner, F, rounding_mode="floor")
        key = (b * H + py) * W + px
        hit = torch.nonzero(inside).squeeze(1)  # one sync for the three
        results.append((key[hit], z[hit], (owner % F)[hit]))
        start, base = end, int(upto)
    key = torch.cat([r[0] for r in results])
    z = torch.cat([r[1] for r in results])
    f = torch.cat([r[2] for r in results])
    zbuf.scatter_reduce_(0, key, z, reduce="amin")
    win = z <= zbuf[key]
    best.scatter_reduce_(0, key, torch.where(win, f, -1), reduce="amax")  # a loser's −1 changes nothing
    return best.view(B, H, W)


def _gather_vertices(values: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """values (B or 1, V, C) at vertex ids v (B, …): (B, …, C), one batch of values serving all.
    By index_select on the flattened rows (core.ops.gather_rows), whose backward sums in a fixed
    order: a resumed run must equal an uninterrupted one bit for bit."""
    batch = torch.arange(v.shape[0], device=v.device) if values.shape[0] > 1 else v.new_zeros(v.shape[0])
    return _gather_at(values, batch, v)


def _gather_at(values: torch.Tensor, b: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """values (B, V, C) at the (batch b[i], vertex v[i, …]) pairs, b (N,), v (N, …): (N, …, C); by
    index_select, for the fixed-order backward (_gather_vertices; antialias's per-pixel gathers)."""
    n, V, C = values.shape
    rows = v if n == 1 else v + (b * V).view(-1, *([1] * (v.dim() - 1)))  # one batch: b is all zeros
    return gather_rows(values.reshape(n * V, C), rows)


def torch_rasterize(pos: torch.Tensor, tri: torch.Tensor, resolution: tuple[int, int],
                    coverage: str = "torch", compiled: bool = False) -> torch.Tensor:
    """nvdiffrast-style rast output (B, H, W, 4); differentiable in `pos` through (u, v, z/w).
    `coverage`: the coverage pass's kind ('torch' | 'triton', _coverage); `compiled`: the per-pixel
    arithmetic (_pixel_rast) under torch.compile.

    After the coverage pass, every pixel is computed with fixed shapes (no compaction, so no host
    sync): an uncovered pixel computes a stand-in triangle, then takes zeros, as nvdiffrast's
    output has there."""
    H, W = int(resolution[0]), int(resolution[1])
    tri = tri.long()
    tid = _coverage(pos.detach(), tri, H, W, coverage)  # (B, H, W)
    f = tid.clamp_min(0)
    p = _gather_vertices(pos, tri[f])  # (B, H, W, 3, 4) with autograd
    return compiled_twin(_pixel_rast, compiled)(p, tid, device_constant(_STAND_IN, p.dtype, p.device))


def _pixel_rast(p: torch.Tensor, tid: torch.Tensor, stand_in: torch.Tensor) -> torch.Tensor:
    """rast (B, H, W, 4) from each pixel's triangle's clip corners p (B, H, W, 3, 4) and triangle id
    tid (B, H, W), −1 where none: elementwise over fixed shapes (torch.compile fuses it, fine.compile)."""
    B, H, W = tid.shape
    covered = tid >= 0
    # uncovered pixels: a fixed triangle (finite w, non-zero area), so no inf/NaN reaches the gradient
    p = torch.where(covered[..., None, None], p, stand_in)
    X, Y, Z = _screen(p, H, W)
    w = p[..., 3]
    cx = torch.arange(W, device=p.device, dtype=p.dtype) + 0.5  # (W,): pixel centres along a row
    cy = (torch.arange(H, device=p.device, dtype=p.dtype) + 0.5)[:, None]  # (H, 1)
    e0 = (X[..., 1] - cx) * (Y[..., 2] - cy) - (X[..., 2] - cx) * (Y[..., 1] - cy)
    e1 = (X[..., 2] - cx) * (Y[..., 0] - cy) - (X[..., 0] - cx) * (Y[..., 2] - cy)
    e2 = (X[..., 0] - cx) * (Y[..., 1] - cy) - (X[..., 1] - cx) * (Y[..., 0] - cy)
    area = e0 + e1 + e2
    # a sliver the coverage pass kept (|area| > 1e-12 by its corners) whose edge functions at this
    # pixel sum to exactly 0: its first corner (1, 0, 0), finite where 0 / 0 was NaN. Every other
    # pixel's numbers are unchanged
    flat = area == 0
    area = torch.where(flat, torch.ones_like(area), area)
    b0 = torch.where(flat, torch.ones_like(e0), e0 / area)  # screen-space barycentrics
    b1 = torch.where(flat, torch.zeros_like(e1), e1 / area)
    b2 = torch.where(flat, torch.zeros_like(e2), e2 / area)
    zw = b0 * Z[..., 0] + b1 * Z[..., 1] + b2 * Z[..., 2]  # z/w is affine in screen space
    q0, q1, q2 = b0 / w[..., 0], b1 / w[..., 1], b2 / w[..., 2]  # perspective correction
    s = q0 + q1 + q2
    vals = torch.stack([q0 / s, q1 / s, zw, (tid + 1).to(p.dtype)], -1)
    return torch.where(covered[..., None], vals, torch.zeros_like(vals))


# clip-space corners of the triangle an uncovered pixel computes before its zeros are taken
_STAND_IN = ((-1.0, -1.0, 0.0, 1.0), (1.0, -1.0, 0.0, 1.0), (-1.0, 1.0, 0.0, 1.0))

# fine.compile: the torch backend's arithmetic under torch.compile (core.perf.compiled_twin), built on
# first use. The pixels' functions see the training image's fixed shape (compiled for it; a second
# size, the export's, makes Inductor's automatic dynamic shapes compile once more for any size), the
# pixel pairs' a count that changes every iteration (dynamic from the start).


def torch_interpolate(attr: torch.Tensor, rast: torch.Tensor, tri: torch.Tensor, compiled: bool = False) -> torch.Tensor:
    """Vertex attributes (B or 1, V, C) at each pixel of `rast` (B, H, W, C): every pixel computed
    with fixed shapes (no host sync), zeros where no triangle covers it."""
    B, H, W, _ = rast.shape
    tid = rast[..., 3].detach().long() - 1
    v = tri.long()[tid.clamp_min(0)]  # (B, H, W, 3)
    a = _gather_vertices(attr if attr.shape[0] == B else attr[:1], v)  # (B, H, W, 3, C)
    return compiled_twin(_blend_corners, compiled)(a, rast, tid)


def _blend_corners(a: torch.Tensor, rast: torch.Tensor, tid: torch.Tensor) -> torch.Tensor:
    """u·a0 + v·a1 + (1−u−v)·a2 at every pixel, zeros where tid < 0 (torch_interpolate)."""
    u, vv = rast[..., 0:1], rast[..., 1:2]
    val = u * a[..., 0, :] + vv * a[..., 1, :] + (1 - u - vv) * a[..., 2, :]
    return torch.where((tid >= 0)[..., None], val, torch.zeros_like(val))


def opposite_vertices(tri: torch.Tensor, n_vertices: Optional[int] = None,
                      edges: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """(F, 3): for edge i of each triangle (the edge opposite its vertex i), the vertex of the
    neighbouring triangle across that edge that is not on the edge; −1 for boundary or non-manifold.
    `n_vertices`: any bound above the largest index (the vertex count; read from `tri` if not given,
    which waits for the device). `edges`: core.ops.sorted_edge_keys(tri, n_vertices) where the caller
    has it (the fine stage's mesh keeps the one sort its regularisers use: Mesh.edge_sort).

    The triangles' 3F edges sorted by key; an edge shared by exactly two triangles is a run of two
    equal keys, found by comparing neighbours, and each of the two gets the other's opposite vertex
    by a scatter (the positions not in a pair write to one spare slot, dropped). No compaction, so
    no wait for the GPU (session 20: a unique_consecutive and a nonzero, two syncs an iteration).
    The order of equal keys changes nothing: a pair's two edges each take the other's vertex."""
    tri = tri.long()
    F = tri.shape[0]
    if F == 0:
        return torch.full((0, 3), -1, dtype=torch.long, device=tri.device)
    if edges is None:
        edges = sorted_edge_keys(tri, int(n_vertices) if n_vertices is not None else int(tri.max()) + 1)
    ks, order = edges
    # face_edges lists every face's (0,1) edges, then (1,2), then (2,0): block b is the edge opposite
    # vertex (b + 2) mod 3, so sorted entry k is slot 3f + i of the (F, 3) answer
    block = torch.div(order, F, rounding_mode="floor")
    slot = (order - block * F) * 3 + torch.remainder(block + 2, 3)
    opp = tri.reshape(-1)  # slot 3f + i holds vertex i of face f, the one opposite edge i
    same = ks[1:] == ks[:-1]  # sorted position j and j + 1 are one edge
    no = same.new_zeros(1)
    pair = same & ~torch.cat([no, same[:-1]]) & ~torch.cat([same[1:], no])  # a run of exactly two from j
    first, second = slot[:-1], slot[1:]
    spare = torch.full_like(first, F * 3)
    out = torch.full((F * 3 + 1,), -1, dtype=torch.long, device=tri.device)
    out.scatter_(0, torch.where(pair, first, spare), opp[second])
    out.scatter_(0, torch.where(pair, second, spare), opp[first])
    return out[:F * 3].view(F, 3)


def pixel_pairs(tid: torch.Tensor) -> torch.Tensor:
    """The pixel pairs whose triangle ids `tid` (B, H, W; or rast's id + 1) differ, as one flat mask:
    the horizontal pairs (right neighbour, (B, H, W−1)), then the vertical ones (lower neighbour,
    (B, H−1, W))."""
    return torch.cat([(tid[:, :, :-1] != tid[:, :, 1:]).reshape(-1), (tid[:, :-1, :] != tid[:, 1:, :]).reshape(-1)])


def torch_antialias(color: torch.Tensor, rast: torch.Tensor, pos: torch.Tensor, tri: torch.Tensor,
                    compiled: bool = False, edges: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                    pairs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The silhouette blending of the module's docstring; `compiled`: the pixel pairs' arithmetic
    (_pair_edges, _blend_pairs) under torch.compile, for any count of pairs; `edges`: the mesh's
    sorted edge keys where the caller has them (opposite_vertices); `pairs`: the flat indices of
    `pixel_pairs` of `rast` where the caller has them (Rasterizer.compactions), else found here."""
    tri = tri.long()
    tid = rast[..., 3].detach().long() - 1
    zw = rast[..., 2].detach()
    opp = opposite_vertices(tri, pos.shape[1], edges)
    # the pixel pairs whose triangles differ, horizontal (right neighbour: d = 0) then vertical (lower
    # neighbour: d = 1), in one compaction and one pass (each kernel launched once, not twice): the
    # same pairs in the same order as a pass per direction, so the same colour sums
    at = pairs if pairs is not None else torch.nonzero(pixel_pairs(tid)).squeeze(1)
    if at.numel() == 0:
        return color
    blend, t_grad, pT, pO = compiled_twin(_pair_edges, compiled, dynamic=True)(at, tid, zw, pos, tri, opp)
    # every pair blended with its weight zeroed where it is no silhouette: the same sums as blending
    # only those (x + 0 = x) without compacting them, which waited for the device (session 37)
    return compiled_twin(_blend_pairs, compiled, dynamic=True)(color, blend, t_grad, pT, pO)


def _pair_edges(at: torch.Tensor, tid: torch.Tensor, zw: torch.Tensor, pos: torch.Tensor, tri: torch.Tensor,
                opp: torch.Tensor):
    """For the pixel pairs `at` (indices into the horizontal pairs (B, H, W−1), then the vertical ones
    (B, H−1, W), flattened) across which the triangle id `tid` (B, H, W) changes: whether the pair is
    blended (the edge where the segment between the two centres leaves the nearer triangle T is a
    silhouette running more across the pair than along it), where (t, differentiable in `pos`), and
    the flat indices of T's pixel and the other's (torch_antialias)."""
    B, H, W = tid.shape
    n_h = B * H * (W - 1)
    d = at >= n_h  # vertical pair
    av = at - n_h
    # (b, y, x) of the pair's first pixel: in (B, H, W−1) for a horizontal pair, (B, H−1, W) for a vertical
    # one (w1, h1: W−1 and H−1, never 0 as divisors; an image one pixel wide has no pair of that kind)
    w1, h1 = max(W - 1, 1), max(H - 1, 1)
    xi = torch.where(d, av % W, at % w1)
    yi = torch.where(d, torch.div(av, W, rounding_mode="floor") % h1, torch.div(at, w1, rounding_mode="floor") % H)
    bi = torch.where(d, torch.div(av, W * h1, rounding_mode="floor"), torch.div(at, w1 * H, rounding_mode="floor"))
    p0 = (bi * H + yi) * W + xi
    p1 = p0 + torch.where(d, W, 1)
    flat_t, flat_z = tid.reshape(-1), zw.reshape(-1)
    a0, a1 = flat_t[p0], flat_t[p1]
    use0 = (a0 >= 0) & ((a1 < 0) | (flat_z[p0] < flat_z[p1]))
    T = torch.where(use0, a0, a1)
    # pixel of T and the other pixel (row, column)
    pT = torch.where(use0, p0, p1)
    pO = torch.where(use0, p1, p0)
    cTx = (pT % W).to(pos.dtype) + 0.5
    cTy = (torch.div(pT, W, rounding_mode="floor") % H).to(pos.dtype) + 0.5
    cOx = (pO % W).to(pos.dtype) + 0.5
    cOy = (torch.div(pO, W, rounding_mode="floor") % H).to(pos.dtype) + 0.5
    vidx = tri[T]  # (N, 3)
    pv = _gather_at(pos, bi, vidx)  # (N, 3, 4), differentiable
    X, Y, _ = _screen(pv, H, W)
    area = (X[:, 1] - X[:, 0]) * (Y[:, 2] - Y[:, 0]) - (X[:, 2] - X[:, 0]) * (Y[:, 1] - Y[:, 0])
    sg = torch.sign(area.detach())

    def edge(i, px, py):
        j, k = (i + 1) % 3, (i + 2) % 3
        return sg * ((X[:, j] - px) * (Y[:, k] - py) - (X[:, k] - px) * (Y[:, j] - py))

    eT = torch.stack([edge(i, cTx, cTy) for i in range(3)], 1)  # (N, 3) ≥ 0 inside T
    eO = torch.stack([edge(i, cOx, cOy) for i in range(3)], 1)
    exits = eO.detach() < 0
    # eT − eO is 0 where T's own centre is outside an edge that runs along the pair (eT = eO < 0): a
    # coverage pass whose multiply-adds rounded the other way (the Triton kernel's, nvdiffrast's) gave
    # T that pixel. The segment never crosses that edge inside T: t = −inf, as eT / 0 was, but without
    # the 0 / 0 the division's backward made there, which turned every vertex gradient to NaN
    # (session 24: a fine stage stopped at step 0 on "a gradient is not finite")
    den = eT - eO
    outside = exits & (den.detach() == 0)
    crossing = exits & ~outside
    tcross = eT / den.where(crossing, torch.ones_like(den))
    tcross = torch.where(crossing, tcross, torch.where(outside, float("-inf"), float("inf")))
    t, di = tcross.detach().min(1)
    found = torch.isfinite(t)
    t_grad = torch.gather(tcross, 1, di[:, None]).squeeze(1)
    # silhouette test: boundary edge, or the neighbour's far vertex lies on T's side of the edge
    o = torch.gather(opp[T], 1, di[:, None]).squeeze(1)
    has_o = o >= 0
    po = _gather_at(pos, bi, o.clamp_min(0))
    ox, oy, _ = _screen(po, H, W)
    j, k = (di + 1) % 3, (di + 2) % 3
    Xj, Yj = X.gather(1, j[:, None]).squeeze(1), Y.gather(1, j[:, None]).squeeze(1)
    Xk, Yk = X.gather(1, k[:, None]).squeeze(1), Y.gather(1, k[:, None]).squeeze(1)
    side_o = sg * ((Xj - ox) * (Yk - oy) - (Xk - ox) * (Yj - oy))
    silhouette = ~has_o | (side_o.detach() > 0)
    # the edge must run more across the pair's direction than along it
    ex, ey = (Xk - Xj).detach().abs(), (Yk - Yj).detach().abs()
    across = torch.where(d, ex >= ey, ey >= ex)
    eps = 1.0 / 16.0
    return found & silhouette & across & (t > -eps) & (t < 1 + eps), t_grad, pT, pO


def _blend_pairs(color: torch.Tensor, blend: torch.Tensor, t_grad: torch.Tensor, pT: torch.Tensor,
                 pO: torch.Tensor) -> torch.Tensor:
    """The blend of the pairs where `blend` (torch_antialias): t < ½: T's pixel takes (½ − t) of the
    other's colour; t > ½: the other takes (t − ½) of T's. The other pairs take t = ½, a weight of
    exactly zero, before any arithmetic: they add zeros, and their t (±inf where no edge was
    crossed) reaches neither the sums nor the gradient."""
    B, H, W, C = color.shape
    flat_c = color.reshape(-1, C)
    tt = torch.where(blend, t_grad, 0.5).clamp(0.0, 1.0)
    cT, cO = flat_c[pT], flat_c[pO]
    alpha = (0.5 - tt)[:, None]
    to_T = alpha.detach()[:, 0] > 0
    delta = torch.where(to_T[:, None], alpha * (cO - cT), (-alpha) * (cT - cO))
    out = flat_c.index_add(0, torch.where(to_T, pT, pO), delta)
    return out.view(B, H, W, C)
