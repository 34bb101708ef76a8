"""DMTet (Shen et al. 2021): a deformable tetrahedral grid with a per-vertex SDF, and differentiable
marching tetrahedra — Magic123 §2.1.2's fine-stage geometry.

Sign convention: the SDF is POSITIVE INSIDE the object (s = density − threshold, as Magic123/Magic3D
initialise it from the coarse NeRF) and negative outside. Each surface vertex lies on a grid edge
(a, b) whose end values differ in sign, at the zero crossing of the linear interpolation:

    p = (p_a · s_b − p_b · s_a) / (s_b − s_a)

which is differentiable in the SDF values and the (deformed) vertex positions. Triangles are
oriented with outward normals (from the inside vertices towards the outside ones). Vertices on
shared grid edges are shared by the neighbouring tetrahedra, so the mesh is watertight wherever the
zero level set does not leave the grid.

The neural colour field of the fine stage is initialised from the coarse stage's colour field
(Magic3D): `ColourField` holds a copy of the NeRF field and evaluates only its albedo branch (hash
grid + albedo MLP); the copy is trained, the NeRF is left as it was.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch import nn

from core.export.mesh import surface_level
from core.ops import edge_keys, face_edges, gather_rows, sort_pairs, sorted_edge_keys, unique_edges
from core.perf import device_constant
from core.representations.tets import grid_vertices, voxel_tet_offsets

# the 6 edges of a tetrahedron as pairs of local vertex indices
TET_EDGES = np.array([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]], dtype=np.int64)
_EDGE_ID = {tuple(e): i for i, e in enumerate(TET_EDGES.tolist())}


def _edge(a: int, b: int) -> int:
    return _EDGE_ID[(min(a, b), max(a, b))]


def _build_triangle_table() -> tuple[np.ndarray, np.ndarray]:
    """For each of the 16 inside/outside codes (bit i = vertex i inside): up to two triangles as
    local edge indices, oriented outwards for a positively oriented tetrahedron. Built (not typed in)
    from the reference tetrahedron (0,0,0), (1,0,0), (0,1,0), (0,0,1)."""
    ref = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=float)
    table = -np.ones((16, 2, 3), dtype=np.int64)
    count = np.zeros(16, dtype=np.int64)
    for code in range(16):
        inside = [i for i in range(4) if code >> i & 1]
        outside = [i for i in range(4) if not code >> i & 1]
        if len(inside) in (0, 4):
            continue
        if len(inside) in (1, 3):
            lone, others = (inside[0], outside) if len(inside) == 1 else (outside[0], inside)
            tris = [[_edge(lone, o) for o in others]]
        else:
            a, b = inside
            c, d = outside
            cycle = [_edge(a, c), _edge(a, d), _edge(b, d), _edge(b, c)]  # a closed loop round the quad
            tris = [[cycle[0], cycle[1], cycle[2]], [cycle[0], cycle[2], cycle[3]]]
        out_dir = ref[outside].mean(0) - ref[inside].mean(0)
        for t, tri in enumerate(tris):
            mids = np.array([ref[TET_EDGES[e]].mean(0) for e in tri])
            n = np.cross(mids[1] - mids[0], mids[2] - mids[0])
            if n @ out_dir < 0:
                tri = [tri[0], tri[2], tri[1]]
            table[code, t] = tri
        count[code] = len(tris)
    return table, count


TRIANGLE_TABLE, NUM_TRIANGLES = _build_triangle_table()
# the tables as nested lists, the keys of their kept device copies (core.perf.device_constant)
_TET_EDGES_ROWS = TET_EDGES.tolist()
_TRIANGLE_ROWS = TRIANGLE_TABLE.reshape(16, 6).tolist()
_NUM_TRIANGLES_ROW = NUM_TRIANGLES.tolist()


@dataclass
class Mesh:
    verts: torch.Tensor  # (N, 3)
    faces: torch.Tensor  # (F, 3) int64
    _edge_sort: Optional[tuple[torch.Tensor, torch.Tensor]] = field(default=None, init=False, repr=False, compare=False)

    @property
    def num_faces(self) -> int:
        return int(self.faces.shape[0])

    def edge_sort(self) -> tuple[torch.Tensor, torch.Tensor]:
        """core.ops.sorted_edge_keys of the faces, made on first use and kept: a fine iteration's mesh
        regularisers and its torch antialias (opposite_vertices) read one sort of the 3F edge keys
        (they sorted one each until session 34). The faces must not change in place after."""
        if self._edge_sort is None:
            self._edge_sort = sorted_edge_keys(self.faces, self.verts.shape[0])
        return self._edge_sort

    def detach(self) -> "Mesh":
        out = Mesh(self.verts.detach(), self.faces)
        out._edge_sort = self._edge_sort  # the same faces
        return out


def marching_tets(pos: torch.Tensor, sdf: torch.Tensor, tets: torch.Tensor) -> Mesh:
    """Differentiable marching tetrahedra. pos (V, 3), sdf (V,) positive inside, tets (T, 4)."""
    device = pos.device
    tets = tets.long()
    with torch.no_grad():
        # compactions by index and the tables as kept device constants: a boolean mask index is a
        # nonzero, a table made from numpy each call a copy, each a wait for the GPU (eleven a call
        # before session 21, four in sessions 21–32, three now: the crossed tetrahedra's nonzero,
        # one read of the crossing edges' and the two-triangle tetrahedra's counts for both
        # compactions after it (nonzero_static, no wait), and the unique); the same elements in the
        # same order as the masks gave
        occ = sdf > 0
        occ_t = occ[tets]  # (T, 4)
        n_in = occ_t.sum(1)
        rows = torch.nonzero((n_in > 0) & (n_in < 4)).squeeze(1)  # tetrahedra the surface passes through
        if rows.shape[0] == 0:
            return Mesh(pos.new_zeros((0, 3)), torch.zeros((0, 3), dtype=torch.long, device=device))
        tv, occ_v = gather_rows(tets, rows), occ_t.index_select(0, rows)
        edges = tv[:, device_constant(_TET_EDGES_ROWS, torch.long, device)]  # (Tv, 6, 2)
        edges = sort_pairs(edges)
        crossing = (occ[edges[..., 0]] != occ[edges[..., 1]]).reshape(-1)  # (Tv·6,)
        code = (occ_v.long() * device_constant((1, 2, 4, 8), torch.long, device)).sum(1)
        ntri = device_constant(_NUM_TRIANGLES_ROW, torch.long, device)[code]  # (Tv,)
        n_cut, n_two = torch.stack([crossing.sum(), (ntri == 2).sum()]).tolist()  # one wait for both
        n_vert = pos.shape[0]
        cut = torch.nonzero_static(crossing, size=n_cut).squeeze(1)
        uniq, inv = torch.unique(edge_keys(edges, n_vert).reshape(-1).index_select(0, cut), return_inverse=True)
        edge_to_vert = torch.full((rows.shape[0], 6), -1, dtype=torch.long, device=device)
        edge_to_vert.view(-1)[cut] = inv
        a, b = uniq // n_vert, uniq % n_vert
        table = device_constant(_TRIANGLE_ROWS, torch.long, device).view(16, 2, 3)[code]
        first = torch.gather(edge_to_vert, 1, table[:, 0])  # (Tv, 3)
        two = torch.nonzero_static(ntri == 2, size=n_two).squeeze(1)
        second = torch.gather(gather_rows(edge_to_vert, two), 1, gather_rows(table, two)[:, 1])
        faces = torch.cat([first, second], 0)
    # gathers with a fixed-order backward (core.ops): a grid vertex is the end of many crossing edges
    s_a, s_b = gather_rows(sdf, a), gather_rows(sdf, b)
    # the zero crossing of the linear interpolation along the edge (DMTet, Shen et al. 2021)
    verts = (gather_rows(pos, a) * s_b[:, None] - gather_rows(pos, b) * s_a[:, None]) / (s_b - s_a)[:, None]
    return Mesh(verts, faces)


class DMTet(nn.Module):
    """Per-vertex SDF and deformation on the project's Kuhn grid of [-bound, bound]^3, optionally
    rescaled per axis (`rescale_to_density`: the released code's tet_scale)."""

    def __init__(self, resolution: int = 128, bound: float = 1.0, device="cpu"):
        super().__init__()
        verts = grid_vertices(resolution, bound)
        self.resolution = int(resolution)
        self.bound = float(bound)
        self.spacing = 2.0 * bound / resolution
        self.register_buffer("grid_verts", torch.from_numpy(verts).to(device))
        # the tetrahedra are not stored (6 r³ of them: 3.2 GB at r = 256): those of a voxel are its
        # corner's index + these offsets (core.representations.tets.voxel_tet_offsets)
        self.register_buffer("tet_offsets", torch.from_numpy(voxel_tet_offsets(resolution)).to(device),
                             persistent=False)
        self.sdf = nn.Parameter(torch.zeros(verts.shape[0], device=device))
        self.deform = nn.Parameter(torch.zeros(verts.shape[0], 3, device=device))  # initialised to zero
        self.register_buffer("scale", torch.ones(3, device=device))  # per-axis scale of the grid

    def vertices(self) -> torch.Tensor:
        """Deformed grid vertices: each moves at most half a (scaled) grid spacing per axis (tanh bound)."""
        return self.grid_verts + 0.5 * self.spacing * self.scale * torch.tanh(self.deform)

    @torch.no_grad()
    def set_scale(self, scale: torch.Tensor) -> None:
        """Scale the grid's vertices per axis by `scale` (3,) from the unscaled grid."""
        scale = torch.as_tensor(scale, dtype=self.grid_verts.dtype, device=self.grid_verts.device).reshape(3)
        self.grid_verts.mul_(scale / self.scale)
        self.scale.copy_(scale)

    @torch.no_grad()
    def rescale_to_density(self, density_fn, threshold: float, margin: float = 0.1, chunk: int = 262144) -> torch.Tensor:
        """The released code's tet_scale (Magic123 nerf/renderer.py:1565-1572): scale_k = max |v_k| over
        the (unscaled) grid vertices with σ(v) > τ, + margin, per axis; the grid is multiplied by it,
        so it spans [−scale_k, scale_k] on axis k. Without such a vertex the grid is left as is."""
        self.set_scale(torch.ones(3))
        pts = self.grid_verts
        vals = torch.cat([density_fn(pts[i:i + chunk]).reshape(-1).float() for i in range(0, pts.shape[0], chunk)])
        inside = vals > threshold
        if not bool(inside.any()):
            return self.scale.clone()
        self.set_scale(pts[inside].abs().amax(0) + margin)
        return self.scale.clone()

    @property
    def num_tets(self) -> int:
        return 6 * self.resolution ** 3

    def all_tets(self) -> torch.Tensor:
        """Every tetrahedron of the grid (6 r³, 4): voxel (i, j, k)'s six are rows 6 (i r² + j r + k) … + 5."""
        return self._voxel_tets(torch.arange(self.resolution ** 3, device=self.tet_offsets.device))

    def _voxel_tets(self, voxels: torch.Tensor) -> torch.Tensor:
        """The 6 tetrahedra of each voxel index (i r² + j r + k), in the grid's order: (6 len(voxels), 4)."""
        r, n = self.resolution, self.resolution + 1
        i, rest = torch.div(voxels, r * r, rounding_mode="floor"), voxels % (r * r)
        j, k = torch.div(rest, r, rounding_mode="floor"), rest % r
        return self._corner_tets((i * n + j) * n + k)

    def _corner_tets(self, base: torch.Tensor) -> torch.Tensor:
        """The 6 tetrahedra of the voxels whose (0,0,0) corners are the vertices `base`: (6 len(base), 4)."""
        return (base[:, None, None] + self.tet_offsets[None]).reshape(-1, 4)

    @torch.no_grad()
    def surface_tets(self) -> torch.Tensor:
        """The tetrahedra of the voxels whose 8 corners are not all on one side (sdf > 0 or not), in
        the grid's order. A tetrahedron's corners are corners of its voxel, so the others cannot be
        cut: marching tetrahedra over these gives the mesh it gives over all 6 r³ (the same vertices
        and faces, in the same order), reading 8 bytes a voxel instead of 4 indices a tetrahedron."""
        n = self.resolution + 1
        # a voxel is cut where the largest of its 8 corners' inside flags exceeds the smallest: two
        # 2×2×2 max pools, the second of the negated flags, give max − min per voxel (i, j, k); padded
        # to the vertices' (n, n, n), its nonzeros' flat indices are the voxels' (0,0,0) corners
        # ((i n + j) n + k), in the voxels' order. 16 operators from the host where the 8 corner
        # slices' sum and the indices' arithmetic took 54 (the device idles while the host runs the mesh
        # path: reports/speed, session 37)
        occ = (self.sdf > 0).to(self.sdf.dtype).view(1, 1, n, n, n)
        pool = torch.nn.functional.max_pool3d
        spread = torch.nn.functional.pad(pool(occ, 2, stride=1) + pool(-occ, 2, stride=1), (0, 1, 0, 1, 0, 1))
        return self._corner_tets(torch.nonzero(spread.reshape(-1)).squeeze(1))

    def extract(self) -> Mesh:
        return marching_tets(self.vertices(), self.sdf, self.surface_tets())

    @torch.no_grad()
    def init_from_density(self, density_fn, threshold: float, chunk: int = 262144, sdf_scale: str = "threshold") -> None:
        """SDF from the coarse NeRF's density level set (Magic123 §2.1.2) at the grid's vertices:
        s = (σ(x) − τ) clamped to [−1, 1] (`sdf_scale` 'unit': the released code, nerf/renderer.py:
        1573-1574) or s = (σ(x) − τ) / τ clamped to [−1, 1] ('threshold'); deformation to zero."""
        pts = self.grid_verts
        vals = torch.cat([density_fn(pts[i:i + chunk]).reshape(-1).float() for i in range(0, pts.shape[0], chunk)])
        # a field that never reaches τ gets the coarse mesh's lower level, not an empty start
        level = surface_level(float(vals.min()), float(vals.max()), float(threshold), "fine stage (DMTet init)")
        threshold = threshold if level is None else level
        scale = (abs(threshold) if threshold != 0 else 1.0) if sdf_scale == "threshold" else 1.0
        self.sdf.copy_(((vals - threshold) / scale).clamp(-1.0, 1.0))
        self.deform.zero_()

    @torch.no_grad()
    def init_from_sdf(self, sdf_fn, chunk: int = 262144) -> None:
        """SDF from an analytic function (positive inside); for tests and procedural starts."""
        pts = self.grid_verts
        self.sdf.copy_(torch.cat([sdf_fn(pts[i:i + chunk]).reshape(-1) for i in range(0, pts.shape[0], chunk)]))
        self.deform.zero_()


class ColourField(nn.Module):
    """The fine stage's neural colour field, a trainable copy of the coarse field's colour branch
    (Magic3D; Magic123 §2.1.2). Any object with `albedo(x (N,3)) -> (N,3)` in [0, 1] works."""

    def __init__(self, coarse_field: nn.Module):
        super().__init__()
        self.field = copy.deepcopy(coarse_field)
        for name, p in self.field.named_parameters():
            p.requires_grad_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.field.albedo(x)

    def trainable_parameters(self):
        return [p for p in self.field.parameters() if p.requires_grad]


def mesh_edges(faces: torch.Tensor) -> torch.Tensor:
    """Unique undirected edges (E, 2) of a triangle mesh, ascending pairs in lexicographic order."""
    return unique_edges(face_edges(faces), int(faces.max()) + 1 if faces.numel() else 1)


def boundary_edge_count(faces: torch.Tensor) -> int:
    """Edges used by exactly one face (0 for a closed, watertight mesh)."""
    _, counts = torch.unique(face_edges(faces), dim=0, return_counts=True)
    return int((counts == 1).sum())


__all__ = ["DMTet", "ColourField", "Mesh", "marching_tets", "mesh_edges", "boundary_edge_count",
           "TRIANGLE_TABLE", "NUM_TRIANGLES", "TET_EDGES"]
