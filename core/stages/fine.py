"""The fine stage loop (Magic123 §2.1.2, §3.2): the coarse NeRF becomes a DMTet mesh that is refined
at 8× the coarse resolution, with the same reference / novel-view schedule as the coarse stage.

Set-up (Magic123 §2.1.2): the DMTet SDF is initialised from the NeRF density level set
(`coarse.mesh_threshold`), the deformation at zero, and the neural colour field is a trainable copy
of the NeRF's colour branch (Magic3D). Each iteration extracts the mesh by marching tetrahedra and
rasterises it (core/rendering/raster.py: nvdiffrast on CUDA when available, else PyTorch).

Losses per iteration:
  reference view (every `camera.ref_every`-th, or with `camera.ref_prob`):
      eq. 1 with the reference mask's edge eroded by `fine.mask_erode_px` px for the colour term
      (colours at the segmentation edge mix in the background; the mask term keeps the full mask
      so the silhouette still pins the outline), + λ_d · eq. 2 when a reference depth exists;
  novel view: the guidance (fine-stage prior weights, the shading schedule without the coarse
      stage's normals-only phase);
  always: mesh normal consistency and Laplacian smoothing (0.1 each; core/stages/losses.py).
Adam (no weight decay; the colour field's hash grid at lr × coarse.grid_lr_scale as in the coarse
stage). Checkpoints are atomic and hold everything needed to resume exactly.
Outputs as the coarse stage's folder: renders/, reference_rgba.png, mesh.obj/.mtl/_albedo.png,
mesh.glb, turntable.gif and, written last, result.json.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from core.rendering.cameras import orbit_cameras, reference_cameras, sample_cameras
from core.representations.dmtet import DMTet, ColourField, Mesh
from core.inputs.images import Reference, save_rgba
from core.stages.losses import (mesh_laplacian_loss, mesh_normal_consistency, pearson_depth_loss, reference_mask_loss,
                         reference_rgb_loss)
from core.rendering.mesh_render import render_mesh
from core.rendering.raster import make_rasterizer
from core.stages import engine as stage_loop
from core.rendering.shading import sample_ambient, sample_light, sample_shading

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
RESULT = "result.json"


def erode_mask(mask: torch.Tensor, px: int) -> torch.Tensor:
    """Binary erosion of a (B, 1, H, W) mask by `px` pixels (a (2px+1)² square)."""
    if px <= 0:
        return mask
    return 1.0 - F.max_pool2d(1.0 - mask, 2 * px + 1, stride=1, padding=px)


def resize_reference(ref: Reference, size: int) -> Reference:
    """The reference at the fine resolution (bilinear colour/depth, mask re-binarised)."""
    if ref.rgb.shape[-1] == size and ref.rgb.shape[-2] == size:
        return ref
    log.info("fine stage: reference resized from %d² to %d²", ref.rgb.shape[-1], size)
    up = lambda t: F.interpolate(t[None].float(), size=(size, size), mode="bilinear", align_corners=False)[0]  # noqa: E731
    return Reference(rgb=up(ref.rgb).clamp(0, 1), mask=(up(ref.mask) > 0.5).float(),
                     depth=up(ref.depth) if ref.depth is not None else None, image_path=ref.image_path)


class FineTrainer:
    """State of one fine run: DMTet, colour field, optimiser, RNG; `step()` runs one iteration."""

    def __init__(self, params, reference: Reference, coarse_field, guidance=None, device="cpu"):
        self.params, self.guidance = params, guidance
        self.device = torch.device(device)
        f, c = params.fine, params.coarse
        self.reference = resize_reference(reference, f.resolution)
        self.dmtet = DMTet(f.tet_resolution, c.bound, device=self.device)
        coarse_field = coarse_field.to(self.device)
        self.dmtet.init_from_density(coarse_field.density, c.mesh_threshold)
        self.colour = ColourField(coarse_field).to(self.device)
        self.field_config = dict(getattr(coarse_field, "config", {}))
        self.rasterizer = make_rasterizer(f.rasterizer, self.device)
        enc = getattr(self.colour.field, "encoding", None)
        groups = [{"params": [self.dmtet.sdf, self.dmtet.deform], "lr": f.lr}]
        if enc is not None:
            enc_ids = {id(p) for p in enc.parameters()}
            groups.append({"params": list(enc.parameters()), "lr": f.lr * c.grid_lr_scale})
            groups.append({"params": [p for p in self.colour.parameters() if id(p) not in enc_ids], "lr": f.lr})
        else:
            groups.append({"params": list(self.colour.parameters()), "lr": f.lr})
        self.optimizer = torch.optim.Adam(groups, lr=f.lr, betas=(0.9, 0.99), eps=1e-15, weight_decay=0.0)
        self.generator = torch.Generator().manual_seed(params.seed + 1)
        self.step_no = 0
        self.elapsed = 0.0
        self.ref_cameras = reference_cameras(params.camera, device=self.device)
        self.ref_rgb = self.reference.rgb[None].to(self.device)
        self.ref_mask = self.reference.mask[None].to(self.device)
        self.ref_mask_eroded = erode_mask(self.ref_mask, f.mask_erode_px)
        self.ref_depth = self.reference.depth[None].to(self.device) if self.reference.depth is not None else None

    # ---------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "stage": "fine", "step": self.step_no, "params": self.params.to_dict(),
            "dmtet": {"sdf": self.dmtet.sdf.detach().cpu(), "deform": self.dmtet.deform.detach().cpu(),
                      "resolution": self.dmtet.resolution, "bound": self.dmtet.bound},
            "colour_field": self.colour.field.state_dict(), "field_config": self.field_config,
            "optimizer": self.optimizer.state_dict(),
            **stage_loop.rng_state(self.generator),
            "elapsed": self.elapsed, "rasterizer": self.rasterizer.backend,
        }

    def load_state_dict(self, ck: dict) -> None:
        d = ck["dmtet"]
        if d["resolution"] != self.dmtet.resolution:
            raise ValueError(f"checkpoint tet resolution {d['resolution']} ≠ fine.tet_resolution {self.dmtet.resolution}")
        with torch.no_grad():
            self.dmtet.sdf.copy_(d["sdf"])
            self.dmtet.deform.copy_(d["deform"])
        self.colour.field.load_state_dict(ck["colour_field"])
        self.optimizer.load_state_dict(ck["optimizer"])
        stage_loop.set_rng_state(ck, self.generator)
        self.step_no = int(ck["step"])
        self.elapsed = float(ck.get("elapsed", 0.0))

    def save_checkpoint(self, path: Path) -> None:
        stage_loop.atomic_torch_save(self.state_dict(), path)

    # ---------------------------------------------------------------------------------- one step
    def mesh(self) -> Mesh:
        return self.dmtet.extract()

    def is_reference_step(self, step: int) -> bool:
        cam = self.params.camera
        if cam.ref_prob is not None:
            return bool(torch.rand((), generator=self.generator).item() < cam.ref_prob)
        return step % cam.ref_every == 0

    def render(self, mesh: Mesh, cams, resolution: int, shading="albedo", light=None, step=0, ambient=None):
        s = self.params.coarse.shading
        amb, dif = ambient if ambient is not None else (s.ambient, s.diffuse)  # (ambient, diffuse)
        return render_mesh(mesh, self.colour, cams, resolution, self.rasterizer, shading=shading, light_dir=light,
                           ambient=amb, diffuse=dif, step=step, total_steps=self.params.fine.iters,
                           stage="fine")

    def step(self) -> dict[str, float | str]:
        p, f = self.params, self.params.fine
        step, total = self.step_no, f.iters
        w = f.losses
        mesh = self.mesh()
        is_ref = self.is_reference_step(step)
        if is_ref:
            cams, shading, light = self.ref_cameras, "albedo", None
        else:
            cams = sample_cameras(p.camera, 1, self.generator, device=self.device)
            shading = sample_shading(step, total, p.coarse.shading, self.generator, stage="fine")
            light = sample_light(cams.centers.cpu(), self.generator).to(self.device)
        ambient = sample_ambient(p.coarse.shading, shading, self.generator)
        out = self.render(mesh, cams, f.resolution, shading, light, step, ambient)
        zero = out.rgb.new_zeros(())
        l_rgb = l_mask = l_depth = l_g = zero
        diag: dict = {}
        if is_ref:
            # Magic123 eq. 1 with the eroded mask in the colour term (fine.mask_erode_px)
            l_rgb = reference_rgb_loss(out.rgb, self.ref_rgb, self.ref_mask_eroded)
            l_mask = reference_mask_loss(out.opacity, self.ref_mask)
            if self.ref_depth is not None and w.depth > 0:
                l_depth = pearson_depth_loss(-out.depth, self.ref_depth, self.ref_mask)  # eq. 2 (render: distance)
        elif self.guidance is not None:
            g = self.guidance(out)
            l_g, diag = g.loss, g.diagnostics
        l_nc = mesh_normal_consistency(mesh.verts, mesh.faces) if (w.normal_consistency > 0 and mesh.num_faces) else zero
        l_lap = mesh_laplacian_loss(mesh.verts, mesh.faces) if (w.laplacian > 0 and mesh.num_faces) else zero
        loss = (w.rgb * l_rgb + w.mask * l_mask + w.depth * l_depth + l_g
                + w.normal_consistency * l_nc + w.laplacian * l_lap)
        self.optimizer.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
            self.optimizer.step()
        self.step_no += 1
        return {"loss": loss, "rgb": l_rgb, "mask": l_mask, "depth": l_depth, "guidance": l_g,
                "normal_consistency": l_nc, "laplacian": l_lap, "faces": float(mesh.num_faces),
                "reference": float(is_ref), "shading": shading, **diag}


# ------------------------------------------------------------------------------------------ outputs
def _to_uint8(t: torch.Tensor) -> np.ndarray:
    return (t.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


@torch.no_grad()
def write_outputs(trainer: FineTrainer, out: Path, turntable_frames: int = 36) -> dict:
    from core.export.textured import export_textured_mesh

    p, f = trainer.params, trainer.params.fine
    (out / "renders").mkdir(parents=True, exist_ok=True)
    files = []
    save_rgba(trainer.reference, out / "reference_rgba.png")
    files.append("reference_rgba.png")
    mesh = trainer.mesh().detach()
    ref = trainer.render(mesh, trainer.ref_cameras, f.resolution)
    a = ref.opacity[0].clamp_min(1e-6)
    rgb = ((ref.rgb[0] - (1 - ref.opacity[0])) / a).clamp(0, 1)  # un-composite from white
    stage_loop.atomic_save_png(out / "renders" / "reference.png", _to_uint8(torch.cat([rgb, ref.opacity[0]], 0)))
    files.append("renders/reference.png")
    n = p.evaluate.novel_views
    cams = orbit_cameras(n, 90.0, p.camera.radius, p.camera.fovy, start=360.0 / n, device=trainer.device)
    for i in range(n):
        r = trainer.render(mesh, cams[i], f.resolution)
        stage_loop.atomic_save_png(out / "renders" / f"novel_{i:03d}.png", _to_uint8(r.rgb[0]))
        files.append(f"renders/novel_{i:03d}.png")
    exported = export_textured_mesh(mesh, trainer.colour, out, texture_size=f.texture_size, rasterizer=trainer.rasterizer,
                                    turntable_frames=turntable_frames)
    files += list(exported.values())
    return {"files": files, "mesh_vertices": int(mesh.verts.shape[0]), "mesh_faces": int(mesh.faces.shape[0]),
            "exported": exported}


def run_fine(params, reference: Reference, coarse_field, out_dir, guidance=None, device=None,
             callback: Optional[Callable[[int, dict], None]] = None, resume: bool = True,
             stop_after: Optional[int] = None, progress: bool = True, write_results: bool = True,
             coarse_checkpoint: Optional[str] = None, turntable_frames: int = 36) -> FineTrainer:
    """Run (or resume) the fine stage into `out_dir`; returns the trainer (see core/stages/coarse.py's run_coarse)."""
    from core.params import resolve_device

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device is not None else resolve_device(params)
    (out / RESULT).unlink(missing_ok=True)  # nothing looks complete while a run is under way
    trainer = FineTrainer(params, reference, coarse_field, guidance=guidance, device=device)
    ck_path = out / CHECKPOINT
    if resume:
        stage_loop.resume(trainer, ck_path, "fine", params)
    f = params.fine
    log.info("fine stage: %d iterations at %d², tet grid %d³ (%d tets), rasteriser %s, device %s",
             f.iters, f.resolution, f.tet_resolution, trainer.dmtet.tets.shape[0], trainer.rasterizer.backend, device)
    done = stage_loop.drive(trainer, f.iters, ck_path, f.checkpoint_every, desc="fine", train=trainer.colour,
                            postfix=lambda m: {"loss": f"{m['loss']:.4f}", "faces": int(m["faces"])},
                            callback=callback, stop_after=stop_after, progress=progress)
    if not done:
        return trainer
    if write_results:
        info = write_outputs(trainer, out, turntable_frames=turntable_frames)
        if info.get("mesh_faces") == 0:
            log.warning("fine stage: the final mesh is empty (no surface left in the tet grid); see %s", out / "renders")
        result = {"stage": "fine", "steps": trainer.step_no, "seconds": round(trainer.elapsed, 3),
                  "device": str(device), "rasterizer": trainer.rasterizer.backend,
                  "tet_resolution": f.tet_resolution, "resolution": f.resolution,
                  "guidance": type(guidance).__name__ if guidance is not None else "none",
                  "coarse_checkpoint": str(coarse_checkpoint) if coarse_checkpoint else None,
                  "params_digest": params.digest(), **info, "checkpoint": CHECKPOINT}
        stage_loop.atomic_write_text(out / RESULT, json.dumps(result, indent=2))
    return trainer
