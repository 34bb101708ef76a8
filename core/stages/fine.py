"""The fine stage (Magic123 §2.1.2, §3.2): the stage loop over a DMTet mesh made from the coarse NeRF.

Set-up, as the released code does it (guochengqian/Magic123 nerf/renderer.py:1559-1575,
docs/fidelity.md): the level τ = min(mean density of the coarse occupancy grid, coarse.mesh_threshold)
(`fine.sdf_threshold`); the tet grid rescaled per axis to the NeRF's occupied extent + 0.1
(`fine.tet_rescale`, `fine.tet_margin`); the SDF = (σ − τ) clamped to [−1, 1] (`fine.sdf_scale`), the
deformation at zero; the neural colour field is a trainable copy of the NeRF's colour branch
(Magic3D). Each iteration extracts the mesh by marching tetrahedra and rasterises it at 8× the
coarse resolution (core/rendering/raster.py: nvdiffrast on CUDA when available, else PyTorch).
The colour term of eq. 1 uses the reference mask eroded by `fine.mask_erode_px` px (colours at the
segmentation edge mix in the background; the mask term keeps the full mask). Regularisers: mesh
normal consistency and the (unnormalised, `fine.laplacian_form`) Laplacian. Outputs: renders/,
reference_rgba.png, mesh.obj/.mtl/_albedo.png, mesh.glb, turntable.gif and, written last, result.json.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from core.export.textured import decimate, export_textured_mesh
from core.inputs.images import Reference
from core.io import writable_folder
from core.rendering.batch import RenderBatch
from core.rendering.cameras import Cameras
from core.rendering.mesh_render import render_mesh
from core.rendering.raster import make_rasterizer
from core.representations.dmtet import DMTet, ColourField, Mesh
from core.stages.coarse import active_levels
from core.stages.engine import CHECKPOINT, RESULT, Stage, StageSpec, StageState, clear_outputs, write_views, scope
from core.stages.losses import mesh_laplacian_loss, mesh_laplacian_loss_unnormalised, mesh_normal_consistency

log = logging.getLogger(__name__)


def resize_reference(ref: Reference, size: int) -> Reference:
    """The reference at the fine resolution (bilinear colour/depth, mask re-binarised)."""
    if ref.rgb.shape[-1] == size and ref.rgb.shape[-2] == size:
        return ref
    log.info("fine stage: reference resized from %d² to %d²", ref.rgb.shape[-1], size)
    up = lambda t: F.interpolate(t[None].float(), size=(size, size), mode="bilinear", align_corners=False)[0]  # noqa: E731
    return Reference(rgb=up(ref.rgb).clamp(0, 1), mask=(up(ref.mask) > 0.5).float(),
                     depth=up(ref.depth) if ref.depth is not None else None, image_path=ref.image_path)


def mean_density(coarse: StageState | None) -> float | None:
    """The mean of the coarse occupancy grid's densities at the end of the coarse stage (the
    released code's mean_density, the mean of its density grid, saved with the checkpoint:
    Magic123 nerf/renderer.py:1500-1501, main.py:481-482); None without a coarse state."""
    rep = getattr(coarse, "representation", None) or {}
    values = (rep.get("occupancy") or {}).get("values")
    return float(values.float().mean()) if values is not None else None


def sdf_level(params, coarse: StageState | None) -> float:
    """τ of the SDF initialisation: min(mean density, coarse.mesh_threshold) ('mean_density', the
    released code with its CUDA ray marcher, nerf/renderer.py:1560-1561) or coarse.mesh_threshold
    (also when no coarse state is given, as the released code without it)."""
    tau = params.coarse.mesh_threshold
    m = mean_density(coarse) if params.fine.sdf_threshold == "mean_density" else None
    return min(m, tau) if m is not None else tau


def grid_position_grads(setting: str, backend: str) -> str:
    """fine.grid_position_grads for a colour-field grid of `backend`: who differentiates the surface
    points, 'triton' (the kernels, first order) or 'torch'; 'auto' is the kernels where the grid runs
    on them. 'triton' on another backend is an error."""
    if setting == "auto":
        return "triton" if backend == "triton" else "torch"
    if setting == "triton" and backend != "triton":
        from core.params import ParamsError

        raise ParamsError(f"fine.grid_position_grads is 'triton' but the hash grid runs on {backend}; "
                          f"use fine.grid_position_grads=auto or torch")
    return setting


class DMTetRepresentation:
    """The fine stage's mesh as the stage loop sees it (core.stages.engine.Representation)."""

    def __init__(self, params, coarse_field, device: torch.device, threshold: float | None = None):
        f, c = params.fine, params.coarse
        self.f, self.c, self.device = f, c, device
        self.dmtet = DMTet(f.tet_resolution, c.bound, device=device)
        coarse_field = coarse_field.to(device)
        self.threshold = c.mesh_threshold if threshold is None else float(threshold)
        if f.tet_rescale:
            scale = self.dmtet.rescale_to_density(coarse_field.density, self.threshold, f.tet_margin)
            log.info("fine stage: tet grid scaled to ±(%.3f, %.3f, %.3f) around the NeRF's σ > %.3g",
                     *scale.tolist(), self.threshold)
        self.dmtet.init_from_density(coarse_field.density, self.threshold, sdf_scale=f.sdf_scale)
        self.colour = ColourField(coarse_field).to(device)
        if hasattr(self.colour.field, "level_mask"):  # a NeRFField: every level to start with (fine.level_mask)
            self.colour.field.active_levels = None
        enc = getattr(self.colour.field, "encoding", None)
        if hasattr(enc, "atomics"):  # the coarse field's hash grid, loaded: coarse.grid.atomics again
            enc.atomics = c.grid.atomics
        if hasattr(self.colour.field, "spreads"):  # and coarse.grid.spread
            self.colour.field.spread = c.grid.spread
        if hasattr(enc, "position_grads"):  # the surface points' gradient in the grid (fine.grid_position_grads)
            enc.position_grads = grid_position_grads(f.grid_position_grads, enc.backend)
            if enc.position_grads == "triton":
                log.info("fine stage: the colour grid differentiates the surface points in its Triton kernels "
                         "(fine.grid_position_grads=%s)", f.grid_position_grads)
        if f.mlp_precision != "coarse" and hasattr(self.colour.field, "mlp_precision"):
            self.colour.field.mlp_precision = f.mlp_precision  # fine.mlp_precision over coarse.mlp.precision
            log.info("fine stage: the colour field's MLP in %s (fine.mlp_precision)", f.mlp_precision)
        self.field_config = dict(getattr(coarse_field, "config", {}))
        self.rasterizer = make_rasterizer(f.rasterizer, device, f.coverage, f.compile)
        self.backend = self.rasterizer.backend
        self.mesh: Mesh | None = None

    def param_groups(self) -> list[dict]:
        f = self.f
        groups = [{"params": [self.dmtet.sdf, self.dmtet.deform], "lr": f.lr}]
        enc = getattr(self.colour.field, "encoding", None)
        if enc is None:
            return groups + [{"params": list(self.colour.parameters()), "lr": f.lr}]
        enc_ids = {id(p) for p in enc.parameters()}
        return groups + [{"params": list(enc.parameters()), "lr": f.lr * self.c.grid_lr_scale},
                         {"params": [p for p in self.colour.parameters() if id(p) not in enc_ids], "lr": f.lr}]

    def before_step(self, step: int, total: int, generator: torch.Generator, optimizer) -> None:
        field = self.colour.field
        if self.f.level_mask != "none" and hasattr(field, "level_mask"):  # Consistent123: progressive levels
            field.active_levels = active_levels(self.f.level_mask, step, total, field.encoding.levels)
        self.mesh = self.dmtet.extract()  # marching tetrahedra (DMTet, Shen et al. 2021)

    def render(self, cameras: Cameras, resolution: int, *, shading: str, light_dir, ambient: float,
               diffuse: float, generator=None, mesh: Mesh | None = None) -> RenderBatch:
        return render_mesh(mesh if mesh is not None else self.mesh, self.colour, cameras, resolution, self.rasterizer,
                           shading=shading, light_dir=light_dir, ambient=ambient, diffuse=diffuse, stage="fine")

    @torch.no_grad()
    def render_views(self, cameras: Cameras, resolution: int) -> RenderBatch:
        mesh = self.dmtet.extract().detach()
        s = self.c.shading
        outs = [self.render(cameras[i], resolution, shading="albedo", light_dir=None, ambient=s.ambient,
                            diffuse=s.diffuse, mesh=mesh) for i in range(len(cameras))]
        return RenderBatch(rgb=torch.cat([o.rgb for o in outs]), opacity=torch.cat([o.opacity for o in outs]),
                           depth=torch.cat([o.depth for o in outs]), normal=torch.cat([o.normal for o in outs]),
                           cameras=cameras, stage="fine")

    def regularisers(self, out: RenderBatch) -> dict[str, tuple[float, torch.Tensor]]:
        w, mesh, zero = self.f.losses, self.mesh, out.rgb.new_zeros(())
        v, f = mesh.verts, mesh.faces
        nc_on, lap_on = w.normal_consistency > 0 and mesh.num_faces, w.laplacian > 0 and mesh.num_faces
        released_lap = lap_on and self.f.laplacian_form == "unnormalised"  # the form that reads the sorted edges
        # one sort for both and for the torch antialias before them: one topology (Mesh.edge_sort)
        edges = mesh.edge_sort() if (nc_on or released_lap) else None
        l_nc = mesh_normal_consistency(v, f, edges) if nc_on else zero
        if released_lap:
            l_lap = mesh_laplacian_loss_unnormalised(v, f, edges)
        else:
            l_lap = mesh_laplacian_loss(v, f) if lap_on else zero
        return {"normal_consistency": (w.normal_consistency, l_nc), "laplacian": (w.laplacian, l_lap)}

    def progress(self) -> dict[str, float]:
        return {"faces": float(self.mesh.num_faces) if self.mesh is not None else 0.0}

    def train(self, mode: bool = True):
        return self.colour.train(mode)

    def state_dict(self) -> dict:
        return {"dmtet": {"sdf": self.dmtet.sdf.detach().cpu(), "deform": self.dmtet.deform.detach().cpu(),
                          "resolution": self.dmtet.resolution, "bound": self.dmtet.bound,
                          "scale": self.dmtet.scale.detach().cpu(), "threshold": self.threshold},
                "colour_field": self.colour.field.state_dict(), "field_config": self.field_config,
                "rasterizer": self.backend}

    def load_state_dict(self, state: dict) -> None:
        d = state["dmtet"]
        if d["resolution"] != self.dmtet.resolution:
            raise ValueError(f"checkpoint tet resolution {d['resolution']} ≠ fine.tet_resolution {self.dmtet.resolution}")
        with torch.no_grad():
            if "scale" in d:
                self.dmtet.set_scale(d["scale"])
            self.dmtet.sdf.copy_(d["sdf"])
            self.dmtet.deform.copy_(d["deform"])
        self.colour.field.load_state_dict(state["colour_field"])


