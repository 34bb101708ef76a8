"""The guidance protocol every prior implements (threestudio's idea, without its registry).

A guidance judges novel-view renders. It receives a `RenderBatch` (images, opacity, depth, normals,
the cameras, the shading mode and light used, the step) and returns a `GuidanceOutput`: a scalar
loss whose gradient flows into the renders, and float diagnostics for logging.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol, runtime_checkable

import torch

from core.rendering.cameras import Cameras


@dataclass
class RenderBatch:
    rgb: torch.Tensor  # (B, 3, H, W) in [0, 1], composited on white
    opacity: torch.Tensor  # (B, 1, H, W)
    depth: torch.Tensor  # (B, 1, H, W), distance along the camera axis; 0 where empty
    normal: Optional[torch.Tensor]  # (B, 3, H, W) world-space unit normals, or None
    cameras: Cameras
    shading: str  # 'albedo' | 'lambertian' | 'textureless' | 'normal'
    light_dir: Optional[torch.Tensor]  # (B, 3) world-space directions towards the light
    step: int = 0
    total_steps: int = 1
    stage: str = "coarse"  # 'coarse' | 'fine'
    ambient: float = 0.1  # the shading's ambient and diffuse factors (core/rendering/shading.py)
    diffuse: float = 0.9


@dataclass
class GuidanceOutput:
    loss: torch.Tensor  # scalar, weights already applied
    diagnostics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Guidance(Protocol):
    def __call__(self, batch: RenderBatch) -> GuidanceOutput: ...
