"""The numbers lift3d reports: PSNR, mask IoU, and the relative Chamfer distance of two surfaces.

One definition each; the evaluation step (core/evaluation/evaluate.py) and the oracle bench
(core/oracle/) both use them.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def psnr(pred: torch.Tensor, target: torch.Tensor, cap: float = 100.0) -> float:
    """PSNR = 10·log10(1 / MSE) for images in [0, 1]; `cap` when MSE is 0 (or the value exceeds it)."""
    mse = float(torch.mean((pred.float() - target.float()) ** 2))
    if mse <= 0.0:
        return float(cap)
    return float(min(cap, 10.0 * math.log10(1.0 / mse)))


def mask_iou(opacity: torch.Tensor, mask: torch.Tensor, threshold: float = 0.5) -> float:
    """Intersection over union of two masks thresholded at `threshold` (1 when both are empty)."""
    a, b = opacity > threshold, mask > threshold
    union = (a | b).sum()
    return 1.0 if union == 0 else float((a & b).sum()) / float(union)


def sample_mesh_surface(verts: torch.Tensor, faces: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """n points uniformly on a triangle mesh (area-weighted faces, uniform barycentrics)."""
    g = torch.Generator().manual_seed(seed)
    v = verts.detach().cpu().double()[faces.cpu()]
    area = torch.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0], dim=-1).norm(dim=-1)
    idx = torch.multinomial(area / area.sum(), n, replacement=True, generator=g)
    r1, r2 = torch.rand(n, generator=g).double(), torch.rand(n, generator=g).double()
    s = r1.sqrt()
    b0, b1, b2 = 1 - s, s * (1 - r2), s * r2
    t = v[idx]
    return (b0[:, None] * t[:, 0] + b1[:, None] * t[:, 1] + b2[:, None] * t[:, 2]).float()


def chamfer_relative(points: torch.Tensor, true_points: torch.Tensor) -> float:
    """Symmetric Chamfer distance (mean of the two mean nearest-neighbour distances) over the
    diagonal of the true points' bounding box."""
    from scipy.spatial import cKDTree

    a, b = points.cpu().numpy().astype(np.float64), true_points.cpu().numpy().astype(np.float64)
    d_ab = cKDTree(b).query(a)[0].mean()
    d_ba = cKDTree(a).query(b)[0].mean()
    diag = float(np.linalg.norm(b.max(0) - b.min(0)))
    return float(0.5 * (d_ab + d_ba) / diag)
