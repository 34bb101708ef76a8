"""The one render result type: what a representation's `render` returns and a guidance judges.

Both representations (the coarse NeRF, core/representations/nerf.py; the fine DMTet mesh,
core/representations/dmtet.py) fill the image fields; the NeRF also gives its per-sample weights,
normals and directions for the released code's orientation loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from core.rendering.cameras import Cameras


@dataclass
class RenderBatch:
    rgb: torch.Tensor  # (B, 3, H, W) in [0, 1], composited on white
    opacity: torch.Tensor  # (B, 1, H, W)
    depth: torch.Tensor  # (B, 1, H, W), distance along the camera axis; 0 where empty
    normal: Optional[torch.Tensor]  # (B, 3, H, W) world-space normals (composited), or None
    cameras: Optional[Cameras] = None
    shading: str = "albedo"  # 'albedo' | 'lambertian' | 'textureless' | 'normal'
    light_dir: Optional[torch.Tensor] = None  # (B, 3) world-space directions towards the light
    step: int = 0  # the guidance clock: iterations since the first stage began (core/stages/engine.py)
    total_steps: int = 1  # the clock's length: every stage's iterations together
    stage: str = "coarse"  # 'coarse' | 'fine'
    ambient: float = 0.1  # the shading's ambient and diffuse factors (core/rendering/shading.py)
    diffuse: float = 0.9
    albedo: Optional[torch.Tensor] = None  # (B, 3, H, W) unshaded colour on white, where the renderer gives it
    sample_weights: Optional[torch.Tensor] = None  # (M,) NeRF: weights of the samples that carry normals
    sample_normals: Optional[torch.Tensor] = None  # (M, 3)
    sample_dirs: Optional[torch.Tensor] = None  # (M, 3) their ray directions
    # NeRF: the released code's normal image Σ_i sg(w_i)·(n_i + 1)/2 (weights of the detached
    # density, no background; Magic123 nerf/renderer.py:1160-1162), for eq. 3 in its released form
    normal_sg: Optional[torch.Tensor] = None  # (B, 3, H, W)
    background: Optional[torch.Tensor] = None  # (B, 3) the colour behind the object; None: white
    # NeRF: the samples the field evaluated (after the occupancy grid and early termination): the
    # render's workload, known on the host from the compaction (no wait of its own); None elsewhere
    active_samples: Optional[int] = None
