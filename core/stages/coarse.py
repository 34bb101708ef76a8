"""The coarse stage (Magic123 §2.1.1, §3.2): the stage loop over a NeRF.

The representation is Instant-NGP's hash grid + MLP (core/representations/nerf.py) with an
occupancy grid for empty-space skipping; Adam with the hash grid at lr × `grid_lr_scale` (released
code) and an optional exponential lr decay. Its regularisers: eq. 3's normal smoothness and the
released code's entropy and orientation terms. At the end: renders/, reference_rgba.png,
mesh.obj / mesh.ply (marching cubes of the density) and, written last, result.json.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from core.export.mesh import extract_mesh, write_mesh
from core.inputs.images import Reference, save_rgba
from core.io import atomic_save_image, to_uint8, writable_folder
from core.rendering.batch import RenderBatch
from core.rendering.cameras import Cameras, orbit_cameras, reference_cameras
from core.representations.nerf import NeRFField, OccupancyGrid, render, render_chunked
from core.stages.engine import CHECKPOINT, RESULT, Stage, StageSpec, StageState, clear_outputs, read_state
from core.stages.losses import entropy_loss, normal_smoothness_loss, orientation_loss

log = logging.getLogger(__name__)


class NeRFRepresentation:
    """The coarse NeRF as the stage loop sees it (core.stages.engine.Representation)."""

    def __init__(self, params, device: torch.device):
        c = params.coarse
        self.c, self.device = c, device
        self.field = NeRFField.from_params(params, device=device)
        self.occupancy = OccupancyGrid(c.occupancy_resolution, c.bound, c.occupancy_threshold,
                                       decay=c.occupancy_decay, device=device)
        self.step_size = 2.0 * c.bound / c.samples_per_ray  # a typical sample spacing
        self.backend = self.field.encoding.backend

    def param_groups(self) -> list[dict]:
        c = self.c
        return [{"params": list(self.field.encoding.parameters()), "lr": c.lr * c.grid_lr_scale},
                {"params": list(self.field.mlp.parameters()), "lr": c.lr}]

    def before_step(self, step: int, total: int, generator: torch.Generator, optimizer) -> None:
        c = self.c
        if c.lr_final < 1.0:  # exponential decay to lr·lr_final at the last iteration (a function of step)
            f = c.lr_final ** (step / max(1, total - 1))
            for g, base in zip(optimizer.param_groups, (c.lr * c.grid_lr_scale, c.lr)):
                g["lr"] = base * f
        if step % c.occupancy_every == 0:  # from step 0: the blob already empties most of the box
            self.occupancy.update(self.field, self.step_size, generator)

    def _render_kw(self) -> dict:
        c = self.c
        return dict(samples_per_ray=c.samples_per_ray, occupancy=self.occupancy, normals=c.normals)

    def needs_normals(self, shading: str) -> bool:
        w = self.c.losses
        return shading in ("lambertian", "textureless", "normal") or w.normal_smooth > 0 or w.orientation > 0

    def render(self, cameras: Cameras, resolution: int, *, shading: str, light_dir, ambient: float,
               diffuse: float, generator) -> RenderBatch:
        return render(self.field, cameras, resolution, shading=shading, light_dir=light_dir, perturb=True,
                      generator=generator, need_normals=self.needs_normals(shading), ambient=ambient,
                      diffuse=diffuse, **self._render_kw())

    def render_views(self, cameras: Cameras, resolution: int) -> RenderBatch:
        """Albedo renders without gradients (the detector's views, the outputs)."""
        s = self.c.shading
        return render_chunked(self.field, cameras, resolution, shading="albedo", need_normals=False,
                              ambient=s.ambient, diffuse=s.diffuse, **self._render_kw())

    def regularisers(self, out: RenderBatch) -> dict[str, tuple[float, torch.Tensor]]:
        w, zero = self.c.losses, out.rgb.new_zeros(())
        l_n = normal_smoothness_loss(out.normal) if (w.normal_smooth > 0 and out.normal is not None) else zero  # eq. 3
        l_ent = entropy_loss(out.opacity) if w.entropy > 0 else zero
        l_ori = (orientation_loss(out.sample_weights, out.sample_normals, out.sample_dirs, out.opacity.numel())
                 if (w.orientation > 0 and out.sample_normals is not None) else zero)
        return {"normal_smooth": (w.normal_smooth, l_n), "entropy": (w.entropy, l_ent),
                "orientation": (w.orientation, l_ori)}

    def progress(self) -> dict[str, float]:
        return {"occupied": self.occupancy.fraction()}

    def train(self, mode: bool = True):
        return self.field.train(mode)

    def state_dict(self) -> dict:
        return {"field": self.field.state_dict(), "field_config": dict(self.field.config),
                "occupancy": self.occupancy.state_dict(), "hash_grid_backend": self.backend}

    def load_state_dict(self, state: dict) -> None:
        self.field.load_portable_state_dict(state["field"])
        self.occupancy.load_state_dict(state["occupancy"])


def coarse_spec(params) -> StageSpec:
    c = params.coarse
    return StageSpec(name="coarse", iters=c.iters, resolution=c.resolution, checkpoint_every=c.checkpoint_every,
                     seed=params.seed, rgb=c.losses.rgb, mask=c.losses.mask, depth=c.losses.depth,
                     clock_offset=0, clock_total=c.iters + params.fine.iters)


def load_coarse_field(checkpoint: Path | str, device="cpu") -> tuple[NeRFField, StageState]:
    """A coarse checkpoint → (its NeRF field in eval mode on `device`, the whole coarse state)."""
    state = read_state(checkpoint, "coarse")
    rep = state.representation
    return NeRFField.from_state(rep["field_config"], rep["field"], device), state


def write_outputs(rep: NeRFRepresentation, params, reference: Reference, out: Path) -> dict:
    """renders/, reference_rgba.png, mesh.obj/.ply; returns the file list for result.json."""
    c = params.coarse
    rep.field.eval()
    (out / "renders").mkdir(parents=True, exist_ok=True)
    save_rgba(reference, out / "reference_rgba.png")
    files = ["reference_rgba.png"]
    ref = rep.render_views(reference_cameras(params.camera, device=rep.device), c.resolution)
    a = ref.opacity[0].clamp_min(1e-6)
    rgb = ((ref.albedo[0] - (1 - ref.opacity[0])) / a).clamp(0, 1)  # un-composited from white
    atomic_save_image(out / "renders" / "reference.png", to_uint8(torch.cat([rgb, ref.opacity[0]], 0)))
    files.append("renders/reference.png")
    n = params.evaluate.novel_views
    cams = orbit_cameras(n, 90.0, params.camera.radius, params.camera.fovy, start=360.0 / n, device=rep.device)
    nov = rep.render_views(cams, c.resolution)
    for i in range(n):
        atomic_save_image(out / "renders" / f"novel_{i:03d}.png", to_uint8(nov.rgb[i]))
        files.append(f"renders/novel_{i:03d}.png")
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
    stage.record = stage.finish(out, write_outputs(rep, params, reference, out)) if done else None
    return stage
