"""A tetrahedral grid of the cube [-bound, bound]^3, generated here (DMTet's grid, Shen et al. 2021).

The cube is cut into `resolution`^3 voxels and every voxel into 6 tetrahedra by the Kuhn
(Freudenthal) decomposition: for each of the 6 orders (a, b, c) of the axes, the tetrahedron whose
vertices walk from the voxel's corner (0,0,0) to (1,1,1) adding the unit steps e_a, e_b, e_c in that
order. All six share the voxel's main diagonal, and every voxel face is split along the diagonal
through its lowest and highest corners, so the faces of neighbouring voxels match and the grid is
conforming (each interior triangle is shared by exactly two tetrahedra). Every tetrahedron is stored
with positive orientation (det[v1-v0, v2-v0, v3-v0] > 0), which the marching-tets triangle table of
core/representations/dmtet.py relies on.

Sizes: resolution r gives (r+1)^3 vertices and 6 r^3 tetrahedra (r=128: 2.1 M vertices, 12.6 M tets).
DMTet (core/representations/dmtet.py) stores only the vertices and forms a voxel's tetrahedra from
`voxel_tet_offsets` when the surface passes through it.
"""
from __future__ import annotations

import itertools

import numpy as np


def _kuhn_tets() -> np.ndarray:
    """The 6 tetrahedra of the unit cube as corner bit-codes (x + 2y + 4z), positively oriented."""
    out = []
    for perm in itertools.permutations(range(3)):
        corner = np.zeros(3, dtype=int)
        verts = [corner.copy()]
        for axis in perm:
            corner[axis] = 1
            verts.append(corner.copy())
        v = np.array(verts, dtype=float)
        if np.linalg.det(v[1:] - v[0]) < 0:  # odd permutations come out negative: swap two vertices
            verts[2], verts[3] = verts[3], verts[2]
        out.append([int(c[0] + 2 * c[1] + 4 * c[2]) for c in verts])
    return np.array(out, dtype=np.int64)


KUHN_TETS = _kuhn_tets()


def grid_vertices(resolution: int, bound: float = 1.0) -> np.ndarray:
    """The grid's (r+1)^3 vertices (V, 3) float32; grid point (i, j, k) has index i n² + j n + k (n = r+1)."""
    r = int(resolution)
    if r < 1:
        raise ValueError(f"tet grid resolution must be ≥ 1, got {resolution}")
    lin = np.linspace(-bound, bound, r + 1, dtype=np.float32)
    gx, gy, gz = np.meshgrid(lin, lin, lin, indexing="ij")
    return np.stack([gx, gy, gz], axis=-1).reshape(-1, 3)


def voxel_tet_offsets(resolution: int) -> np.ndarray:
    """(6, 4) int64: the vertex indices of a voxel's 6 tetrahedra less the index of its (0,0,0) corner;
    voxel (i, j, k)'s tetrahedra are rows 6 (i r² + j r + k) … + 5 of the grid's (DMTet.all_tets)."""
    n = int(resolution) + 1
    bits = np.arange(8)
    corner_offset = (bits & 1) * n * n + ((bits >> 1) & 1) * n + ((bits >> 2) & 1)  # x + 2y + 4z → index offset
    return corner_offset[KUHN_TETS].astype(np.int64)


def tet_volumes(verts: np.ndarray, tets: np.ndarray) -> np.ndarray:
    """Signed volumes (T,): det[v1-v0, v2-v0, v3-v0] / 6."""
    v = verts[tets].astype(np.float64)
    return np.linalg.det(v[:, 1:] - v[:, :1]) / 6.0


def tet_faces(tets: np.ndarray) -> np.ndarray:
    """The 4 faces of every tetrahedron (T, 4, 3), each ordered so its normal points outwards
    for a positively oriented tetrahedron."""
    t = np.asarray(tets)
    return np.stack([t[:, [1, 2, 3]], t[:, [0, 3, 2]], t[:, [0, 1, 3]], t[:, [0, 2, 1]]], axis=1)