def fine_spec(params, clock_offset: int) -> StageSpec:
    """`clock_offset`: the coarse iterations before this stage on the guidance clock."""
    f = params.fine
    # the reference at the stage's own size (the released DMTet stage sets known_view_scale = 1,
    # Magic123 main.py:411) and without ray noise: known_view_noise_scale moves rays_o/rays_d, which
    # its rasteriser does not use (run_dmtet renders from the mvp, nerf/renderer.py:1230-1262)
    return StageSpec(name="fine", iters=f.iters, resolution=f.resolution, checkpoint_every=f.checkpoint_every,
                     seed=params.seed + 1, rgb=f.losses.rgb, mask=f.losses.mask, depth=f.losses.depth,
                     mask_erode_px=f.mask_erode_px, clock_offset=clock_offset, clock_total=clock_offset + f.iters,
                     start_stage2=True, ref_warmup=f.ref_warmup, novel_background=f.novel_background)


@torch.no_grad()
def write_outputs(rep: DMTetRepresentation, params, reference: Reference, out: Path,
                  turntable_frames: int = 36) -> dict:
    f = params.fine
    files = write_views(rep, params, reference, out, f.resolution)
    surface = rep.dmtet.extract().detach()
    mesh = decimate(surface, f.export_faces)
    exported = export_textured_mesh(mesh, rep.colour, out, texture_size=f.texture_size, rasterizer=rep.rasterizer,
                                    turntable_frames=turntable_frames, atlas_iterations=f.atlas_iterations)
    files += list(exported.values())
    if mesh.faces.shape[0] == 0:
        log.warning("fine stage: the final mesh is empty (no surface left in the tet grid); see %s", out / "renders")
    return {"files": files, "mesh_vertices": int(mesh.verts.shape[0]), "mesh_faces": int(mesh.faces.shape[0]),
            "surface_faces": surface.num_faces,
            "exported": exported, "rasterizer": rep.backend, "tet_resolution": f.tet_resolution,
            "resolution": f.resolution}


