"""A mesh of the coarse NeRF: marching cubes (scikit-image) on its density, vertex colours from its
albedo; written as OBJ (vertex colours after the position) and PLY through trimesh, atomically."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from core.io import atomic_write_bytes

log = logging.getLogger(__name__)


def surface_level(lo: float, hi: float, threshold: float, what: str) -> float | None:
    """The density level to take a surface at: `threshold` when the density (range lo..hi) crosses
    it; otherwise half the maximum, with a warning, so that a result is never silently empty; None
    (warned) when the field is empty."""
    if lo < threshold < hi:
        return float(threshold)
    if hi <= 1e-6:
        log.warning("%s: the density field is empty; the mesh will be empty", what)
        return None
    level = 0.5 * float(hi)
    log.warning("%s: density never crosses %.3g; using level %.3g instead", what, threshold, level)
    return level


@torch.no_grad()
def extract_mesh(field, resolution: int = 128, threshold: float = 10.0, chunk: int = 1 << 18):
    """Marching cubes of {σ = threshold} over [−bound, bound]³ → (vertices (V,3), faces (F,3), colours (V,3) in [0,1]).

    When the density never crosses the threshold the level is lowered to half the maximum density
    (logged), so a result is never silently empty; an all-empty field gives an empty mesh."""
    from skimage import measure

    bound = field.bound
    dev = next(field.parameters()).device
    lin = torch.linspace(-bound, bound, resolution, device=dev)
    pts = torch.stack(torch.meshgrid(lin, lin, lin, indexing="ij"), -1).reshape(-1, 3)
    sig = torch.cat([field.density(pts[i:i + chunk]) for i in range(0, pts.shape[0], chunk)])
    vol = sig.view(resolution, resolution, resolution).float().cpu().numpy()
    level = surface_level(float(vol.min()), float(vol.max()), float(threshold), "mesh")
    if level is None:
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64), np.zeros((0, 3), np.float32)
    verts, faces, _normals, _ = measure.marching_cubes(vol, level=level)
    verts = verts / (resolution - 1) * 2 * bound - bound  # voxel index → world
    v = torch.from_numpy(verts.astype(np.float32)).to(dev)
    cols = torch.cat([field.albedo(v[i:i + chunk]) for i in range(0, v.shape[0], chunk)]) if len(v) else v
    # marching_cubes orders faces for a field increasing outward; density increases inward: flip
    faces = faces[:, ::-1].copy()
    return verts.astype(np.float32), faces.astype(np.int64), cols.clamp(0, 1).cpu().numpy().astype(np.float32)


def write_mesh(path, verts, faces, colors=None) -> None:
    """A vertex-coloured triangle mesh; the format follows the suffix (.obj, .ply, .glb, …)."""
    import trimesh

    path = Path(path)
    vc = (np.clip(colors, 0, 1) * 255).round().astype(np.uint8) if colors is not None else None
    mesh = trimesh.Trimesh(vertices=np.asarray(verts, np.float64), faces=np.asarray(faces, np.int64),
                           vertex_colors=vc, process=False)
    data = mesh.export(file_type=path.suffix.lstrip(".").lower())
    atomic_write_bytes(path, data if isinstance(data, bytes) else data.encode())
