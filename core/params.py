"""The one parameter schema of lift3d.

`params.yaml` holds the paper defaults (Magic123 §3.2 and the authors' scripts; Consistent123 §4.1)
plus named presets that overlay them. Loading is: base → preset → `--set key=value` overrides →
validation. Unknown keys and ill-typed values fail with the dotted key's name.
"""
from __future__ import annotations

import copy
import hashlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.errors import Lift3DError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PARAMS = REPO_ROOT / "params.yaml"


class ParamsError(Lift3DError, ValueError):
    """A bad parameter: the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def __getattribute__(self, name: str):
        rec = _RECORDING
        if rec is not None and name[:1] != "_":
            path = rec[0].get(id(self))
            if path is not None and name in type(self).model_fields:
                rec[1].add(path + name)
        return object.__getattribute__(self, name)


# (id(section) → its dotted path + ".", the dotted keys read) while `recording_reads` runs
_RECORDING: Optional[tuple[dict[int, str], set[str]]] = None


# --------------------------------------------------------------------------------------------- cameras
class CameraParams(_Section):
    """Magic123 §3.2 'Camera setting'; DESIGN.md's table."""

    ref_polar: float = 90.0  # degrees; 90° = the front (equator), polar measured from +z (up)
    ref_azimuth: float = 0.0
    radius: float = 1.8
    fovy: float = 40.0  # vertical field of view, degrees
    polar_range: tuple[float, float] = (45.0, 135.0)
    azimuth_range: tuple[float, float] = (-180.0, 180.0)
    radius_range: tuple[float, float] = (1.8, 1.8)
    fovy_range: tuple[float, float] = (40.0, 40.0)
    # the reference view every `ref_every`-th iteration (the released code of both papers), or with
    # probability `ref_prob` (Consistent123's paper: 0.25); when ref_prob is set it wins.
    ref_every: int = Field(4, ge=1)
    ref_prob: Optional[float] = Field(None, ge=0.0, le=1.0)
    # Released novel-view sampling (stable-dreamfusion's rand_poses; docs/fidelity.md item 4): with
    # this probability a draw (one per batch) puts the camera on the upper hemisphere, ignoring
    # polar_range / azimuth_range (Magic123: 0.5, main.py:166; Consistent123: 0, main.py:76)
    uniform_sphere_rate: float = Field(0.5, ge=0.0, le=1.0)
    # how that draw is made: 'cube' = a point uniform in [-1,1]×[0,1]×[-1,1], normalised (Magic123's
    # provider.py:87-93; not uniform on the sphere), 'gaussian' = |N(0, I)| in y, normalised (uniform
    # on the upper hemisphere; later stable-dreamfusion, Consistent123 provider.py:92-99)
    uniform_sphere_draw: Literal["cube", "gaussian"] = "cube"
    # Consistent123's released coarse stage widens the ranges from the reference view to the full
    # ranges: r = min(1, progressive_init_ratio + 2·step/iters) (nerf/utils.py:693-703, main.py:308)
    progressive_view: bool = False
    progressive_init_ratio: float = Field(0.2, ge=0.0, le=1.0)


# ------------------------------------------------------------------------------------------- NeRF field
class HashGridParams(_Section):
    """Instant-NGP multiresolution hash encoding (Müller et al. 2022), threestudio/Magic123 sizes."""

    levels: int = Field(16, ge=1)
    features_per_level: int = Field(2, ge=1)
    log2_table_size: int = Field(19, ge=8, le=26)
    base_resolution: int = Field(16, ge=2)
    max_resolution: int = Field(2048, ge=2)
    # auto: tcnn when tinycudann imports on CUDA, else triton (fused Triton kernels) when triton
    # imports on CUDA, else torch; the log and checkpoints (hash_grid_backend) say which ran. One
    # table layout for all three: checkpoints load across backends.
    backend: Literal["auto", "torch", "tcnn", "triton"] = "auto"
    # triton backend, the backward's atomic adds into the table gradient: runs = on the
    # dense levels a run of consecutive points in one cell (a ray's samples) summed first, then
    # added once a corner; scalar = each point's own adds. The same sums up to float order. H200,
    # 2^22 points laid out as the renderer's: 10.30 → 6.01 ms (hashgrid_triton.py, reports/speed s33)
    atomics: Literal["runs", "scalar"] = "runs"
    # on a GPU, the field's points (a ray's samples one after another; the fine stage's pixels in
    # order) handed to the grid in a fixed stride permutation and put back after
    # (core.representations.nerf.NeRFField.raw): always, which the torch and tcnn backends' atomic
    # adds want (a warp of one ray's samples serialises on one coarse cell's entries) | never: in the
    # renderer's order, which triton's 'runs' wants (it sums each run of consecutive points in one cell
    # once: spread, there are no runs) | auto = never for triton with atomics 'runs', else always. The
    # same values and gradients up to the atomics' float order (session 35)
    spread: Literal["auto", "always", "never"] = "auto"
    # torch backend: keep only the positions for the backward and recompute the corner rows and
    # weights there (12 bytes a point instead of ~1 KB at 16 levels; the same gradient, bit for
    # bit; a little more arithmetic). Off: the forward's rows and weights are kept.
    recompute_backward: bool = True
    # torch backend: points encoded at a time, bounding the (N, levels, 8) temporaries of the
    # corner arithmetic (0: all at once). The same values at any size.
    chunk: int = Field(1 << 20, ge=0)


class MLPParams(_Section):
    hidden: int = Field(64, ge=1)
    layers: int = Field(3, ge=1)
    # fp32 | bf16: the MLP under bf16 autocast (speed and memory, issue 15; the released code runs it in
    # fp16 under -O with a GradScaler; bf16 needs none)
    precision: Literal["fp32", "bf16"] = "fp32"


class ShadingParams(_Section):
    """Magic123 §3.2: normals-only shading first, then diffuse p=0.75 / textureless p=0.25."""

    # normals-only for the first iterations: an int is an iteration count (paper: 3000), a float
    # below 1 a fraction of the stage (released scripts: 0.2).
    normal_only: float = 0.2
    diffuse_prob: float = Field(0.75, ge=0.0, le=1.0)
    textureless_prob: float = Field(0.25, ge=0.0, le=1.0)
    ambient: float = Field(0.1, ge=0.0, le=1.0)
    diffuse: float = Field(0.9, ge=0.0, le=1.0)
    # the released code (stable-dreamfusion): each shaded novel view draws its ambient ratio
    # a ~ U(ambient, 1) and lights with a + (1 − a)·max(0, n·l); false: the fixed ambient/diffuse
    random_ambient: bool = True

    @model_validator(mode="after")
    def _probs(self) -> "ShadingParams":
        if self.diffuse_prob + self.textureless_prob > 1.0 + 1e-6:
            raise ValueError("diffuse_prob + textureless_prob must not exceed 1")
        return self


