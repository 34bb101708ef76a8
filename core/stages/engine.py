"""The one stage loop: both stages of both papers are configurations of it.

Magic123 (§2.1) optimises a coarse NeRF, then a fine DMTet mesh; Consistent123 (§3) runs the same
two representations under its two-stage prior. What differs between the stages is the
`Representation` (core/stages/coarse.py: the NeRF field; core/stages/fine.py: the DMTet mesh) and a
`StageSpec` of numbers. One iteration, for either:

  1. the representation's own work before the step (NeRF: lr schedule, occupancy grid; DMTet:
     marching tetrahedra);
  2. the view: the reference view for the first `ref_warmup` iterations (the released code's
     known_iters), then every `camera.ref_every`-th iteration (Magic123 §3.2) or with probability
     `camera.ref_prob` (Consistent123 §4.1); otherwise a sampled camera with the scheduled shading,
     light and ambient (core/rendering/shading.py);
  3. render → RenderBatch: the reference view at `ref_resolution` with its rays' origins and
     directions each shifted by one N(0, ref_ray_noise²) vector (the released code's
     known_view_scale and known_view_noise_scale); a novel view composited on one random colour
     when `novel_background` is 'random' (the released code's bg for novel views);
  4. reference view: Magic123 eq. 1 (colour on the mask eroded by `mask_erode_px`, mask) and eq. 2
     (depth); novel view: the guidance (Magic123 eqs. 7–8, Consistent123 eqs. 8–9);
  5. the representation's regularisers (coarse: eq. 3, entropy, orientation; fine: normal
     consistency, Laplacian) — eq. 4 is the sum;
  6. the optimiser's step (`params.optimizer`: Magic123's Adam or Consistent123's Adan; core/stages/optim.py);
  7. Consistent123's detector check (eqs. 5–6), where one runs, which may start stage 2.

Everything a resumed run needs is one `StageState`, saved whole and atomically every
`checkpoint_every` iterations: the step, every RNG, the optimiser, the representation, the prior's
schedule (the stage-2 switch), the detector's scores and trace, the guidance clock and the token
embedding the 2D prior guides with. The fine stage starts from the coarse stage's state, so it
guides with the same token and continues the same clock. A checkpoint made with other parameters
(of the sections this stage reads) is not resumed: the stage starts afresh and says so.
"""
from __future__ import annotations

import dataclasses
import logging
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from core.errors import InputError, Lift3DError
from core.io import BackgroundWriter, atomic_torch_save, host_copy
from core.perf import scope, to_device
from core.rendering.batch import RenderBatch
from core.rendering.cameras import Cameras, orbit_cameras, reference_cameras, sample_cameras
from core.rendering.shading import sample_ambient, sample_light, sample_shading
from core.stages.losses import pearson_depth_loss, reference_mask_loss, reference_rgb_loss
from core.stages.optim import build_optimizer

log = logging.getLogger(__name__)



FORMAT = "lift3d-stage-2"
CHECKPOINT = "checkpoint.pt"
RESULT = "result.json"
TRACE = "trace.csv"


class NonFiniteError(Lift3DError):
    """A loss term or gradient became NaN or infinite: the stage stops, its last good checkpoint stays."""

Callback = Optional[Callable[[int, dict], None]]


class Representation(Protocol):
    """What the loop needs of a 3D representation (the coarse NeRF, the fine DMTet mesh)."""

    backend: str  # the kernel that runs it, for logs and records (hash grid or rasteriser backend)

    def param_groups(self) -> list[dict]: ...

    def before_step(self, step: int, total: int, generator: torch.Generator,
                    optimizer: torch.optim.Optimizer) -> None: ...

    def needs_normals(self, shading: str) -> bool: ...

    def render(self, cameras: Cameras, resolution: int, *, shading: str, light_dir: Optional[torch.Tensor],
               ambient: float, diffuse: float, generator: Optional[torch.Generator]) -> RenderBatch: ...
    # a representation that traces rays also takes `ray_offsets=(δo, δd)` (StageSpec.ref_ray_noise > 0)

    def render_views(self, cameras: Cameras, resolution: int) -> RenderBatch: ...

    def regularisers(self, out: RenderBatch) -> dict[str, tuple[float, torch.Tensor]]: ...

    def progress(self) -> dict[str, float]: ...

    def train(self, mode: bool = True) -> Any: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True)