def make_fine_stage(params, reference: Reference, coarse_field, *, coarse: StageState | None = None, guidance=None,
                    device="cpu", params_digest: str = "") -> Stage:
    """The stage loop configured as the fine stage from a coarse field, at step 0; `coarse` is the
    coarse stage's state, whose prior clock and stage-2 switch the fine stage continues."""
    device = torch.device(device)
    rep = DMTetRepresentation(params, coarse_field, device, threshold=sdf_level(params, coarse))
    offset = coarse.step if coarse is not None else params.coarse.iters
    return Stage(fine_spec(params, clock_offset=offset), rep, params, resize_reference(reference, params.fine.resolution),
                 guidance=guidance, device=device, params_digest=params_digest, inherited=coarse)


def run_fine(params, reference: Reference, coarse_field, out_dir: Path | str, *, coarse: StageState | None = None,
             guidance=None, device="cpu", params_digest: str = "", resume: bool = True, callback=None,
             stop_after=None, progress: bool = True, turntable_frames: int = 36) -> Stage:
    """Run (or resume) the fine stage into `out_dir` from the coarse field; `coarse` is the coarse
    stage's state (see make_fine_stage). The Stage's `record` is result.json's content (None when
    stopped early)."""
    out = writable_folder(out_dir)
    (out / RESULT).unlink(missing_ok=True)
    with scope("lift3d.setup"):
        stage = make_fine_stage(params, reference, coarse_field, coarse=coarse, guidance=guidance, device=device,
                                params_digest=params_digest)
    rep, reference = stage.rep, resize_reference(reference, params.fine.resolution)
    if not (resume and stage.try_resume(out / CHECKPOINT)):
        clear_outputs(out)  # an earlier run's mesh and renders must not stand beside a new run
    f = params.fine
    log.info("fine stage: %d iterations at %d², tet grid %d³ (%d tets), rasteriser %s, device %s",
             f.iters, f.resolution, f.tet_resolution, rep.dmtet.num_tets, rep.backend, device)
    done = stage.run(out / CHECKPOINT, callback=callback, stop_after=stop_after, progress=progress,
                     postfix=lambda m: {"loss": f"{m['loss']:.4f}", "faces": int(m["faces"])})
    if done:
        stage.record = stage.complete(out, lambda: write_outputs(rep, params, reference, out, turntable_frames),
                                      "renders and the textured mesh (texture, OBJ, GLB, turntable)")
    else:
        stage.record = None
    return stage
