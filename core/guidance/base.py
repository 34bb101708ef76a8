"""The guidance protocol every prior implements (threestudio's idea, without its registry).

A guidance judges novel-view renders. It receives a `RenderBatch` (images, opacity, depth, normals,
the cameras, the shading mode and light used, the step) and returns a `GuidanceOutput`: a scalar
loss whose gradient flows into the renders, and diagnostics for logging: floats, or scalar tensors
left on the device. The engine reads those only when it logs (a trace row, the progress bar), so a
step does not make the host wait for the prior's UNet just to log its numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from core.rendering.batch import RenderBatch  # noqa: F401 - the type a guidance receives


Diagnostics = dict[str, "float | torch.Tensor"]  # scalars: floats, or 0-d tensors read when logged


@dataclass
class GuidanceOutput:
    loss: torch.Tensor  # scalar, weights already applied
    diagnostics: Diagnostics = field(default_factory=dict)


@runtime_checkable
class Guidance(Protocol):
    def __call__(self, batch: RenderBatch) -> GuidanceOutput: ...