class StageSpec:
    """The numbers that make the loop one stage or the other."""

    name: str  # 'coarse' | 'fine'
    iters: int
    resolution: int
    checkpoint_every: int
    seed: int  # the stage's random stream
    rgb: float  # λ_rgb, eq. 1
    mask: float  # λ_mask, eq. 1
    depth: float  # λ_d, eq. 2
    mask_erode_px: int = 0  # the colour term's mask eroded by this many pixels (fine stage)
    clock_offset: int = 0  # iterations of the stages before this one on the guidance clock
    clock_total: int = 1  # the clock's length: every stage's iterations together
    start_stage2: bool = False  # begin in the prior's stage 2 if an earlier stage did not switch
    ref_warmup: int = 0  # iterations 0 … ref_warmup − 1 render the reference view only
    ref_resolution: Optional[int] = None  # the reference view's render size (None: `resolution`)
    ref_ray_noise: float = 0.0  # σ of the one offset added to all reference rays' origins (and another to directions)
    novel_background: str = "white"  # 'white' | 'random': one uniform random colour per novel view

    @property
    def trace_every(self) -> int:
        """trace.csv gets a row every this many iterations (about 100–500 rows a stage)."""
        return max(1, min(10, self.iters // 100))


@dataclass
class StageState:
    """One stage run's whole state; a checkpoint is this, saved with torch.save."""

    stage: str
    params: dict
    params_digest: str  # of the parameter sections the stage reads (core.params.step_digest)
    step: int = 0
    elapsed: float = 0.0
    rng: dict = field(default_factory=dict)
    optimizer: Optional[dict] = None
    representation: Optional[dict] = None
    prior: Optional[dict] = None  # the guidance's schedule (Consistent123: the stage-2 switch)
    detector: Optional[dict] = None  # the detector's scores and trace
    clock: dict = field(default_factory=dict)  # {"offset", "total"}: the guidance clock
    token: Optional[dict] = None  # {token: embedding}: what the 2D prior guides with
    upstream: Optional[dict] = None  # the checkpoint this stage started from
    trace: list = field(default_factory=list)  # trace.csv's rows so far
    marks: list = field(default_factory=list)  # [step, elapsed seconds] at the loop's start and every 25 steps

    def to_dict(self) -> dict:
        return {"format": FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "StageState":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def read_state(path: Path | str, stage: Optional[str] = None) -> StageState:
    """A checkpoint file → StageState; one clear line (InputError) for anything else."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file is the user's input problem
        raise InputError(f"not a readable lift3d checkpoint: {path} ({type(e).__name__}); "
                         f"delete it or run again with --fresh") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise InputError(f"not a lift3d checkpoint of this version: {path} (run again with --fresh)")
    state = StageState.from_dict(ck)
    if stage is not None and state.stage != stage:
        raise InputError(f"{path} is a {state.stage} checkpoint, not a {stage} one")
    return state


def rng_state(generator: torch.Generator, guidance=None) -> dict:
    """Every random stream a stage draws from, for an exact resume: the stage's own, the
    guidance's (SDS timesteps and noise of each prior) and the global ones."""
    parts = getattr(guidance, "generators", lambda: {})()
    return {"generator": generator.get_state(), "guidance": {k: g.get_state() for k, g in parts.items()},
            "torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict, generator: torch.Generator, guidance=None) -> None:
    generator.set_state(state["generator"])
    parts = getattr(guidance, "generators", lambda: {})()
    for name, g in parts.items():
        if name in state.get("guidance", {}):
            g.set_state(state["guidance"][name])
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


STAGE_OUTPUTS = (RESULT, TRACE, "renders", "reference_rgba.png", "detector.json", "mesh.obj", "mesh.ply", "mesh.mtl",
                 "mesh_albedo.png", "mesh.glb", "turntable.gif")


def clear_outputs(out: Path) -> None:
    """Remove an earlier run's outputs from a stage folder that starts afresh (never the inputs)."""
    import shutil

    for name in STAGE_OUTPUTS:
        p = Path(out) / name
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


def write_views(rep: Representation, params, reference, out: Path, resolution: int) -> list[str]:
    """reference_rgba.png, renders/reference.png (RGBA, colour un-composited from white) and
    renders/novel_XXX.png (an orbit of params.evaluate.novel_views) of a representation; the file names."""
    from core.inputs.images import save_rgba
    from core.io import atomic_save_image, to_uint8

    (out / "renders").mkdir(parents=True, exist_ok=True)
    save_rgba(reference, out / "reference_rgba.png")
    files = ["reference_rgba.png"]
    ref = rep.render_views(reference_cameras(params.camera, device=rep.device), resolution)
    colour = ref.albedo if ref.albedo is not None else ref.rgb
    a = ref.opacity[0].clamp_min(1e-6)
    rgb = ((colour[0] - (1 - ref.opacity[0])) / a).clamp(0, 1)
    atomic_save_image(out / "renders" / "reference.png", to_uint8(torch.cat([rgb, ref.opacity[0]], 0)))
    files.append("renders/reference.png")
    n = params.evaluate.novel_views
    cams = orbit_cameras(n, 90.0, params.camera.radius, params.camera.fovy, start=360.0 / n, device=rep.device)
    nov = rep.render_views(cams, resolution)
    for i in range(n):
        atomic_save_image(out / "renders" / f"novel_{i:03d}.png", to_uint8(nov.rgb[i]))
        files.append(f"renders/novel_{i:03d}.png")
    return files


def erode_mask(mask: torch.Tensor, px: int) -> torch.Tensor:
    """Binary erosion of a (B, 1, H, W) mask by `px` pixels (a (2px+1)² square)."""
    if px <= 0:
        return mask
    return 1.0 - F.max_pool2d(1.0 - mask, 2 * px + 1, stride=1, padding=px)


def resize_reference(ref, size: int):
    """The reference at size² (area-averaged down, bilinear up, as cv2.INTER_AREA / a plain resize;
    the mask re-binarised at 0.5, as the released code thresholds its resized alpha)."""
    if ref.rgb.shape[-1] == size and ref.rgb.shape[-2] == size:
        return ref
    log.info("reference resized from %d² to %d²", ref.rgb.shape[-1], size)
    down = size < ref.rgb.shape[-1]

    def rs(t):
        t = t[None].float()
        if down:
            return F.interpolate(t, size=(size, size), mode="area")[0]
        return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0]

    return dataclasses.replace(ref, rgb=rs(ref.rgb).clamp(0, 1), mask=(rs(ref.mask) > 0.5).float(),
                               depth=rs(ref.depth) if ref.depth is not None else None)


def composite_background(out: RenderBatch, background: torch.Tensor) -> RenderBatch:
    """Put a render made on white over `background` (B, 3): rgb + (1 − opacity)(bg − 1), the same as
    compositing on bg directly (colour = Σ w c + (1 − Σ w)·bg). Records it in `out.background`."""
    bg = background.to(out.rgb)[:, :, None, None]
    out.rgb = out.rgb + (1.0 - out.opacity) * (bg - 1.0)
    out.background = background
    return out


def _start_host_copy(metrics: dict, wait: bool = True) -> tuple:
    """The first half of `_to_host`: the one-element tensors of `metrics` stacked per device and
    copied to the host, waiting for the device (`wait`) or not (a copy into pinned memory and an event
    after it, readable once the event has passed). Strings and numbers are kept as they are."""
    out: dict = {}
    by_device: dict = {}
    for k, v in metrics.items():
        if isinstance(v, str):
            out[k] = v
        elif isinstance(v, torch.Tensor):
            by_device.setdefault(v.device, []).append((k, v))
        else:
            out[k] = float(v)
    copies = []
    for dev, items in by_device.items():
        stacked = torch.stack([v.detach().reshape(()).double() for _, v in items])
        event = None
        if not wait and dev.type == "cuda":  # pinned (torch's caching host allocator), so the copy is async
            host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
            stacked = host.copy_(stacked, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(dev))  # the stream the copy went on, whatever the current device
        copies.append(([k for k, _ in items], stacked, event))
    return list(metrics), out, copies


def _finish_host_copy(started: tuple) -> dict:
    """`_start_host_copy`'s copies as {name: float}, in the metrics' order (waits for each event)."""
    order, out, copies = started
    for keys, stacked, event in copies:
        if event is not None:
            event.synchronize()
        out.update(zip(keys, stacked.tolist()))
    return {k: out[k] for k in order}


def _to_host(metrics: dict) -> dict:
    """{name: float} of one-element tensors and numbers (strings kept as they are), the tensors read
    in one copy per device: a float() each is a wait for the GPU each (a dozen a traced step; session
    21's audit). float64 holds every fp32 and fp16 value exactly: the numbers float() gives."""
    return _finish_host_copy(_start_host_copy(metrics))


# how many iterations late a stage's callback gets an iteration's metrics, by device type (_MetricsQueue)
METRICS_LAG = {"cuda": 2}


class _MetricsQueue:
    """Each iteration's metrics to a stage's callback without the host waiting for the device: an
    iteration's one-element tensors are copied to pinned host memory behind an event, and handed to
    `callback(step, floats)` `lag` iterations later, in order, when the device is long past them (a
    `float()` of them at once would wait for the step's whole queue every iteration, so the host
    could not queue the next iteration while the device runs this one: the Prefect tasks' MLflow
    logging and progress ask for every iteration's). `lag` 0 (a CPU): at once."""

    def __init__(self, callback, lag: int):
        self.callback, self.lag = callback, int(lag)
        self.pending: list = []

    def push(self, step: int, metrics: dict) -> None:
        self.pending.append((step, _start_host_copy(metrics, wait=self.lag == 0)))
        while len(self.pending) > self.lag:
            self._deliver()

    def flush(self) -> None:
        while self.pending:
            self._deliver()

    def _deliver(self) -> None:
        step, started = self.pending.pop(0)
        fm = _finish_host_copy(started)
        self.callback(step, {k: v for k, v in fm.items() if not isinstance(v, str)})


class _Unchecked:
    """A step's finiteness on its way to the host (Stage._check_finite): the flag, the event after
    which it is readable (None on a CPU), and the loss and terms to name on failure."""

    __slots__ = ("step", "ok", "event", "loss", "terms")

    def __init__(self, step: int, ok: torch.Tensor, event, loss: torch.Tensor, terms: dict):
        self.step, self.ok, self.event, self.loss, self.terms = step, ok, event, loss, terms


def _host_copy(t: torch.Tensor) -> tuple[torch.Tensor, Optional["torch.cuda.Event"]]:
    """`t` copied to the host without waiting (pinned memory) and the event after which the copy
    holds it; a CPU tensor as it is, with no event."""
    if t.device.type != "cuda":
        return t, None
    host = t.to("cpu", non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


class Stage:
    """One stage run: the loop over a representation, its state, its checkpoints."""

    def __init__(self, spec: StageSpec, representation: Representation, params, reference, *, guidance=None,
                 detector=None, device: torch.device | str = "cpu", params_digest: str = "",
                 inherited: Optional[StageState] = None):
        self.spec, self.rep, self.params = spec, representation, params
        self.guidance, self.detector = guidance, detector
        self.device = torch.device(device)
        self.optimizer = build_optimizer(representation.param_groups(), params.optimizer)
        self._unchecked: list[_Unchecked] = []  # steps whose finiteness the host has not read yet
        self._writer = BackgroundWriter(f"lift3d-{spec.name}-checkpoint")  # params.checkpoint_background
        self.generator = torch.Generator().manual_seed(spec.seed)
        self.state = StageState(stage=spec.name, params=params.to_dict(), params_digest=params_digest,
                                clock={"offset": spec.clock_offset, "total": spec.clock_total},
                                token=getattr(guidance, "token_embeds", None),
                                upstream=inherited.upstream if inherited is not None else None)
        if inherited is not None and inherited.prior is not None and hasattr(guidance, "load_state_dict"):
            guidance.load_state_dict(inherited.prior)  # Consistent123: the switch made in the coarse stage
        if spec.start_stage2 and hasattr(guidance, "start_stage2"):
            guidance.start_stage2(spec.clock_offset)  # a no-op when an earlier stage switched
        self.ref_cameras = reference_cameras(params.camera, device=self.device)
        reference = resize_reference(reference, spec.ref_resolution or spec.resolution)
        self.ref_rgb = reference.rgb[None].to(self.device)
        self.ref_mask = reference.mask[None].to(self.device)
        self.ref_mask_eroded = erode_mask(self.ref_mask, spec.mask_erode_px)
        self.ref_depth = reference.depth[None].to(self.device) if reference.depth is not None else None

    # ------------------------------------------------------------------------------------ state
    @property
    def step_no(self) -> int:
        return self.state.step

    def snapshot(self) -> StageState:
        """The state as of now, every part filled in (every step's finiteness read first: a kept state
        is a checked one)."""
        self._read_checks(wait=True)
        s = self.state
        s.rng = rng_state(self.generator, self.guidance)
        s.optimizer = self.optimizer.state_dict()
        s.representation = self.rep.state_dict()
        s.prior = self.guidance.state_dict() if hasattr(self.guidance, "state_dict") else None
        s.detector = self.detector.state_dict() if self.detector is not None else None
        return s

    def restore(self, state: StageState) -> None:
        self.rep.load_state_dict(state.representation)
        self.optimizer.load_state_dict(state.optimizer)
        set_rng_state(state.rng, self.generator, self.guidance)
        if state.prior is not None and hasattr(self.guidance, "load_state_dict"):
            self.guidance.load_state_dict(state.prior)
        if state.detector is not None and self.detector is not None:
            self.detector.load_state_dict(state.detector)
        keep = ("params", "params_digest", "token", "upstream", "clock")  # this run's (equal when resumable)
        self.state = dataclasses.replace(state, **{k: getattr(self.state, k) for k in keep})

    def save(self, path: Path) -> None:
        """The state as of now to `path` (atomically). With params.checkpoint_background the state is
        copied to the host here and written on a thread while the loop goes on (in line, a 160–250 MB
        checkpoint every 500 iterations cost the H200 loops 0.2–0.6 s each: reports/speed session 27);
        the loop's end, a stop and the next save wait for it."""
        state = self.snapshot().to_dict()
        if self.params.checkpoint_background:
            self._writer.submit(atomic_torch_save, host_copy(state), path)
        else:
            atomic_torch_save(state, path)

    def try_resume(self, path: Path) -> bool:
        """Load `path` when it is a checkpoint of this stage with these parameters; True when it was."""
        if not path.is_file():
            return False
        state = read_state(path, self.spec.name)
        if state.params_digest != self.state.params_digest:
            log.warning("%s: %s was made with other parameters; starting the stage afresh", self.spec.name, path)
            return False
        self.restore(state)
        log.info("resuming the %s stage from step %d (%s)", self.spec.name, self.state.step, path)
        return True

    # ------------------------------------------------------------------------------------ one step
    def is_reference_step(self, step: int) -> bool:
        if step < self.spec.ref_warmup:
            return True
        cam = self.params.camera
        if cam.ref_prob is not None:
            return bool(torch.rand((), generator=self.generator).item() < cam.ref_prob)
        return step % cam.ref_every == 0

    def step(self) -> dict[str, Any]:
        self._read_checks(wait=False)  # earlier steps' finiteness, where the device has got there
        spec, gen, p = self.spec, self.generator, self.params
        step, total = self.state.step, spec.iters
        shading_params = p.coarse.shading
        with scope("lift3d.before_step"):  # the fine stage's marching tetrahedra; the coarse grid's updates
            self.rep.before_step(step, total, gen, self.optimizer)
        is_ref = self.is_reference_step(step)
        res, extra, background = spec.resolution, {}, None
        if is_ref:
            cams, shading, light = self.ref_cameras, "albedo", None
            res = spec.ref_resolution or spec.resolution
            if spec.ref_ray_noise > 0:  # one offset for all origins, one for all directions
                extra["ray_offsets"] = (torch.randn(3, generator=gen) * spec.ref_ray_noise,
                                        torch.randn(3, generator=gen) * spec.ref_ray_noise)
        else:
            # Consistent123's progressive view ranges widen over the NeRF stage only (camera.progressive_view)
            # drawn on the host (the seeded stream), moved without waiting for the GPU's queue
            cams_host = sample_cameras(p.camera, 1, gen, progress=step / total if spec.name == "coarse" else None)
            cams = cams_host.to(self.device)
            shading = sample_shading(step, total, shading_params, gen, stage=spec.name)
            light = to_device(sample_light(cams_host.centers, gen), self.device)
            if spec.novel_background == "random":
                background = to_device(torch.rand(len(cams), 3, generator=gen), self.device)
        ambient, diffuse = sample_ambient(shading_params, shading, gen)
        with scope("lift3d.render"):
            out = self.rep.render(cams, res, shading=shading, light_dir=light, ambient=ambient,
                                  diffuse=diffuse, generator=gen, **extra)
        if background is not None:
            composite_background(out, background)
        out.step, out.total_steps, out.stage = spec.clock_offset + step, spec.clock_total, spec.name
        zero = out.rgb.new_zeros(())
        l_rgb = l_mask = l_depth = l_g = zero
        diag: dict = {}
        if is_ref:
            l_rgb = reference_rgb_loss(out.rgb, self.ref_rgb, self.ref_mask_eroded)  # eq. 1
            l_mask = reference_mask_loss(out.opacity, self.ref_mask)
            if self.ref_depth is not None and spec.depth > 0:
                # eq. 2; the reference depth is bigger = nearer (disparity-like), the render's is
                # distance, so the render's is negated before the correlation
                l_depth = pearson_depth_loss(-out.depth, self.ref_depth, self.ref_mask)
        elif self.guidance is not None:
            with scope("lift3d.guidance"):
                g = self.guidance(out)
            l_g, diag = g.loss, g.diagnostics
        loss = spec.rgb * l_rgb + spec.mask * l_mask + l_g + spec.depth * l_depth  # eq. 4 (with eq. 1)
        with scope("lift3d.regularisers"):
            regs = self.rep.regularisers(out)
        for w, term in regs.values():
            loss = loss + w * term
        terms = {"rgb": l_rgb, "mask": l_mask, "depth": l_depth, "guidance": l_g, **{k: t for k, (_, t) in regs.items()}}
        self.optimizer.zero_grad(set_to_none=True)
        if loss.requires_grad:
            with scope("lift3d.backward"):
                loss.backward()
            # the loss and the gradients checked together, after the backward: one read of the device
            # a step, and the host queues the backward without waiting for the priors' UNets. A
            # non-finite loss's backward changes nothing that is kept: the step stops before the optimiser
            self._check_finite(step, loss, terms, gradients=True)
            with scope("lift3d.optimizer"):
                self.optimizer.step()
        else:
            self._check_finite(step, loss, terms)
        self._detector_check(step)
        self.state.step += 1
        progress = self.rep.progress()  # the coarse field's occupancy and samples, the fine mesh's face count
        if step % spec.trace_every == 0 or step == total - 1:
            self._trace(step, {"loss": loss, **terms, **progress, **diag})
        return {"loss": loss, **terms, **progress, "reference": float(is_ref), "shading": shading, **diag}

    def _stop(self, step: int, what: str) -> None:
        self._writer.wait(raise_error=False)  # the checkpoint being written, if any, is the last good one
        last = read_state(self._ck_path).step if getattr(self, "_ck_path", None) and self._ck_path.is_file() else None
        kept = f"the last good checkpoint (step {last}) is kept" if last is not None else "no checkpoint was written yet"
        raise NonFiniteError(f"{self.spec.name} stage, step {step}: {what} is not finite; stopped ({kept})")

    def _check_finite(self, step: int, loss: torch.Tensor, terms: dict[str, torch.Tensor],
                      gradients: bool = False) -> None:
        """Stop the stage when the loss (or, with `gradients`, a parameter's gradient) is not finite,
        naming the loss term first; the terms are looked at only on failure.

        With torch's fused Adam and `gradients` the host does not wait for the answer: the flag goes to
        the optimiser as GradScaler's `found_inf`, so a step whose loss or gradients are not finite
        changes no parameter, moment or step count on the device, and the host reads the flag later
        (`_read_checks`: at the start of a later step where the device has got there, and always
        before a snapshot or a checkpoint), then stops the stage naming that step. Otherwise one host
        sync here, before the optimiser."""
        flags = [torch.isfinite(loss.detach())]
        if gradients:
            flags += [torch.isfinite(p.grad).all() for g in self.optimizer.param_groups for p in g["params"]
                      if p.grad is not None]
        ok = torch.stack(flags).all()
        if gradients and self._skips_on_device():
            self.optimizer.found_inf = (~ok).float()
            self._unchecked.append(_Unchecked(step, *_host_copy(ok), loss.detach(),
                                              {k: t.detach() for k, t in terms.items()}))
            return
        if not bool(ok):
            self._failed(step, flags[0], terms)

    def _skips_on_device(self) -> bool:
        """Whether the optimiser skips a step on the device given `found_inf` (torch's fused Adam, as
        GradScaler drives it), so the finiteness check need not stop the host."""
        opt = self.optimizer
        return type(opt) is torch.optim.Adam and bool(opt.defaults.get("fused"))

    def _read_checks(self, wait: bool) -> None:
        """The finiteness of earlier steps, oldest first: those the device has answered (all of them
        with `wait`); the first that failed stops the stage."""
        while self._unchecked:
            u = self._unchecked[0]
            if not wait and u.event is not None and not u.event.query():
                return
            if u.event is not None:
                u.event.synchronize()
            self._unchecked.pop(0)
            if not bool(u.ok):
                self._unchecked.clear()
                self._failed(u.step, torch.isfinite(u.loss), u.terms)

    def _failed(self, step: int, loss_finite: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        if not bool(loss_finite):
            bad = [k for k, t in terms.items() if not bool(torch.isfinite(t.detach()).all())]
            self._stop(step, f"the loss term '{bad[0]}'" if bad else "the loss")
        self._stop(step, "a gradient")

    def _trace(self, step: int, metrics: dict) -> None:
        """One row of trace.csv: the loss terms, the representation's progress (the coarse field's
        occupancy, the fine mesh's faces), the priors' weights on the guidance clock, their SDS
        gradient norms, and the detector's score and rate where it checked at this step."""
        row: dict[str, Any] = {"step": step, "clock": self.spec.clock_offset + step}
        row.update(_to_host({k: v for k, v in metrics.items() if not isinstance(v, str)}))
        g = self.guidance
        if hasattr(g, "weights"):  # Consistent123's schedule at this step, also on reference-view steps
            row["w_3d"], row["w_2d"] = g.weights(self.spec.clock_offset + step, self.spec.clock_total)
        for name in ("lambda_2d", "lambda_3d"):
            if hasattr(g, name):
                row[name] = float(getattr(g, name))
        if self.detector is not None and self.detector.trace and self.detector.trace[-1]["step"] == step:
            row["detector_score"], row["detector_rate"] = self.detector.trace[-1]["score"], self.detector.trace[-1]["rate"]
        self.state.trace.append(row)

    def write_trace(self, out: Path) -> None:
        import pandas as pd

        from core.io import atomic_write_text

        atomic_write_text(Path(out) / TRACE, pd.DataFrame(self.state.trace).to_csv(index=False))

    def _detector_check(self, step: int) -> None:
        """Consistent123 §3.2: every h iterations the V views are scored (eqs. 5–6); stage 2 starts
        when R falls below δ inside the released window, or at its end."""
        d = self.detector
        if d is None or d.switch_step is not None:
            return
        if d.due(step):
            cams = orbit_cameras(d.p.views, 90.0, self.params.camera.radius, self.params.camera.fovy,
                                 device=self.device)
            with torch.no_grad():
                imgs = self.rep.render_views(cams, self.spec.resolution).rgb
            if d.update(step, imgs) and hasattr(self.guidance, "start_stage2"):
                self.guidance.start_stage2(self.spec.clock_offset + step)

    def finish(self, out: Path, info: dict, outputs_seconds: Optional[float] = None) -> dict:
        """Write out/result.json (last, atomically: a folder with it is complete) and print the stage's
        one-line summary (core.perf): the loop's seconds and iterations per second (over every run of
        it, when resumed), the outputs' seconds, peak memory. result.json holds it as `summary`, and
        its numbers also at the top level (the tasks log those to MLflow)."""
        import json

        from core.io import atomic_write_text
        from core.perf import summary, summary_line

        g = self.guidance
        s = self.state
        summ = summary(self.device, s.elapsed, s.step, outputs_seconds=outputs_seconds)
        record = {"stage": self.spec.name, "steps": s.step, "seconds": round(s.elapsed, 3), "device": str(self.device),
                  "guidance": type(g).__name__ if g is not None else "none",
                  "switch_step": getattr(g, "switch_step", None), "params_digest": s.params_digest,
                  "upstream": s.upstream, **info, "checkpoint": CHECKPOINT,
                  "it_per_s": summ["it_per_s"], "outputs_seconds": summ.get("outputs_seconds"),
                  "peak_memory_gib": summ["peak_memory_gib"], "summary": summ, "marks": s.marks}
        self.write_trace(out)
        atomic_write_text(Path(out) / RESULT, json.dumps(record, indent=2))
        log.info("%s", summary_line(f"{self.spec.name} stage", summ))
        return record

    def complete(self, out: Path, outputs: Callable[[], dict], what: str = "renders") -> dict:
        """The stage's outputs (`outputs()` writes them and returns result.json's extra fields), timed,
        then `finish`. `what` names them in the line printed before they start."""
        from core.perf import Timer

        log.info("%s stage: writing %s", self.spec.name, what)
        t = Timer()
        with scope("lift3d.export"):
            info = outputs()
        return self.finish(out, info, outputs_seconds=t.seconds)

    # ------------------------------------------------------------------------------------ the loop
    def run(self, ck_path: Path, *, callback: Callback = None, stop_after: Optional[int] = None,
            progress: bool = True, postfix: Callable[[dict], dict] = lambda m: {"loss": f"{m['loss']:.4f}"}) -> bool:
        """Iterate to `spec.iters` with a progress bar and checkpoints; True when the stage is done.

        `callback(step, metrics)` gets each iteration's float metrics, in order; on a GPU two
        iterations late (`_MetricsQueue`: the host does not wait for the device to read them), every
        one of them by the time this returns. A callback with the attribute `metrics = False` is
        called every iteration, at once, with no metrics. `stop_after=k` stops after iteration k as a
        kill would (the checkpoint as of its last save)."""
        from tqdm import tqdm

        from core.perf import reset_peak_memory

        iters = self.spec.iters
        self._ck_path = ck_path
        reset_peak_memory(self.device)  # the stage's own peak (GPU; a CPU's max RSS is the process's)
        bar = tqdm(total=iters, initial=self.state.step, desc=self.spec.name, disable=not progress, dynamic_ncols=True)
        t0, base = time.perf_counter(), self.state.elapsed
        if not self.state.marks or self.state.marks[-1][0] != self.state.step:  # where this run starts
            self.state.marks.append([self.state.step, round(base, 4)])
        # a callback marked `metrics = False` (bench speed's profiler) is called every iteration with
        # no metrics and reads nothing; others get every iteration's, two iterations late on a GPU
        step_only = callback is not None and getattr(callback, "metrics", True) is False
        queue = (_MetricsQueue(callback, lag=METRICS_LAG.get(self.device.type, 0))
                 if callback is not None and not step_only else None)
        try:
            while self.state.step < iters:
                self.rep.train(True)
                if self.state.step == self.spec.ref_warmup and getattr(self.guidance, "first_call_note", ""):
                    bar.set_postfix_str(self.guidance.first_call_note)  # the next 25th iteration's figures replace it
                metrics = self.step()
                s = self.state.step
                if step_only:
                    callback(s - 1, {})
                if s % 25 == 0:  # the bar's figures and the clock's mark: one wait for the device
                    fm = _to_host(metrics)
                    if queue is not None:  # the earlier iterations' first, in order
                        queue.flush()
                        callback(s - 1, {k: v for k, v in fm.items() if not isinstance(v, str)})
                    bar.set_postfix(postfix(fm))
                elif queue is not None:
                    queue.push(s - 1, metrics)
                bar.update(1)
                self.state.elapsed = base + time.perf_counter() - t0
                if s % 25 == 0:  # fm's values were read to the host above: the device has caught up
                    self.state.marks.append([s, round(self.state.elapsed, 4)])
                if s % self.spec.checkpoint_every == 0 or s == iters:
                    with scope("lift3d.checkpoint"):
                        self.save(ck_path)
                        self.write_trace(ck_path.parent)
                if stop_after is not None and stop_after <= s < iters:
                    if queue is not None:
                        queue.flush()
                    return False
            if queue is not None:
                queue.flush()
        finally:
            bar.close()
            # the checkpoint on its thread: written when the loop returns (an error of the loop's own wins)
            self._writer.wait(raise_error=sys.exc_info()[0] is None)
        return True
