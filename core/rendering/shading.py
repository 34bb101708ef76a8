"""Shading modes shared by the NeRF and mesh renderers (Magic123 §3.2, DreamFusion's shading).

Modes: 'albedo' (the colour field as is), 'lambertian' (diffuse), 'textureless' (diffuse on white),
'normal' (normals as colours). Schedule: normals only for the first part of the coarse stage, then
diffuse with p = 0.75 and textureless with p = 0.25; the reference view is always albedo.
"""
from __future__ import annotations

import torch

SHADING_MODES = ("albedo", "lambertian", "textureless", "normal")


def shade(albedo: torch.Tensor, normal: torch.Tensor, light_dir: torch.Tensor, mode: str,
          ambient: float = 0.1, diffuse: float = 0.9) -> torch.Tensor:
    """Colour of surface points. albedo, normal: (..., 3); light_dir: (3,) or broadcastable to (..., 3)."""
    if mode == "albedo":
        return albedo
    if mode == "normal":
        return (normal + 1.0) * 0.5
    lam = ambient + diffuse * (normal * light_dir).sum(-1, keepdim=True).clamp_min(0.0)
    if mode == "lambertian":
        return albedo * lam
    if mode == "textureless":
        return lam.expand_as(albedo)
    raise ValueError(f"unknown shading mode {mode!r} (one of {SHADING_MODES})")


def normal_only_iters(normal_only: float, total: int) -> int:
    """`normal_only` below 1 is a fraction of the stage (scripts: 0.2), else an iteration count (paper: 3000)."""
    return int(round(normal_only * total)) if normal_only < 1.0 else int(normal_only)


def sample_shading(step: int, total: int, shading_params, generator: torch.Generator | None = None,
                   stage: str = "coarse") -> str:
    """The shading mode of a novel view at `step` (Magic123 §3.2)."""
    if stage == "coarse" and step < normal_only_iters(shading_params.normal_only, total):
        return "normal"
    u = torch.rand((), generator=generator).item()
    if u < shading_params.textureless_prob:
        return "textureless"
    if u < shading_params.textureless_prob + shading_params.diffuse_prob:
        return "lambertian"
    return "albedo"


def sample_ambient(shading_params, mode: str = "lambertian",
                   generator: torch.Generator | None = None) -> tuple[float, float]:
    """(ambient, diffuse) of a view shaded with `mode`: for lambertian / textureless views with
    `random_ambient` (the released code's min_ambient_ratio) a ~ U(ambient, 1) and diffuse 1 − a,
    so that some views light the albedo almost flat; otherwise the fixed pair (no draw)."""
    if not shading_params.random_ambient or mode not in ("lambertian", "textureless"):
        return shading_params.ambient, shading_params.diffuse
    lo = shading_params.ambient
    a = lo + (1.0 - lo) * torch.rand((), generator=generator).item()
    return a, 1.0 - a


def sample_light(centers: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A light direction per camera (B, 3): the camera's direction, jittered (stable-dreamfusion)."""
    jitter = torch.randn(centers.shape, generator=generator).to(centers)
    return torch.nn.functional.normalize(centers + jitter, dim=-1)
