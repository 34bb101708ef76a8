"""The coarse stage loop (Magic123 §2.1.1, §3.2): a NeRF from one reference view plus novel-view guidance.

Every `camera.ref_every`-th iteration (or with probability `camera.ref_prob` when set: Consistent123)
the reference view is rendered (albedo) and judged by eq. 1 (+ eq. 2 with a reference depth);
otherwise a novel camera is sampled, rendered with the scheduled shading (core/rendering/shading.py) and
judged by the guidance. Eq. 3 and the released code's entropy and orientation terms regularise
every render; eq. 4 sums them. Adam, no weight decay (hash grid lr × `grid_lr_scale`, released code).

Checkpoints (`DIR/checkpoint.pt`, atomic: tmp file + os.replace) hold the field, the optimiser,
the occupancy grid and every RNG state, so a killed run resumed from its checkpoint ends exactly
where an uninterrupted one ends (deterministic on CPU). At the end: renders/, mesh.obj, mesh.ply,
reference_rgba.png and, written last, result.json.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from core.rendering.cameras import orbit_cameras, reference_cameras, sample_cameras
from core.guidance.base import RenderBatch
from core.inputs.images import Reference, save_rgba
from core.stages.losses import (coarse_objective, entropy_loss, normal_smoothness_loss, orientation_loss,
                         pearson_depth_loss, reconstruction_loss)
from core.representations.nerf import NeRFField, OccupancyGrid, render, render_chunked
from core.stages import engine as stage_loop
from core.rendering.shading import sample_ambient, sample_light, sample_shading

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
RESULT = "result.json"


class CoarseTrainer:
    """State of one coarse run: field, optimiser, occupancy grid, RNG; `step()` runs one iteration."""

    def __init__(self, params, reference: Reference, guidance=None, device="cpu", detector=None):
        self.params, self.reference, self.guidance, self.detector = params, reference, guidance, detector
        self.device = torch.device(device)
        c = params.coarse
        self.field = NeRFField.from_params(params, device=self.device)
        self.occupancy = OccupancyGrid(c.occupancy_resolution, c.bound, c.occupancy_threshold,
                                       decay=c.occupancy_decay, device=self.device)
        self.optimizer = torch.optim.Adam(
            [{"params": self.field.encoding.parameters(), "lr": c.lr * c.grid_lr_scale},
             {"params": self.field.mlp.parameters(), "lr": c.lr}],
            lr=c.lr, betas=(0.9, 0.99), eps=1e-15, weight_decay=0.0)
        self.generator = torch.Generator().manual_seed(params.seed)
        self.step_no = 0
        self.stage2_step: Optional[int] = None
        self.elapsed = 0.0
        self.ref_cameras = reference_cameras(params.camera, device=self.device)
        self.ref_rgb = reference.rgb[None].to(self.device)
        self.ref_mask = reference.mask[None].to(self.device)
        self.ref_depth = reference.depth[None].to(self.device) if reference.depth is not None else None
        # a typical sample spacing: the box's edge over the samples per ray
        self.step_size = 2.0 * c.bound / c.samples_per_ray

    # ---------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "stage": "coarse", "step": self.step_no, "params": self.params.to_dict(),
            "field": self.field.state_dict(), "field_config": dict(self.field.config),
            "optimizer": self.optimizer.state_dict(), "occupancy": self.occupancy.state_dict(),
            **stage_loop.rng_state(self.generator),
            "stage2_step": self.stage2_step, "elapsed": self.elapsed,
            "hash_grid_backend": self.field.encoding.backend,
        }

    def load_state_dict(self, ck: dict) -> None:
        state = ck["field"]
        if self.field.encoding.backend == "torch" and "encoding.tcnn_encoding.params" in state:
            state = dict(state)
            state["encoding.table"] = state.pop("encoding.tcnn_encoding.params").reshape(self.field.encoding.table.shape)
        elif self.field.encoding.backend == "tcnn" and "encoding.table" in state:
            state = dict(state)
            state["encoding.tcnn_encoding.params"] = state.pop("encoding.table").reshape(-1)
        self.field.load_state_dict(state)
        self.optimizer.load_state_dict(ck["optimizer"])
        self.occupancy.load_state_dict(ck["occupancy"])
        stage_loop.set_rng_state(ck, self.generator)
        self.step_no = int(ck["step"])
        self.elapsed = float(ck.get("elapsed", 0.0))
        self.stage2_step = ck.get("stage2_step")
        if self.stage2_step is not None and hasattr(self.guidance, "start_stage2"):
            self.guidance.start_stage2(self.stage2_step)

    def save_checkpoint(self, path: Path) -> None:
        stage_loop.atomic_torch_save(self.state_dict(), path)

    # ---------------------------------------------------------------------------------- one step
    def is_reference_step(self, step: int) -> bool:
        cam = self.params.camera
        if cam.ref_prob is not None:
            return bool(torch.rand((), generator=self.generator).item() < cam.ref_prob)
        return step % cam.ref_every == 0

    def render_kw(self) -> dict:
        c = self.params.coarse
        return dict(samples_per_ray=c.samples_per_ray, occupancy=self.occupancy,
                    ambient=c.shading.ambient, diffuse=c.shading.diffuse, normals=c.normals)

    def step(self) -> dict[str, float | str]:
        p, c = self.params, self.params.coarse
        step, total = self.step_no, c.iters
        w = c.losses
        if c.lr_final < 1.0:  # exponential decay to lr·lr_final at the last iteration (a function of step: resumable)
            f = c.lr_final ** (step / max(1, total - 1))
            for g, base in zip(self.optimizer.param_groups, (c.lr * c.grid_lr_scale, c.lr)):
                g["lr"] = base * f
        if step % c.occupancy_every == 0:  # from step 0: the blob already empties most of the box
            self.occupancy.update(self.field, self.step_size, self.generator)
        is_ref = self.is_reference_step(step)
        if is_ref:
            cams, shading, light = self.ref_cameras, "albedo", None
        else:
            cams = sample_cameras(p.camera, 1, self.generator, device=self.device)
            shading = sample_shading(step, total, c.shading, self.generator, stage="coarse")
            light = sample_light(cams.centers.cpu(), self.generator).to(self.device)
        kw = self.render_kw()
        kw["ambient"], kw["diffuse"] = sample_ambient(c.shading, shading, self.generator)
        need_normals = shading in ("lambertian", "textureless", "normal") or w.normal_smooth > 0 or w.orientation > 0
        out = render(self.field, cams, c.resolution, shading=shading, light_dir=light, perturb=True,
                     generator=self.generator, need_normals=need_normals, **kw)
        zero = out.rgb.new_zeros(())
        l_rec, l_g, l_depth, diag = zero, zero, zero, {}
        if is_ref:
            l_rec = reconstruction_loss(out.rgb, out.opacity, self.ref_rgb, self.ref_mask, w.rgb, w.mask)  # eq. 1
            if self.ref_depth is not None and w.depth > 0:
                # eq. 2; the reference depth is bigger = nearer (disparity-like), the render's is
                # distance, so the render's is negated before the correlation
                l_depth = pearson_depth_loss(-out.depth, self.ref_depth, self.ref_mask)
        elif self.guidance is not None:
            batch = RenderBatch(rgb=out.rgb, opacity=out.opacity, depth=out.depth, normal=out.normal, cameras=cams,
                                shading=shading, light_dir=light, step=step, total_steps=total, stage="coarse",
                                ambient=kw["ambient"], diffuse=kw["diffuse"])
            g = self.guidance(batch)
            l_g, diag = g.loss, g.diagnostics
        l_n = normal_smoothness_loss(out.normal) if (w.normal_smooth > 0 and out.normal is not None) else zero  # eq. 3
        loss = coarse_objective(l_rec, l_g, l_depth, l_n, w.depth, w.normal_smooth)  # eq. 4
        l_ent = entropy_loss(out.opacity) if w.entropy > 0 else zero
        l_ori = (orientation_loss(out.sample_weights, out.sample_normals, out.sample_dirs, out.opacity.numel())
                 if (w.orientation > 0 and out.sample_normals is not None) else zero)
        loss = loss + w.entropy * l_ent + w.orientation * l_ori
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self._detector_hook(step)
        self.step_no += 1
        return {"loss": loss, "rec": l_rec, "guidance": l_g, "depth": l_depth, "normal_smooth": l_n,
                "entropy": l_ent, "orientation": l_ori, "reference": float(is_ref), "shading": shading, **diag}

    def _detector_hook(self, step: int) -> None:
        d, det = self.detector, self.params.detector
        if d is None or self.stage2_step is not None:
            return
        fired = False
        if d.due(step):
            with torch.no_grad():
                cams = orbit_cameras(det.views, 90.0, self.params.camera.radius, self.params.camera.fovy, device=self.device)
                imgs = render_chunked(self.field, cams, self.params.coarse.resolution, shading="albedo",
                                      need_normals=False, **self.render_kw()).rgb
            fired = bool(d.update(step, imgs)) and step >= det.earliest
        if fired or step >= det.latest:
            self.stage2_step = step
            log.info("stage detector: switching to stage 2 at step %d%s", step, "" if fired else " (forced: latest)")
            if hasattr(self.guidance, "start_stage2"):
                self.guidance.start_stage2(step)


# ------------------------------------------------------------------------------------------ outputs
def _img_to_uint8(t: torch.Tensor) -> np.ndarray:
    return (t.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def write_outputs(trainer: CoarseTrainer, out: Path) -> dict:
    """renders/, reference_rgba.png, mesh.obj/.ply; returns the file list for result.json."""
    from core.export.mesh import extract_mesh, write_obj, write_ply

    p = trainer.params
    c = p.coarse
    field = trainer.field
    field.eval()
    (out / "renders").mkdir(parents=True, exist_ok=True)
    files = []
    save_rgba(trainer.reference, out / "reference_rgba.png")
    files.append("reference_rgba.png")
    kw = dict(trainer.render_kw(), need_normals=False, shading="albedo")
    ref = render_chunked(field, trainer.ref_cameras, c.resolution, **kw)
    rgba = torch.cat([ref.albedo[0], ref.opacity[0]], 0)
    # RGBA: colour un-composited from white where partly transparent
    a = ref.opacity[0].clamp_min(1e-6)
    rgba[:3] = ((ref.albedo[0] - (1 - ref.opacity[0])) / a).clamp(0, 1)
    stage_loop.atomic_save_png(out / "renders" / "reference.png", _img_to_uint8(rgba))
    files.append("renders/reference.png")
    n = p.evaluate.novel_views
    cams = orbit_cameras(n, 90.0, p.camera.radius, p.camera.fovy, start=360.0 / n, device=trainer.device)
    nov = render_chunked(field, cams, c.resolution, **kw)
    for i in range(n):
        stage_loop.atomic_save_png(out / "renders" / f"novel_{i:03d}.png", _img_to_uint8(nov.rgb[i]))
        files.append(f"renders/novel_{i:03d}.png")
    verts, faces, cols = extract_mesh(field, c.mesh_resolution, c.mesh_threshold)
    write_obj(out / "mesh.obj", verts, faces, cols)
    write_ply(out / "mesh.ply", verts, faces, cols)
    files += ["mesh.obj", "mesh.ply"]
    return {"files": files, "mesh_vertices": int(len(verts)), "mesh_faces": int(len(faces))}


def run_coarse(params, reference: Reference, out_dir, guidance=None, detector=None, device=None,
               callback: Optional[Callable[[int, dict], None]] = None, resume: bool = True,
               stop_after: Optional[int] = None, progress: bool = True, write_results: bool = True) -> CoarseTrainer:
    """Run (or resume) the coarse stage into `out_dir`; returns the trainer.

    `callback(step, metrics)` gets each iteration's float metrics (for MLflow in tasks/).
    `stop_after=k` stops after iteration k as a kill would (checkpoint as of the last save; no
    outputs): used to test resuming. result.json is written last and only on completion.
    """
    from core.params import resolve_device

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device is not None else resolve_device(params)
    (out / RESULT).unlink(missing_ok=True)  # nothing looks complete while a run is under way
    trainer = CoarseTrainer(params, reference, guidance=guidance, device=device, detector=detector)
    ck_path = out / CHECKPOINT
    if resume:
        stage_loop.resume(trainer, ck_path, "coarse", params)
    c = params.coarse
    log.info("coarse stage: %d iterations at %d², %d samples/ray, device %s, hash grid %s",
             c.iters, c.resolution, c.samples_per_ray, device, trainer.field.encoding.backend)
    done = stage_loop.drive(trainer, c.iters, ck_path, c.checkpoint_every, desc="coarse", train=trainer.field,
                            postfix=lambda m: {"loss": f"{m['loss']:.4f}", "occ": f"{trainer.occupancy.fraction():.2f}"},
                            callback=callback, stop_after=stop_after, progress=progress)
    if not done:
        return trainer
    if write_results:
        info = write_outputs(trainer, out)
        result = {"stage": "coarse", "steps": trainer.step_no, "seconds": round(trainer.elapsed, 3),
                  "device": str(device), "hash_grid_backend": trainer.field.encoding.backend,
                  "guidance": type(guidance).__name__ if guidance is not None else "none",
                  "stage2_step": trainer.stage2_step, "params_digest": params.digest(), **info,
                  "checkpoint": CHECKPOINT}
        stage_loop.atomic_write_text(out / RESULT, json.dumps(result, indent=2))
    return trainer
