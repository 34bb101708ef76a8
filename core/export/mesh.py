"""A mesh of the coarse NeRF: marching cubes (scikit-image) on its density, vertex colours from its
albedo; OBJ (with `v x y z r g b`) and binary-free ASCII PLY writers, each written atomically."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from core.stages.engine import atomic_write_text

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


def write_obj(path, verts, faces, colors=None) -> None:
    path = Path(path)
    lines = ["# lift3d coarse NeRF mesh (marching cubes); vertex colours after the position"]
    for i, v in enumerate(verts):
        if colors is not None:
            c = colors[i]
            lines.append(f"v {v[0]:.6f} {v[1]:.6f} {v[2]:.6f} {c[0]:.4f} {c[1]:.4f} {c[2]:.4f}")
        else:
            lines.append(f"v {v[0]:.6f} {v[1]:.6f} {v[2]:.6f}")
    lines += [f"f {f[0] + 1} {f[1] + 1} {f[2] + 1}" for f in faces]
    atomic_write_text(path, "\n".join(lines) + "\n")


def write_ply(path, verts, faces, colors=None) -> None:
    path = Path(path)
    head = ["ply", "format ascii 1.0", f"element vertex {len(verts)}", "property float x", "property float y", "property float z"]
    if colors is not None:
        head += ["property uchar red", "property uchar green", "property uchar blue"]
    head += [f"element face {len(faces)}", "property list uchar int vertex_indices", "end_header"]
    body = []
    c8 = (np.clip(colors, 0, 1) * 255).round().astype(np.uint8) if colors is not None else None
    for i, v in enumerate(verts):
        s = f"{v[0]:.6f} {v[1]:.6f} {v[2]:.6f}"
        if c8 is not None:
            s += f" {c8[i, 0]} {c8[i, 1]} {c8[i, 2]}"
        body.append(s)
    body += [f"3 {f[0]} {f[1]} {f[2]}" for f in faces]
    atomic_write_text(path, "\n".join(head + body) + "\n")
