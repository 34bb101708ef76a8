"""Oracle guidance: the "prior" is a known procedural object (core/oracle/objects.py).

It renders the object from the batch's cameras with the batch's shading mode, light and ambient, and
returns the MSE of the NeRF's renders against those: λ_rgb·MSE(rgb) + λ_mask·MSE(opacity)
(+ λ_depth·MSE(depth) when `depth_weight` > 0). With a perfect reconstruction the loss is 0.
Same interface as the diffusion priors (core/guidance/base.py), so it exercises cameras,
renderer, shading, losses and the loop exactly as they run with SDS.
"""
from __future__ import annotations

import torch

from core.guidance.base import GuidanceOutput, RenderBatch
from core.oracle.objects import ProceduralObject, make_object


class OracleGuidance:
    def __init__(self, obj: ProceduralObject | str, params, depth_weight: float = 0.0):
        self.obj = make_object(obj) if isinstance(obj, str) else obj
        self.params = params
        w = params.coarse.losses
        self.rgb_weight, self.mask_weight, self.depth_weight = w.rgb, w.mask, depth_weight

    def target(self, batch: RenderBatch) -> dict[str, torch.Tensor]:
        h, w = batch.rgb.shape[-2:]
        tgt = self.obj.render(batch.cameras, h, w, shading=batch.shading, light_dir=batch.light_dir,
                              ambient=batch.ambient, diffuse=batch.diffuse)
        bg = getattr(batch, "background", None)
        if bg is not None:  # the render is over a coloured background (the stage's novel_background): so is the target
            bg = bg.to(tgt["rgb"])[:, :, None, None]
            tgt = dict(tgt, rgb=tgt["rgb"] + (1.0 - tgt["opacity"]) * (bg - 1.0))
        return tgt

    def __call__(self, batch: RenderBatch) -> GuidanceOutput:
        tgt = self.target(batch)
        dev = batch.rgb.device
        l_rgb = ((batch.rgb - tgt["rgb"].to(dev)) ** 2).mean()
        l_mask = ((batch.opacity - tgt["opacity"].to(dev)) ** 2).mean()
        loss = self.rgb_weight * l_rgb + self.mask_weight * l_mask
        diag = {"oracle_rgb_mse": l_rgb.detach(), "oracle_mask_mse": l_mask.detach()}  # read when logged
        if self.depth_weight > 0:
            l_depth = ((batch.depth - tgt["depth"].to(dev)) ** 2).mean()
            loss = loss + self.depth_weight * l_depth
            diag["oracle_depth_mse"] = l_depth.detach()
        return GuidanceOutput(loss=loss, diagnostics=diag)
