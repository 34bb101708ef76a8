"""The guidance protocol every prior implements (threestudio's idea, without its registry).

A guidance judges novel-view renders. It receives a `RenderBatch` (images, opacity, depth, normals,
the cameras, the shading mode and light used, the step) and returns a `GuidanceOutput`: a scalar
loss whose gradient flows into the renders, and float diagnostics for logging.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from core.rendering.batch import RenderBatch  # noqa: F401 - the type a guidance receives


@dataclass
class GuidanceOutput:
    loss: torch.Tensor  # scalar, weights already applied
    diagnostics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Guidance(Protocol):
    def __call__(self, batch: RenderBatch) -> GuidanceOutput: ...
