"""Tensor operations whose backward is the same to the bit on every run.

Advanced indexing, `values[index]`, differentiates into index_put with accumulate. On a
multi-threaded CPU that adds a row's many contributions with atomics, in whatever order the threads
reach them, so once an index repeats rows across threads the gradient's last bits change from run
to run; in a training loop they grow into different meshes (two `lift3d refine` runs of one
checkpoint, session 12). index_select differentiates into index_add, which sums in index order.

Also the meshes' edge bookkeeping, done every fine iteration on a new mesh (marching tetrahedra,
the regularisers): pairs sorted without a sort kernel, and unique undirected edges as 1-D keys.
"""
from __future__ import annotations

import math

import torch

from core.perf import device_constant


def gather_rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values[index] along dimension 0, index of any shape: (*index.shape, *values.shape[1:]), with a
    backward that sums each row's contributions in a fixed order. On a GPU, rows whose bytes are a
    small multiple of 16 are taken element by element (`gather_flat`, the same values and sums)."""
    idx = index.reshape(-1)
    out = gather_flat(values, idx) if _slow_rows(values) else values.index_select(0, idx)
    return out.view(*index.shape, *values.shape[1:])


def _slow_rows(values: torch.Tensor) -> bool:
    """Rows that CUDA's index_select copies with one thread block each (torch 2.11's vectorised gather
    for rows a multiple of 16 bytes): at a fine iteration's millions of clip-space corners, (V, 4)
    fp32, 1.83 ms a forward where 12-byte rows take 0.04 and the same rows taken element by element
    0.12 (H200, 3M rows; reports/speed session 35)."""
    if not values.is_cuda or values.dim() < 2 or values.shape[0] == 0:
        return False
    row = math.prod(values.shape[1:]) * values.element_size()
    return row % 16 == 0 and row <= 64


def gather_flat(values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """values.index_select(0, idx) (idx 1-D) as an index_select of single elements: every row's C
    elements by their flat positions. Its backward is index_add over those positions, which adds each
    element's contributions in the order of `idx`, as index_select's does (the same bits on a CPU)."""
    c = math.prod(values.shape[1:])
    flat = (idx[:, None] * c + device_constant(tuple(range(c)), torch.long, idx.device)).reshape(-1)
    return values.reshape(-1).index_select(0, flat).view(idx.shape[0], *values.shape[1:])


def sort_pairs(pairs: torch.Tensor) -> torch.Tensor:
    """pairs (..., 2) with each pair ascending: torch.sort(pairs, dim=-1).values as two elementwise
    kernels. The sort launches a bitonic sort over every row (0.7 ms an H200 call on a fine-stage
    mesh, three calls an iteration; reports/speed session 16)."""
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([torch.minimum(a, b), torch.maximum(a, b)], -1)


def face_edges(faces: torch.Tensor) -> torch.Tensor:
    """The (3F, 2) edges of triangles (F, 3), each ascending: the faces' (0,1) edges, then (1,2), then (2,0)."""
    # slices, not faces[:, [0, 1]]: a list index is a tensor copied to the device each call (a wait
    # for the GPU's queue; three a call, session 21's audit)
    return sort_pairs(torch.cat([faces[:, 0:2], faces[:, 1:3], torch.stack([faces[:, 2], faces[:, 0]], 1)], 0))


def edge_keys(edges: torch.Tensor, n_verts: int) -> torch.Tensor:
    """One integer a·n_verts + b per ascending pair (..., 2) of vertex indices < n_verts: equal for
    the same undirected edge, ordered as the pairs are lexicographically."""
    return edges[..., 0] * n_verts + edges[..., 1]


def sorted_edge_keys(faces: torch.Tensor, n_verts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The faces' 3F undirected edge keys (edge_keys of face_edges) sorted, and the order that sorts
    them (entry k: the position of the k-th key in face_edges' list: face k mod F, its edge (0,1),
    (1,2) or (2,0) by k div F). One sort a fine iteration serves the mesh regularisers and the torch
    rasteriser's antialias (core.representations.dmtet.Mesh.edge_sort keeps it with the mesh)."""
    return torch.sort(edge_keys(face_edges(faces), max(1, int(n_verts))))


def unique_edges(edges: torch.Tensor, n_verts: int) -> torch.Tensor:
    """torch.unique(edges, dim=0) for ascending pairs of vertex indices < n_verts: one 1-D unique of
    their edge_keys (a radix sort, where unique(dim=0) sorts rows), the same rows in the same
    (lexicographic) order."""
    keys = torch.unique(edge_keys(edges, n_verts))
    return torch.stack([keys // n_verts, keys % n_verts], 1)