class CoarseLossWeights(_Section):
    """Eqs. 1–4 of Magic123 and the released code's regularisers."""

    rgb: float = 5.0  # λ_rgb, eq. 1
    mask: float = 0.5  # λ_mask, eq. 1
    depth: float = 0.01  # λ_d, eq. 2 (paper 0.001, released scripts 0.01)
    # λ_n, eq. 3: the paper's ‖n − τ(g(n))‖ (normal_smooth_form: paper) or the released code's
    # MSE(n, g(n)) (lambda_normal_smooth2d, Magic123 main.py:282); docs/fidelity.md
    normal_smooth: float = 0.5
    # the released code's total variation of the normal map (lambda_normal_smooth, Magic123 main.py:280);
    # used with normal_smooth_form: released
    normal_smooth_tv: float = 0.5
    entropy: float = 1e-3
    orientation: float = 1e-2


class CoarseParams(_Section):
    iters: int = Field(5000, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    resolution: int = Field(128, ge=8)  # render size of the coarse stage (square)
    bound: float = Field(1.0, gt=0.0)  # the scene lives in [-bound, bound]^3
    samples_per_ray: int = Field(128, ge=4)
    grid: HashGridParams = HashGridParams()
    mlp: MLPParams = MLPParams()
    # the density blob added to the raw density: gaussian scale·exp(−|x|²/(2·std²)) (the released
    # code with its exp activation, Magic123 nerf/renderer.py:733-745) | linear scale·(1 − |x|/std)
    # (Magic3D / threestudio's blob_magic3d; the released code's reading under softplus)
    density_blob: Literal["gaussian", "linear"] = "gaussian"
    density_blob_scale: float = 10.0
    density_blob_std: float = 0.2  # released blob_radius 0.2; threestudio's linear blob: 0.5
    density_activation: Literal["softplus", "trunc_exp"] = "trunc_exp"  # the released code; softplus: threestudio
    grid_lr_scale: float = Field(10.0, gt=0.0)  # released code: the hash grid's lr is 10× the MLP's
    lr_final: float = Field(1.0, gt=0.0, le=1.0)  # lr × lr_final^(step/iters): 1 = constant (released code)
    normals: Literal["finite_difference", "analytic"] = "finite_difference"  # released code: finite differences
    # memory (issue 15): the finite-difference normals' four field evaluations a sample keep their
    # MLP activations for the backward; true recomputes them there instead (torch.utils.checkpoint:
    # the same gradient, one more forward of those evaluations)
    normals_recompute: bool = False
    # torch.compile of the volume renderer's arithmetic between the field's evaluations (rays and
    # samples, weights, the images' sums; core.representations.nerf.render), forward and backward:
    # default | auto = on a GPU where Inductor builds (core.perf.compile_kind) | none. Off: on an H200
    # a coarse iteration was 7 ms slower with it (reports/speed, session 24)
    compile: Literal["auto", "none", "default"] = "none"
    # the volume renderer's rays and samples: auto = one Triton kernel launch on a GPU (the ~95
    # operators of the tensors' pass in one; core.representations.samples_triton), the tensors'
    # operators elsewhere | torch | triton
    samples: Literal["auto", "torch", "triton"] = "auto"
    occupancy_resolution: int = Field(64, ge=8)
    occupancy_every: int = Field(16, ge=1)
    occupancy_threshold: float = Field(0.01, ge=0.0)
    # which cells are occupied: density (released: σ > min(mean σ of the grid, density threshold),
    # Magic123/Consistent123 nerf/renderer.py, density_thresh 10) | alpha (σ·step ≥ occupancy_threshold)
    occupancy_rule: Literal["alpha", "density"] = "density"
    occupancy_density_threshold: float = Field(10.0, ge=0.0)
    occupancy_decay: float = Field(0.95, gt=0.0, le=1.0)  # Instant-NGP: a cell keeps max(decay·old, new)
    # the hash grid's coarse-to-fine schedule: step (Magic123: the finest level_mask_levels levels
    # zeroed while step ≤ level_mask_iters, nerf/utils.py:1266-1270, nerf/network_grid.py:71-75) |
    # progressive (Consistent123: the first ceil(min(1, 0.25 + 2·(step+1)/iters)·levels) levels,
    # nerf/utils.py:705-707, gridencoder/grid.py:42) | none
    level_mask: Literal["none", "step", "progressive"] = "step"
    level_mask_levels: int = Field(8, ge=0)
    level_mask_iters: int = Field(3000, ge=0)
    # the first ref_warmup iterations render the reference view only (released known_iters 100:
    # global steps 1..99, Magic123 nerf/utils.py:552-553); Consistent123: 0
    ref_warmup: int = Field(99, ge=0)
    # the reference view is rendered at ref_scale × resolution (known_view_scale 1.5, Magic123
    # main.py:212, nerf/provider.py:203-204) with one N(0, ref_ray_noise²) offset added to every ray
    # origin and another to every direction (known_view_noise_scale 1e-3, nerf/utils.py:599-603)
    ref_scale: float = Field(1.5, gt=0.0)
    ref_ray_noise: float = Field(1e-3, ge=0.0)
    # novel views: random = one uniform random colour per view behind the object (bg_radius −1,
    # nerf/utils.py:638-643: always, p = 1) | white
    novel_background: Literal["random", "white"] = "random"
    # eq. 3 as released (TV + MSE to the 9×9 blur of the normal image Σ sg(w_i)(n_i + 1)/2, reflect
    # padding; nerf/utils.py:801-813, nerf/renderer.py:1160-1162) | paper (‖n − sg(blur(n))‖ of the
    # composited normals)
    normal_smooth_form: Literal["released", "paper"] = "released"
    # released form: the MSE's blurred target carries gradient (Magic123 utils.py:812) | stop-grad (Consistent123)
    normal_smooth_blur_grad: bool = True
    # entropy regulariser on each sample's weight w_i (released: outputs['weights'], utils.py:796) |
    # on each ray's opacity
    entropy_on: Literal["samples", "opacity"] = "samples"
    # its weight ramps as λ·min(1, (step+1)/(entropy_ramp·iters)) (released: min(1, 2·step/iters),
    # utils.py:794-795); 0: no ramp
    entropy_ramp: float = Field(0.5, ge=0.0)
    shading: ShadingParams = ShadingParams()
    losses: CoarseLossWeights = CoarseLossWeights()
    checkpoint_every: int = Field(500, ge=1)
    mesh_resolution: int = Field(128, ge=16)  # marching-cubes grid for the exported NeRF mesh
    mesh_threshold: float = 10.0  # density level set


# --------------------------------------------------------------------------------------------- DMTet
class FineLossWeights(_Section):
    rgb: float = 5.0
    mask: float = 0.5
    depth: float = 0.0  # released: lambda_depth = 0 in the DMTet stage (Magic123 main.py:415-417)
    normal_consistency: float = 0.1
    laplacian: float = 0.1


class FineParams(_Section):
    iters: int = Field(5000, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    resolution: int = Field(1024, ge=8)  # 8× the coarse resolution
    # voxels per axis of the Kuhn tet grid (6 tets each). 128 matches the released quartet grid
    # "256" (tet_grid_size, Magic123 main.py:115) in vertex and tet count (docs/fidelity.md)
    tet_resolution: int = Field(128, ge=2, le=512)
    # the tet grid rescaled per axis to max|v| + tet_margin over the vertices with σ > τ (released
    # get_sdf_from_nerf, Magic123 nerf/renderer.py:1565-1572)
    tet_rescale: bool = True
    tet_margin: float = Field(0.1, ge=0.0)
    # the SDF's level τ: min(mean density of the coarse occupancy grid, coarse.mesh_threshold)
    # (released: min(mean_density, density_thresh), renderer.py:1560-1561) | coarse.mesh_threshold
    sdf_threshold: Literal["mean_density", "mesh_threshold"] = "mean_density"
    # SDF = (σ − τ) clamped to [−1, 1] (released, renderer.py:1573-1574) | ((σ − τ)/τ) clamped
    sdf_scale: Literal["unit", "threshold"] = "unit"
    # mesh Laplacian: Σ_j (v_i − v_j) (the released unnormalised uniform Laplacian, renderer.py:594-627)
    # | (1/|N(i)|) Σ_j v_j − v_i
    laplacian_form: Literal["unnormalised", "normalised"] = "unnormalised"
    ref_warmup: int = Field(99, ge=0)  # released known_iters 100 is not reset for the DMTet stage
    novel_background: Literal["random", "white"] = "random"  # as coarse.novel_background (nerf/utils.py:638-643)
    # the colour field's hash-grid levels: none (Magic123: grid_levels_mask = −1, main.py:412) |
    # progressive (Consistent123 keeps progressive_level in the DMTet stage, main.py:358)
    level_mask: Literal["none", "progressive"] = "none"
    mask_erode_px: int = Field(2, ge=0)
    rasterizer: Literal["auto", "torch", "nvdiffrast"] = "auto"
    # the torch rasteriser's coverage pass: auto = one Triton kernel on a GPU (no host sync), the
    # tensors' pass elsewhere (core.rendering.raster.coverage_kind) | torch | triton
    coverage: Literal["auto", "torch", "triton"] = "auto"
    # torch.compile of the torch rasteriser's arithmetic over pixels and pixel pairs (rasterize's
    # barycentrics, interpolate, antialias), forward and backward: auto = on a GPU where Inductor
    # builds (core.perf.compile_kind) | none | default
    compile: Literal["auto", "none", "default"] = "auto"
    # the colour field's hash grid at the mesh's surface points, whose gradient reaches the vertices
    # (the colour loss moves the geometry, as the released gridencoder's input gradient does): auto =
    # the Triton kernels' first-order position gradient where the grid runs on Triton
    # (core.representations.hashgrid_triton) | torch (the tensors' path, as before session 35) |
    # triton. The same gradients up to float rounding
    grid_position_grads: Literal["auto", "torch", "triton"] = "auto"
    # the colour field's MLP in this stage: coarse (as coarse.mlp.precision) | fp32 | bf16 (under bf16
    # autocast; the mesh path alone 20.0 / 22.0 → 17.5 / 17.9 ms at 994k faces, session 36; the guided
    # stage no faster, 37.7 / 39.5 → 40.2 / 39.1 ms, session 37). Apart from the coarse setting, so that
    # the fine stage can change it without the coarse stage running again
    mlp_precision: Literal["coarse", "fp32", "bf16"] = "coarse"
    losses: FineLossWeights = FineLossWeights()
    checkpoint_every: int = Field(500, ge=1)
    # the baked albedo texture's side and xatlas's chart-growing iterations: both released code
    # bases export at 2048² with ChartOptions.max_iterations = 4 (Magic123 nerf/renderer.py:823,
    # :840-842; Consistent123 nerf/renderer.py:428, :444-446); xatlas's own default is 1
    texture_size: int = Field(2048, ge=16)
    atlas_iterations: int = Field(4, ge=1)
    # faces of the exported mesh: a larger DMTet surface is simplified (quadric edge collapse) to
    # this many before its UV atlas, as released (decimate_target 5e4, Magic123 main.py:107,
    # nerf/renderer.py:811); 0 exports the whole surface
    export_faces: int = Field(50000, ge=0)


# ------------------------------------------------------------------------------------------ optimiser
class OptimizerParams(_Section):
    """The optimiser of both stages (core/stages/optim.py). Magic123's scripts: Adam, betas
    (0.9, 0.99), eps 1e-15 (main.py:554-555, scripts --optim adam). Consistent123 (default --optim
    adan): Adan at 5× the lr, betas (0.98, 0.92, 0.99), eps 1e-8, weight decay 2e-5, global
    gradient-norm clip 5 (main.py:457-460, optimizer.py)."""

    name: Literal["adam", "adan"] = "adam"
    lr_scale: float = Field(1.0, gt=0.0)  # every group's lr × this (released Adan: 5)
    betas: tuple[float, ...] = (0.9, 0.99)  # Adam: 2, Adan: 3
    eps: float = Field(1e-15, ge=0.0)
    weight_decay: float = Field(0.0, ge=0.0)  # Adam: L2 added to the gradient; Adan: decoupled (÷(1 + lr·wd))
    max_grad_norm: float = Field(0.0, ge=0.0)  # clip the global gradient norm to this (0: off)
    fused: bool = True  # GPU Adam as torch's fused kernel (the same update, one pass); CPU: unchanged

    @model_validator(mode="after")
    def _betas(self) -> "OptimizerParams":
        want = 2 if self.name == "adam" else 3
        if len(self.betas) != want:
            raise ValueError(f"{self.name} takes {want} betas, got {len(self.betas)}")
        return self


# -------------------------------------------------------------------------------------------- priors
class StableDiffusionParams(_Section):
    model: str = "runwayml/stable-diffusion-v1-5"
    guidance_scale: float = 100.0
    t_range: tuple[float, float] = (0.2, 0.6)
    resolution: int = 512
    fp16: bool = True
    # torch.compile of the UNet on a GPU ('reduce-overhead': Inductor's CUDA graphs; reports/speed has the
    # figures); 'graphs': Inductor's kernels, the SDS step's noising, prediction and gradient one CUDA
    # graph of lift3d's; 'auto': graphs where it can build (CUDA, Triton, a C compiler), eager elsewhere
    compile: Literal["none", "auto", "default", "reduce-overhead", "graphs"] = "auto"
    # the compiled UNet's layout: 'inductor' = its heuristics' (NCHW here: cuDNN converts each fp16
    # convolution's input to NHWC and back); 'channels_last' = forced NHWC throughout, as the VAE
    # encoders' vae_compile (compile default or graphs only); 'auto' = channels_last with those,
    # inductor with reduce-overhead (core.guidance.sd.unet_layout). H200, A B A B (reports/speed
    # session 40): a steady iteration coarse 34.8 / 35.3 → 33.7 / 33.6 ms, fine 37.4 / 35.6 → 36.0 / 35.1
    compile_layout: Literal["auto", "inductor", "channels_last"] = "auto"
    # the UNet's and VAE's weights in channels-last layout (cuDNN's fp16 convolutions run NHWC: no
    # layout conversion around each one); the same numbers up to the convolution algorithm. The SDS
    # VAE encoder on lift3d's kernels: 11.09 → 10.78 ms an encode at 512² (H200, reports/speed s22); a
    # guided fine iteration 38.3 / 40.1 → 38.3 / 38.6 ms, inside the pairs' spread (s37)
    channels_last: bool = False
    # torch.compile of the VAE encoder, forward and backward, in SDS on a GPU (the render's gradient
    # goes through it: eq. 5), inside its CUDA graphs (vae_graphs); 'none' on a CPU. 'default': Inductor's
    # layout; 'channels_last': its layout forced channels-last (no cuDNN conversion around each
    # convolution); 'auto' = channels_last where Inductor builds (core.guidance.sd.vae_compile_mode).
    # H200 (reports/speed session 39): an encode 11.1 → 8.0 ms at 512², 3.8 → 2.8 ms at 256²; a steady
    # iteration 37.0 / 36.0 → 33.5 / 33.2 ms (coarse) and 38.4 / 38.0 → 34.2 / 35.9 ms (fine), A B A B;
    # ~47 s more compiling in a process that starts without a compile cache, ~6 s with one
    vae_compile: Literal["auto", "none", "default", "channels_last"] = "auto"
    # the VAE encoder's kernels: 'lift3d' = its GroupNorms as Triton kernels that spread each group
    # over the card (torch's runs one block a group: 32 at batch 1) and its attention as plain
    # matmuls (diffusers' AttnProcessor; the memory-efficient kernel's backward is slow at head
    # dim 512); 'diffusers' as loaded; 'auto' = lift3d where Triton runs on a GPU. H200, 512²,
    # forward + backward: 23.9 → 13.8 ms an encode (reports/speed session 16); the same numbers
    # up to fp16 rounding
    vae_kernels: Literal["auto", "diffusers", "lift3d"] = "auto"
    # the VAE encoder's forward and backward in SDS captured once as CUDA graphs and replayed (GPU
    # only; core.guidance.sd.graph_vae_moments): the host launches two graphs instead of the
    # encoder's kernels one by one. H200, one machine (reports/speed session 17): a steady coarse
    # iteration 64.5 → 59.2 ms, fine 73.7 → 66.2 ms; SD's encode at 512² 13.6 → 11.5 ms
    vae_graphs: bool = True
    # the fine stage's t range (released: Magic123 main.py:413 [0.02, 0.5]; Consistent123 main.py:352
    # [0.2, 0.5]); null: t_range in both stages
    fine_t_range: Optional[tuple[float, float]] = (0.02, 0.5)
    # "<prompt>, front/side/back view" text embeddings interpolated by |Δazimuth| to the reference
    # (released code of both papers; docs/fidelity.md item 2); false: the one prompt (papers' text)
    view_dependent_prompt: bool = True


class Zero123Params(_Section):
    model: str = "bennyguo/zero123-diffusers"  # Zero-1-to-3 "105000" in diffusers format
    guidance_scale: float = 5.0
    t_range: tuple[float, float] = (0.2, 0.6)
    resolution: int = 256
    fp16: bool = True
    # torch.compile of the UNet on a GPU ('reduce-overhead': Inductor's CUDA graphs; reports/speed has the
    # figures); 'graphs': Inductor's kernels, the SDS step's noising, prediction and gradient one CUDA
    # graph of lift3d's; 'auto': graphs where it can build (CUDA, Triton, a C compiler), eager elsewhere
    compile: Literal["none", "auto", "default", "reduce-overhead", "graphs"] = "auto"
    compile_layout: Literal["auto", "inductor", "channels_last"] = "auto"  # as sd.compile_layout
    channels_last: bool = False  # as sd.channels_last
    vae_compile: Literal["auto", "none", "default", "channels_last"] = "auto"  # as sd.vae_compile
    # as sd.vae_kernels. At 256² the eager encoder is bound by launching kernels and lift3d's are no
    # faster (9.2 against 10.5 ms an encode); replayed as CUDA graphs (vae_graphs) they are
    # (6.1 → 4.3 ms; H200, reports/speed session 17)
    vae_kernels: Literal["auto", "diffusers", "lift3d"] = "auto"
    vae_graphs: bool = True  # as sd.vae_graphs
    fine_t_range: Optional[tuple[float, float]] = (0.02, 0.5)  # as sd.fine_t_range
    # the SDS gradient of each view × (angle to the reference view)/180° (released
    # zero123_grad_scale='angle', guidance/zero123_utils.py:133-137; docs/fidelity.md item 3)
    angle_weighting: bool = True


class StagePriorWeights(_Section):
    lambda_2d: float = Field(1.0, ge=0.0)  # λ_2D, Magic123 eq. 7 (λ_2D/3D of eq. 8)
    lambda_3d: float = Field(40.0, ge=0.0)  # λ_3D


class LossScaleParams(_Section):
    """The loss-scale schedule of the released code's GradScaler (torch defaults; docs/fidelity.md
    "SDS balance (item 1)"): init_scale, ×growth_factor every growth_interval iterations."""

    init_scale: float = Field(65536.0, gt=0.0)
    growth_factor: float = Field(2.0, ge=1.0)
    growth_interval: int = Field(2000, ge=1)


class GuidanceParams(_Section):
    """Which novel-view guidance runs: Magic123's joint prior (eqs. 7–8), Consistent123's dynamic
    prior (eq. 8–9), the oracle (a known object; machinery tests) or none (reference view only)."""

    kind: Literal["joint", "dynamic", "oracle", "none"] = "joint"
    coarse: StagePriorWeights = StagePriorWeights()
    fine: StagePriorWeights = StagePriorWeights(lambda_2d=0.001, lambda_3d=0.01)
    dynamic_schedule: Literal["exp", "linear", "log"] = "exp"
    # eq. 9 (linear, log) as the released code computes it (w_2D = x, log2(1 + x); the default) or
    # as printed in §4.4 (w_3D = x, log2(x)); eq. 8 (exp) is the same in both. docs/fidelity.md.
    dynamic_reading: Literal["released", "paper"] = "released"
    # The SDS gradient's balance against the reference losses. loss_scale_schedule: as the released
    # Magic123 code optimises — its SDS gradient bypasses the fp16 GradScaler and is divided by the
    # loss scale (1/65536 → 1/262144 over a stage); none: the paper's λ's at face value (as the
    # Consistent123 code optimises). docs/fidelity.md "SDS balance (item 1)".
    sds_gradient_scale: Literal["loss_scale_schedule", "none"] = "loss_scale_schedule"
    loss_scale: LossScaleParams = LossScaleParams()
    oracle_object: Optional[str] = None
    # Where both priors run in one iteration, Zero-1-to-3's SDS (its encode, prediction and, in the
    # backward, its encoder's gradient) on a CUDA stream of its own beside Stable Diffusion's: 'two';
    # one after the other: 'one'; 'auto' = two on a GPU unless a prior's UNet is compiled
    # 'reduce-overhead', whose CUDA graphs share one memory pool and must not replay at once (two
    # asks for it and is refused then). The same kernels on the same inputs: the same numbers up to
    # atomics' order. Off a GPU always one (core.guidance.priors.prior_streams). H200, compile 'graphs',
    # 300 coarse iterations A B A B: 43.6 → 43.0 ms an iteration (reports/speed session 32); graphs + two
    # against reduce-overhead + one: 43.9 → 42.5 ms (session 33), coarse 42.9 → 41.2, fine 42.6 → 42.0
    # (session 34), since then the defaults (compile auto = graphs)
    streams: Literal["auto", "one", "two"] = "auto"


class PromptParams(_Section):
    template: str = "A high-resolution DSLR image of <e>"
    text: Optional[str] = None  # a plain description; used when no token is given
    learned_embeds: Optional[str] = None  # a learned_embeds.bin to load


class TextualInversionParams(_Section):
    """Magic123's recipe: diffusers' textual_inversion example as its
    scripts/textual_inversion/textual_inversion.sh runs it (docs/fidelity.md, item 8)."""

    enabled: bool = True
    steps: int = Field(3000, ge=1)  # --max_train_steps 3000
    lr: float = Field(1e-4, gt=0.0)  # the example's default --learning_rate (the script passes none)
    scale_lr: bool = False  # lr × gradient_accumulation × batch_size (× processes); off as released
    batch_size: int = Field(16, ge=1)  # --train_batch_size 16
    gradient_accumulation: int = Field(1, ge=1)  # --gradient_accumulation_steps 1
    # the dataset is the one image repeated `repeats` times per epoch (--repeats 100), so the last
    # batch of every epoch is short (100 mod 16 = 4 images); null: every batch is full
    repeats: Optional[int] = Field(100, ge=1)
    weight_decay: float = Field(1e-2, ge=0.0)  # AdamW (the example's defaults)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(1e-8, gt=0.0)
    # released: the example's --use_augmentations pipeline (rotation, resized crop, colour jitter,
    # grayscale, blur, flip); crop: lift3d's crop-around-the-object and flip
    augmentation: Literal["released", "crop"] = "released"
    # released: the rgba.png converted to RGB (its transparent pixels are black in the benchmarks)
    background: Literal["black", "white"] = "black"
    # released: the augmented images reach the VAE in [0, 1] (ToTensor, never mapped to [-1, 1]: the
    # example's augmentation branch skips the normalisation); signed: in [-1, 1] as the VAE expects
    vae_input: Literal["unit", "signed"] = "unit"
    placeholder: str = "<e>"
    initializer: str = "object"  # released: a word per object, given on the command line
    # default: torch.compile of the step's VAE encoder and UNet (forward and backward) on a GPU, for
    # the full batch (the epoch's short last batch runs eagerly: one shape to compile); no effect on a
    # CPU. H200 (reports/speed, session 18): 214.6 → 163.2 ms a step on average, 80–150 s of compiling.
    # graphs: the same kernels, each batch size's micro-batch (forward and backward) replayed as one
    # CUDA graph (the same numbers, tests/test_gpu_backends.py); the host then queues a step in a few
    # copies and one launch, and the short batch is graphed too. H200, one machine, default and graphs
    # alternated 4 × 200 steps (session 31): 148.1 / 148.6 → 139.0 / 139.2 ms a step on average (the
    # median step 153.6 → 151.9: the gain is mostly the short batch); ~4 GiB more held by the graphs'
    # pools (18.8 GiB reserved at most, under the 24 GB)
    compile: Literal["none", "default", "graphs"] = "graphs"
    # the compiled graphs' layout: Inductor's choice (NCHW here, each convolution's input converted to
    # NHWC and back by cuDNN) or channels-last throughout (the same arithmetic); no effect uncompiled.
    # H200 (reports/speed, sessions 29–30): ~13 ms less of kernels a step (profiled), 1.2 GiB more, and
    # no faster a step graphed or not (154.9 against 155.0 ms): opt-in
    layout: Literal["auto", "channels_last"] = "auto"
    # GPU: the host queues a step while the GPU runs the one before (the augmentation on a stream of
    # its own, the loss read back a step late); the same numbers (tests/test_gpu_backends.py), 3–9%
    # less a step on an H200 (reports/speed, session 13); no effect on a CPU
    overlap: bool = True
    # GPU: the next batch's views made on a thread of their own while the step is queued (their seed
    # drawn in the plain loop's order: the same numbers, tests/test_textual_inversion.py and
    # tests/test_gpu_backends.py); with the released augmentation only; no effect on a CPU. H200
    # (reports/speed, session 29): 177.5 → 152.8 ms a step steady, the 3,000 steps in 484 s
    prefetch: bool = True
    # the fp32 text encoder's matmuls (forward and backward) in TF32 on a GPU: the example's
    # --allow_tf32, which the released script does not pass (fidelity.md item 8); no effect on a CPU
    tf32: bool = True
    # the state (the row, its AdamW moments, the random stream: a few kB) every this many steps; a
    # run started again continues from it (the example saves its learned_embeds every 500 steps)
    checkpoint_every: int = Field(500, ge=1)


# --------------------------------------------------------------------------------- inputs & judgement
class SegmentParams(_Section):
    model: str = "u2net"  # a rembg model name, or a path to an .onnx file
    object_scale: float = Field(0.8, gt=0.0, le=1.0)  # fraction of the frame the object spans
    size: int = Field(512, ge=16)  # output square size
    max_input_pixels: int = Field(4096 * 4096, ge=1)
    recenter: bool = True  # frame the object (alpha bbox → object_scale of the square), also for RGBA inputs


class DepthParams(_Section):
    model: str = "Intel/dpt-beit-large-512"
    use_sibling: bool = True  # `prepare IMAGE`: a depth.png next to IMAGE is the given depth map


class DetectorParams(_Section):
    """Consistent123 §3.2, eqs. 5–6, and the released code's limits."""

    enabled: bool = False
    every: int = Field(21, ge=1)  # h (paper 20; released code 21)
    views: int = Field(8, ge=1)  # V azimuths 0°, 45°, …
    window: int = Field(5, ge=1)  # L
    delta: float = 0.00025  # δ
    # fire when |R| < δ (released code, nerf/utils.py:621 and 1057; the default) or R < δ (the
    # paper's "falls below"; a falling score fires at once). docs/fidelity.md.
    rate_rule: Literal["abs", "signed"] = "abs"
    earliest: int = Field(2106, ge=0)  # released: may fire only past 2000 + h·L (docs/fidelity.md)
    latest: int = Field(3500, ge=0)
    clip_model: str = "ViT-B-32"
    clip_pretrained: Optional[str] = "laion2b_s34b_b79k"


class EvaluateParams(_Section):
    clip_model: str = "ViT-L-14"
    clip_pretrained: Optional[str] = "laion2b_s32b_b82k"
    novel_views: int = Field(8, ge=1)
    lpips_net: Literal["alex", "vgg", "squeeze"] = "alex"
    lpips_trunk: Optional[str] = None  # torchvision ImageNet weights file; default: torch hub cache
    psnr_cap: float = 100.0


class TrackingParams(_Section):
    mlflow_uri: str = "sqlite:///mlruns.db"
    experiment: str = "lift3d"
    enabled: bool = True
    # CPU, memory, disk, network and (with pynvml) GPU use and memory, sampled into each MLflow run
    system_metrics: bool = True
    system_metrics_interval: float = Field(10.0, gt=0)  # seconds between samples


class ReproduceParams(_Section):
    """What `dvc repro` runs (dvc.yaml reads these keys): one benchmark per dataset × preset."""

    datasets: list[str] = ["nerf4", "realfusion15"]  # folders of datasets/ (datasets.dvc)
    presets: list[str] = ["smoke"]
    limit: int = Field(1, ge=0)  # only the first N objects of each dataset (0: all)
    step_timeout: float = Field(0, ge=0)  # seconds per attempt of an asset's coarse or fine step (0: no limit)


class ModelsParams(_Section):
    cache_dir: Optional[str] = None  # a shared model cache (a hub cache folder)
    offline: bool = False  # also honoured: HF_HUB_OFFLINE=1
    tiny: bool = False  # build tiny random priors of the real classes (smoke preset)
    # a file of torch.compile's portable artifacts and the Triton kernels compiled (core.perf.load_compile_cache): read before each
    # stage (once a process), rewritten after it with what the process compiled; for GPU machines that
    # start with empty caches (fresh cloud machines, containers), shared by every worker. null: off
    compile_cache: Optional[str] = None
    # the coarse stage's first guided iterations run in a side process while the textual inversion runs
    # (core.stages.compile_ahead), so that the coarse stage finds its priors compiled in the machine's
    # caches (session 41, one H200 with empty caches: ~3 min at its first guided iteration; ~35 s warm).
    # auto: where the priors compile (a GPU where Inductor builds) on a card of 48 GiB or more | on | off
    compile_ahead: Literal["auto", "on", "off"] = "auto"

    @field_validator("compile_ahead", mode="before")
    @classmethod
    def _yaml_on_off(cls, v: Any) -> Any:  # YAML reads a bare on / off as true / false
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


class Params(_Section):
    method: Literal["magic123", "consistent123"] = "magic123"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # PyTorch's CPU threads in each step (null: the machine's cores). A CPU run's numbers depend on
    # it (sums split across threads round differently), so runs compare bit for bit only at one count;
    # it is fixed per step so that a Dask worker (which starts with 1) computes what this process does.
    cpu_threads: Optional[int] = Field(None, ge=1)
    cuda_expandable_segments: bool = True
    # cuDNN times a convolution's algorithms on each shape's first call (configure_cudnn): no faster
    # on an H200 for the textual inversion, coarse or fine stage, and more memory (reports/speed s22)
    cudnn_benchmark: bool = False
    # the coarse and fine stages' checkpoints written on a thread while the loop goes on (the same file;
    # each cost an H200 loop 0.3–0.65 s in line, 0.1–0.25 s so: reports/speed sessions 27–28)
    checkpoint_background: bool = True
    camera: CameraParams = CameraParams()
    coarse: CoarseParams = CoarseParams()
    fine: FineParams = FineParams()
    optimizer: OptimizerParams = OptimizerParams()
    guidance: GuidanceParams = GuidanceParams()
    sd: StableDiffusionParams = StableDiffusionParams()
    zero123: Zero123Params = Zero123Params()
    prompt: PromptParams = PromptParams()
    textual_inversion: TextualInversionParams = TextualInversionParams()
    segment: SegmentParams = SegmentParams()
    depth: DepthParams = DepthParams()
    detector: DetectorParams = DetectorParams()
    evaluate: EvaluateParams = EvaluateParams()
    tracking: TrackingParams = TrackingParams()
    models: ModelsParams = ModelsParams()
    reproduce: ReproduceParams = ReproduceParams()

    @model_validator(mode="after")
    def _forced_layout_without_graph_trees(self):
        """A prior's compile_layout channels_last with its compile 'reduce-overhead' is refused here:
        the layout is one of Inductor's options, which torch.compile takes only without a mode ('auto'
        comes to Inductor's own layout there)."""
        for k in ("sd", "zero123"):
            prior = getattr(self, k)
            if prior.compile == "reduce-overhead" and prior.compile_layout == "channels_last":
                raise ValueError(f"{k}.compile_layout: channels_last needs {k}.compile graphs or default "
                                 f"(not reduce-overhead), or {k}.compile_layout inductor")
        return self

    @model_validator(mode="after")
    def _two_streams_without_graph_trees(self):
        """guidance.streams 'two' with a prior compiled 'reduce-overhead' is refused here, before any
        model loads (core.guidance.priors.prior_streams says why). 'auto' compiles to 'graphs' or none."""
        trees = [f"{k}.compile={getattr(self, k).compile}" for k in ("sd", "zero123")
                 if getattr(self, k).compile == "reduce-overhead"]
        if self.guidance.streams == "two" and trees:
            raise ValueError(f"guidance.streams: two replays the priors' CUDA graphs at once, which "
                             f"reduce-overhead's share one memory pool ({', '.join(trees)}): set sd.compile "
                             f"and zero123.compile to graphs (or default, or none)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def digest(self) -> str:
        """A stable hash of every value."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def with_inputs(self, *, text: Optional[str] = None, learned_embeds: Optional[str] = None) -> "Params":
        """These params with a plain description and/or a token file given on the command line."""
        prompt = self.prompt.model_copy(update={k: v for k, v in (("text", text), ("learned_embeds", learned_embeds))
                                                if v is not None})
        return self.model_copy(update={"prompt": PromptParams.model_validate(prompt.model_dump())})


# The parameter sections each step of one asset reads (a dotted name picks one value). A step's
# cache key and its checkpoint's resume check hash these; tests/test_params.py records what each
# step really reads (`recording_reads`) and holds it to this table.
STEP_READS: dict[str, tuple[str, ...]] = {
    "prepare": ("segment", "depth", "models", "device", "cpu_threads", "cudnn_benchmark"),
    "textual_inversion": ("textual_inversion", "sd", "segment", "models", "seed", "device", "cpu_threads", "cudnn_benchmark"),
    # the stages render the novel views that evaluation scores: their number is a stage input too
    "coarse": ("method", "seed", "device", "cpu_threads", "cudnn_benchmark", "checkpoint_background", "camera", "coarse", "fine.iters", "optimizer", "guidance", "sd",
               "zero123", "prompt", "textual_inversion", "detector", "models", "segment", "evaluate.novel_views"),
    "fine": ("method", "seed", "device", "cpu_threads", "cudnn_benchmark", "checkpoint_background", "camera", "coarse", "fine", "optimizer", "guidance", "sd", "zero123",
             "prompt", "textual_inversion", "models", "segment", "evaluate.novel_views"),
    "evaluate": ("evaluate", "models", "method", "device", "cpu_threads", "cudnn_benchmark"),
}


# Settings that change how fast a step runs or how often it saves, not what it computes (the same
# numbers up to float rounding: tests/test_gpu_backends.py, tests/test_hashgrid*.py). Step digests
# leave them out, so that a run started with one of them resumes, and a cached step is reused,
# under another. The run's params.json still records them.
HOW_NOT_WHAT: tuple[str, ...] = (
    "sd.compile", "sd.compile_layout", "sd.channels_last", "sd.vae_compile", "sd.vae_kernels", "sd.vae_graphs",
    "zero123.compile", "zero123.compile_layout", "zero123.channels_last", "zero123.vae_compile", "zero123.vae_kernels", "zero123.vae_graphs",
    "guidance.streams",
    "textual_inversion.compile", "textual_inversion.layout", "textual_inversion.overlap", "textual_inversion.prefetch", "textual_inversion.tf32", "textual_inversion.checkpoint_every",
    "coarse.grid.backend", "coarse.grid.atomics", "coarse.grid.spread", "fine.grid_position_grads", "coarse.grid.recompute_backward", "coarse.grid.chunk", "coarse.normals_recompute",
    "coarse.compile", "coarse.samples",
    "coarse.checkpoint_every", "optimizer.fused", "fine.rasterizer", "fine.coverage", "fine.compile", "fine.checkpoint_every",
    "cudnn_benchmark", "checkpoint_background", "models.compile_cache", "models.compile_ahead",
)


def _pick(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for k in dotted.split("."):
        node = node.get(k) if isinstance(node, dict) else None
    return node


def _drop(tree: dict, dotted: str) -> None:
    parent, _, last = dotted.rpartition(".")
    node = _pick(tree, parent) if parent else tree
    if isinstance(node, dict):
        node.pop(last, None)


def sections_digest(params: "Params | dict", sections: tuple[str, ...] | list[str]) -> str:
    """A hash of the named sections' values (a dotted name picks one value), without the settings
    in HOW_NOT_WHAT."""
    tree = copy.deepcopy(params.to_dict() if isinstance(params, Params) else params)
    for key in HOW_NOT_WHAT:
        _drop(tree, key)
    picked = {s: _pick(tree, s) for s in sorted(sections)}
    return hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:16]


def step_digest(params: "Params", step: str) -> str:
    """The hash of what `step` ('prepare', 'coarse', …) reads: STEP_READS[step]."""
    return sections_digest(params, STEP_READS[step])


@contextmanager
def recording_reads(params: "Params"):
    """Yield a set that collects the dotted keys of `params` read inside the block (tests)."""
    global _RECORDING
    ids: dict[int, str] = {}

    def walk(section: BaseModel, prefix: str) -> None:
        ids[id(section)] = prefix
        for name in type(section).model_fields:
            v = object.__getattribute__(section, name)
            if isinstance(v, BaseModel):
                walk(v, f"{prefix}{name}.")

    walk(params, "")
    reads: set[str] = set()
    previous, _RECORDING = _RECORDING, (ids, reads)
    try:
        yield reads
    finally:
        _RECORDING = previous


# ----------------------------------------------------------------------------------------- loading
def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        if not isinstance(node.get(k, {}), dict):
            raise ParamsError(f"params: '{dotted}': '{k}' is a value, not a section")
        node = node.setdefault(k, {})
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`coarse.iters=500` → ('coarse.iters', 500); the value is read as YAML."""
    if "=" not in text:
        raise ParamsError(f"params: override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ParamsError(f"params: override '{text}' has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ParamsError(f"params: override '{text}': value is not valid YAML ({e})") from e
    return key, value


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if not key:  # a rule across sections (Params' own validators): its message names the keys
            lines.append(f"params: {e['msg'].removeprefix('Value error, ')}")
        elif e["type"] == "extra_forbidden":
            lines.append(f"params: unknown key '{key}'")
        else:
            lines.append(f"params: '{key}': {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def read_params_file(path: Path | str | None = None) -> dict:
    path = Path(path) if path else DEFAULT_PARAMS
    if not path.is_file():
        raise ParamsError(f"params: file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"params: {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ParamsError(f"params: {path} must hold a mapping at the top level")
    return data


def preset_names(path: Path | str | None = None) -> list[str]:
    return sorted(read_params_file(path).get("presets", {}) or {})


def load_params(
    preset: str | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    path: Path | str | None = None,
) -> Params:
    """Base values of params.yaml, then the named preset, then overrides; validated."""
    data = read_params_file(path)
    presets = data.pop("presets", {}) or {}
    tree = data
    if preset:
        if preset not in presets:
            known = ", ".join(sorted(presets)) or "none"
            raise ParamsError(f"params: unknown preset '{preset}' (known: {known})")
        chain = []
        name: str | None = preset
        while name:  # a preset may build on another with `extends: NAME`
            if name in chain:
                raise ParamsError(f"params: preset '{preset}' extends itself through '{name}'")
            chain.append(name)
            if name not in presets:
                raise ParamsError(f"params: preset '{chain[-2]}' extends unknown preset '{name}'")
            name = (presets[name] or {}).get("extends")
        for name in reversed(chain):
            body = {k: v for k, v in (presets[name] or {}).items() if k != "extends"}
            tree = _merge(tree, body)
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides or []]
    for key, value in items:
        _set_dotted(tree, key, value)
    try:
        return Params.model_validate(tree)
    except ValidationError as e:
        raise ParamsError(_format_errors(e)) from None


def apply_overrides(params: Params, overrides: list[str] | None) -> Params:
    """`params` with `key=value` overrides applied, validated again."""
    tree = params.to_dict()
    for key, value in (parse_override(o) for o in overrides or []):
        _set_dotted(tree, key, value)
    try:
        return Params.model_validate(tree)
    except ValidationError as e:
        raise ParamsError(_format_errors(e)) from None


def env_threads() -> Optional[int]:
    """OMP_NUM_THREADS when it is set to a positive integer: what a Dask worker process is given
    (distributed's nanny sets 1; flows.benchmark.task_runner sets cores ÷ workers), so that N worker
    processes on one machine do not each start a thread per core and fight over them."""
    import os

    try:
        n = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    return n if n > 0 else None


def resolve_device(params: Params):
    """The torch device of params.device; also fixes PyTorch's CPU threads: params.cpu_threads, else
    OMP_NUM_THREADS (env_threads), else every core."""
    import os

    import torch

    threads = params.cpu_threads or env_threads() or os.cpu_count() or 1
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)

    if params.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif params.device == "cuda" and not torch.cuda.is_available():
        raise ParamsError("params: 'device' is 'cuda' but no CUDA device is available")
    else:
        device = torch.device(params.device)
    if device.type == "cuda":
        configure_cuda_allocator(params)
    configure_cudnn(params)
    return device


def configure_cudnn(params: Params) -> bool:
    """cuDNN picks each convolution's algorithm by timing the candidates on the first call of a shape
    (params.cudnn_benchmark; `torch.backends.cudnn.benchmark`), or by its heuristics (the default).
    Timed choices can differ from run to run, and so can the last bits of a convolution's sums:
    off by default. The priors' shapes are fixed within a stage, so timing is paid once a shape.
    Returns the setting now in force."""
    import torch

    torch.backends.cudnn.benchmark = bool(params.cudnn_benchmark)
    return torch.backends.cudnn.benchmark


ALLOC_ENV = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def configure_cuda_allocator(params: Params, environ=None) -> Optional[str]:
    """PyTorch's CUDA allocator with expandable segments (params.cuda_expandable_segments), unless the
    user set its configuration. The coarse stage's tensors change size every step (the occupied
    samples): with fixed segments three oracle runs on one H200 reserved 113–130 GiB each for a
    22 GiB peak of live tensors, with expandable segments 25 GiB (reports/speed/). Returns the
    setting applied, or None."""
    import os

    import torch

    environ = os.environ if environ is None else environ
    if not params.cuda_expandable_segments or any(environ.get(k) for k in ALLOC_ENV):
        return None
    setting = "expandable_segments:True"
    if torch.cuda.is_initialized():  # the allocator has read its configuration already: set it live
        set_live = getattr(torch.cuda.memory, "_set_allocator_settings", None)
        if set_live is None:
            return None
        set_live(setting)
    else:
        environ["PYTORCH_CUDA_ALLOC_CONF"] = setting  # read when CUDA first allocates
    return setting
