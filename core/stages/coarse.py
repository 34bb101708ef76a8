"""The coarse stage (Magic123 §2.1.1, §3.2): the stage loop over a NeRF.

The representation is Instant-NGP's hash grid + MLP (core/representations/nerf.py) with an
occupancy grid for empty-space skipping; the optimiser of `params.optimizer` with the hash grid at
lr × `grid_lr_scale` (released code) and an optional exponential lr decay; the hash grid's
coarse-to-fine level schedule (`coarse.level_mask`). Its regularisers: eq. 3's normal smoothness
(in the released code's form: TV + MSE to the blur, or the paper's), the released code's entropy
(on each sample's weight, ramped in) and orientation terms. At the end: renders/,
reference_rgba.png, mesh.obj / mesh.ply (marching cubes of the density) and, written last,
result.json.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Optional

import torch

from core.export.mesh import extract_mesh, write_mesh
from core.inputs.images import Reference
from core.io import writable_folder
from core.perf import compile_kind
from core.rendering.batch import RenderBatch
from core.rendering.cameras import Cameras
from core.representations.hashgrid import triton_kind
from core.representations.nerf import NeRFField, OccupancyGrid, render, render_chunked
from core.stages.engine import (CHECKPOINT, RESULT, Stage, StageSpec, StageState, clear_outputs, read_state,
                                write_views)
from core.stages.losses import (entropy_loss, normal_blur_mse_loss, normal_smoothness_loss, normal_tv_loss,
                                orientation_loss)

log = logging.getLogger(__name__)


def active_levels(kind: str, step: int, total: int, levels: int, mask_levels: int = 8, mask_iters: int = 3000) -> int:
    """How many hash-grid levels (the coarsest first) are in use at `step` (0-based) of `total`.

    'step' (Magic123): the finest `mask_levels` are zeroed while step ≤ mask_iters (nerf/utils.py:
    1266-1270 test the count of finished iterations, `global_step > grid_levels_mask_iters`, before
    the iteration; nerf/network_grid.py:71-75 zero the last mask_levels·level_dim features).
    'progressive' (Consistent123, stable-dreamfusion's progressive_level): the first
    max(1, min(L, ceil(r·L))) levels, r = min(1, 0.25 + 2·(step + 1)/total) (nerf/utils.py:705-707
    with global_step = step + 1; gridencoder/grid.py:42). 'none': all."""
    if kind == "step":
        return levels - min(mask_levels, levels) if (mask_levels > 0 and step <= mask_iters) else levels
    if kind == "progressive":
        r = min(1.0, 0.25 + 2.0 * (step + 1) / max(1, total))
        return max(min(int(math.ceil(r * levels)), levels), 1)
    return levels


def ramp(step: int, total: int, fraction: float) -> float:
    """min(1, (step + 1)/(fraction·total)): the released entropy weight's ramp (fraction 0.5 gives
    its min(1, 2·global_step/iters) with global_step = step + 1, nerf/utils.py:794-795); 1 for fraction 0."""
    if fraction <= 0:
        return 1.0
    return min(1.0, (step + 1) / (fraction * max(1, total)))


class NeRFRepresentation:
    """The coarse NeRF as the stage loop sees it (core.stages.engine.Representation)."""

    def __init__(self, params, device: torch.device):
        c = params.coarse
        self.c, self.device = c, device
        self.last_samples: Optional[int] = None  # the samples the last training render evaluated
        self.field = NeRFField.from_params(params, device=device)
        self.occupancy = OccupancyGrid(c.occupancy_resolution, c.bound, c.occupancy_threshold,
                                       decay=c.occupancy_decay, device=device, rule=c.occupancy_rule,
                                       density_threshold=c.occupancy_density_threshold)
        self.step_size = 2.0 * c.bound / c.samples_per_ray  # a typical sample spacing
        self.backend = self.field.encoding.backend
        self.compiled = compile_kind(c.compile, device, "coarse.compile") == "default"
        self.samples = triton_kind(c.samples, device, "coarse.samples")
        self.step, self.total = 0, c.iters

    def param_groups(self) -> list[dict]:
        c = self.c
        return [{"params": list(self.field.encoding.parameters()), "lr": c.lr * c.grid_lr_scale},
                {"params": list(self.field.mlp.parameters()), "lr": c.lr}]

    def before_step(self, step: int, total: int, generator: torch.Generator, optimizer) -> None:
        c = self.c
        self.step, self.total = step, total
        if c.lr_final < 1.0:  # exponential decay to lr·lr_final at the last iteration (a function of step)
            f = c.lr_final ** (step / max(1, total - 1))
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * f
        self.field.active_levels = active_levels(c.level_mask, step, total, self.field.encoding.levels,
                                                 c.level_mask_levels, c.level_mask_iters)
        if step % c.occupancy_every == 0:  # from step 0: the blob already empties most of the box
            self.occupancy.update(self.field, self.step_size, generator)

    def _render_kw(self) -> dict:
        c = self.c
        return dict(samples_per_ray=c.samples_per_ray, occupancy=self.occupancy, normals=c.normals,
                    samples=self.samples)

    def needs_normals(self, shading: str) -> bool:
        w = self.c.losses
        return (shading in ("lambertian", "textureless", "normal") or w.normal_smooth > 0 or w.orientation > 0
                or (self.c.normal_smooth_form == "released" and w.normal_smooth_tv > 0))

    def render(self, cameras: Cameras, resolution: int, *, shading: str, light_dir, ambient: float,
               diffuse: float, generator, ray_offsets=None) -> RenderBatch:
        out = render(self.field, cameras, resolution, shading=shading, light_dir=light_dir, perturb=True,
                     generator=generator, need_normals=self.needs_normals(shading), ambient=ambient,
                     diffuse=diffuse, ray_offsets=ray_offsets, compiled=self.compiled, **self._render_kw())
        self.last_samples = out.active_samples  # the step's workload, for progress()
        return out

    def render_views(self, cameras: Cameras, resolution: int) -> RenderBatch:
        """Albedo renders without gradients (the detector's views, the outputs)."""
        s = self.c.shading
        return render_chunked(self.field, cameras, resolution, shading="albedo", need_normals=False,
                              ambient=s.ambient, diffuse=s.diffuse, **self._render_kw())

    def regularisers(self, out: RenderBatch) -> dict[str, tuple[float, torch.Tensor]]:
        c = self.c
        w, zero = c.losses, out.rgb.new_zeros(())
        l_tv = zero
        if c.normal_smooth_form == "released":  # TV + MSE to the blur of Σ sg(w_i)(n_i + 1)/2
            n = out.normal_sg
            l_n = (normal_blur_mse_loss(n, 9, c.normal_smooth_blur_grad)
                   if (w.normal_smooth > 0 and n is not None) else zero)
            l_tv = normal_tv_loss(n) if (w.normal_smooth_tv > 0 and n is not None) else zero
        else:  # eq. 3 as printed
            l_n = normal_smoothness_loss(out.normal) if (w.normal_smooth > 0 and out.normal is not None) else zero
        l_ent = zero
        if w.entropy > 0:
            vals = out.sample_weights if c.entropy_on == "samples" else out.opacity
            l_ent = entropy_loss(vals) if vals is not None and vals.numel() else zero
        w_ent = w.entropy * ramp(self.step, self.total, c.entropy_ramp)
        l_ori = (orientation_loss(out.sample_weights, out.sample_normals, out.sample_dirs, out.opacity.numel())
                 if (w.orientation > 0 and out.sample_normals is not None) else zero)
        regs = {"normal_smooth": (w.normal_smooth, l_n), "entropy": (w_ent, l_ent),
                "orientation": (w.orientation, l_ori)}
        if c.normal_smooth_form == "released":
            regs["normal_smooth_tv"] = (w.normal_smooth_tv, l_tv)
        return regs

    def progress(self) -> dict[str, Any]:
        """The occupancy grid's occupied fraction and the samples the last training render evaluated
        (a host integer from its compaction: no wait)."""
        out: dict[str, Any] = {"occupied": self.occupancy.fraction()}
        if self.last_samples is not None:
            out["samples"] = self.last_samples
        return out

    def train(self, mode: bool = True):
        return self.field.train(mode)

    def state_dict(self) -> dict:
        return {"field": self.field.state_dict(), "field_config": dict(self.field.config),
                "occupancy": self.occupancy.state_dict(), "hash_grid_backend": self.backend}

    def load_state_dict(self, state: dict) -> None:
        self.field.load_portable_state_dict(state["field"])
        self.occupancy.load_state_dict(state["occupancy"])


def reference_resolution(params) -> int:
    """The coarse stage's reference-view render size: int(ref_scale · resolution) (released:
    int(known_view_scale · h), Magic123 nerf/provider.py:203, nerf/utils.py:381). The reference
    image is best loaded at this size (the stage resizes one of another size)."""
    c = params.coarse
    return int(c.ref_scale * c.resolution)


def coarse_spec(params) -> StageSpec:
    c = params.coarse
    return StageSpec(name="coarse", iters=c.iters, resolution=c.resolution, checkpoint_every=c.checkpoint_every,
                     seed=params.seed, rgb=c.losses.rgb, mask=c.losses.mask, depth=c.losses.depth,
                     clock_offset=0, clock_total=c.iters + params.fine.iters, ref_warmup=c.ref_warmup,
                     ref_resolution=reference_resolution(params), ref_ray_noise=c.ref_ray_noise,
                     novel_background=c.novel_background)


def load_coarse_field(checkpoint: Path | str, device="cpu") -> tuple[NeRFField, StageState]:
    """A coarse checkpoint → (its NeRF field in eval mode on `device`, the whole coarse state)."""
    state = read_state(checkpoint, "coarse")
    rep = state.representation
    return NeRFField.from_state(rep["field_config"], rep["field"], device), state


def write_outputs(rep: NeRFRepresentation, params, reference: Reference, out: Path) -> dict:
    """renders/, reference_rgba.png, mesh.obj/.ply; returns the file list for result.json."""
    c = params.coarse
    rep.field.eval()
    files = write_views(rep, params, reference, out, c.resolution)
    verts, faces, cols = extract_mesh(rep.field, c.mesh_resolution, c.mesh_threshold)
    write_mesh(out / "mesh.obj", verts, faces, cols)
    write_mesh(out / "mesh.ply", verts, faces, cols)
    files += ["mesh.obj", "mesh.ply"]
    return {"files": files, "mesh_vertices": int(len(verts)), "mesh_faces": int(len(faces)),
            "hash_grid_backend": rep.backend}


def make_coarse_stage(params, reference: Reference, *, guidance=None, detector=None, device="cpu",
                      params_digest: str = "") -> Stage:
    """The stage loop configured as the coarse stage, at step 0."""
    rep = NeRFRepresentation(params, torch.device(device))
    return Stage(coarse_spec(params), rep, params, reference, guidance=guidance, detector=detector, device=device,
                 params_digest=params_digest)


def run_coarse(params, reference: Reference, out_dir: Path | str, *, guidance=None, detector=None, device="cpu",
               params_digest: str = "", resume: bool = True, callback=None, stop_after=None,
               progress: bool = True) -> Stage:
    """Run (or resume) the coarse stage into `out_dir`; the Stage's `record` is result.json's
    content (None when stopped early by `stop_after`, as a kill would)."""
    out = writable_folder(out_dir)
    (out / RESULT).unlink(missing_ok=True)  # nothing looks complete while a run is under way
    stage = make_coarse_stage(params, reference, guidance=guidance, detector=detector, device=device,
                              params_digest=params_digest)
    rep = stage.rep
    if not (resume and stage.try_resume(out / CHECKPOINT)):
        clear_outputs(out)  # an earlier run's mesh and renders must not stand beside a new run
    c = params.coarse
    log.info("coarse stage: %d iterations at %d², %d samples/ray, device %s, hash grid %s",
             c.iters, c.resolution, c.samples_per_ray, device, rep.backend)
    done = stage.run(out / CHECKPOINT, callback=callback, stop_after=stop_after, progress=progress,
                     postfix=lambda m: {"loss": f"{m['loss']:.4f}", "occ": f"{m['occupied']:.2f}"})
    if detector is not None:
        from core.stages.detector import write_trace

        write_trace(detector, out / "detector.json")
    if done:
        stage.record = stage.complete(out, lambda: write_outputs(rep, params, reference, out),
                                      f"renders and the mesh (marching cubes at {c.mesh_resolution}³)")
    else:
        stage.record = None
    return stage
