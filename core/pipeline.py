"""One asset's steps, composed from files: what the CLI commands and the Prefect tasks both call.

Each function takes input paths, an output folder and `Params`, and returns the stage's record (the
JSON it wrote last). None of them knows about Prefect, DVC or MLflow: progress reaches the caller
through an optional `callback(step, metrics)`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

from core.params import Params, resolve_device

log = logging.getLogger(__name__)

Callback = Optional[Callable[[int, dict], None]]


def textual_inversion_stage(rgba: Path | str, out_dir: Path | str, params: Params, callback: Callback = None,
                            progress: bool = True) -> Path:
    """Learn the token <e> for the reference image (Magic123 §2.2 'Textural inversion', diffusers'
    recipe) and write out_dir/learned_embeds.bin in the benchmark folders' format, with
    out_dir/result.json: the step's cost (core.perf: seconds, it/s, peak memory), also printed."""
    import contextlib
    import json

    from core.guidance.factory import stable_diffusion_parts
    from core.guidance.textual_inversion import learn_token_from_params
    from core.inputs.images import load_reference
    from core.io import atomic_write_text
    from core.params import step_digest
    from core.perf import Timer, compile_cache, reset_peak_memory, summary, summary_line
    from core.stages.compile_ahead import maybe_start

    device = resolve_device(params)
    reset_peak_memory(device)
    wall = Timer()
    out = Path(out_dir)
    ref = load_reference(rgba, None, size=params.sd.resolution, max_pixels=params.segment.max_input_pixels,
                         object_scale=params.segment.object_scale, params=params)
    parts = stable_diffusion_parts(params, device)  # loaded once per process; its text encoder is ours
    out.mkdir(parents=True, exist_ok=True)
    target = out / "learned_embeds.bin"
    stats: dict = {}
    ahead = maybe_start(params, rgba, out, device)  # the coarse stage's compiling, beside this stage
    with compile_cache(params.models.compile_cache), (ahead or contextlib.nullcontext()):
        learn_token_from_params(parts, ref.rgb, ref.mask, params, out=target, progress=progress,
                                callback=(lambda s, loss: callback(s, {"ti_loss": loss})) if callback else None,
                                checkpoint=out / "checkpoint.pt", digest=step_digest(params, "textual_inversion"),
                                stats=stats)
        side = ahead.finish() if ahead is not None else None
    # the loop's seconds over every run of this stage's checkpoint (a resumed run adds to them)
    summ = summary(device, stats["loop_seconds"], params.textual_inversion.steps, wall_seconds=wall.seconds,
                   resumed_from=stats["resumed_from"], seconds_before_resume=stats["loop_seconds_before"],
                   **{k: stats[k] for k in ("views_seconds", "views_wait_seconds") if k in stats})
    record = {"stage": "textual_inversion", "steps": summ["iterations"], "token": "learned_embeds.bin", "summary": summ}
    if side is not None:
        record["compile_ahead"] = side
    atomic_write_text(out / "result.json", json.dumps(record, indent=2))
    this_run = f"this run {wall.seconds:.1f} s with model loading"  # the summary's seconds span every resumed run
    if stats["resumed_from"]:
        this_run += f", resumed from step {stats['resumed_from']}"
    log.info("%s", summary_line("textual inversion", summ) + f" ({this_run})")
    return target


def needs_textual_inversion(params: Params) -> bool:
    """A token is learned when SD is used (λ_2D > 0 in some stage), no token or text is given, and
    textual inversion is on (Magic123's default; off for Consistent123)."""
    g = params.guidance
    uses_sd = g.kind in ("joint", "dynamic") and (g.coarse.lambda_2d > 0 or g.fine.lambda_2d > 0)
    return (uses_sd and params.textual_inversion.enabled and params.prompt.learned_embeds is None
            and params.prompt.text is None)


def _guidance(params: Params, reference, stage: str, device, token: Optional[dict] = None):
    """The stage's novel-view guidance; None for 'none' (the loop then renders the reference view only)."""
    from core.guidance.factory import build_guidance

    return None if params.guidance.kind == "none" else build_guidance(params, reference, stage, device, token)


def will_resume(out_dir: Path | str, stage: str, params: Params) -> bool:
    """True when `stage` run into `out_dir` with `params` will continue a checkpoint there."""
    from core.errors import InputError
    from core.params import step_digest

    try:
        return _resumable(Path(out_dir) / "checkpoint.pt", stage, step_digest(params, stage), True) is not None
    except InputError:  # unreadable: the stage itself will say so
        return False


def _resumable(ck_path: Path, stage: str, digest: str, resume: bool):
    """The checkpoint's state when the stage will resume from it (same stage, same parameters). An
    unreadable one is the user's error (read_state's one line); the folder's result.json goes first,
    so that what an earlier run left beside the broken checkpoint no longer looks complete."""
    from core.errors import InputError
    from core.stages.engine import RESULT, read_state

    if not resume or not ck_path.is_file():
        return None
    try:
        state = read_state(ck_path, stage)
    except InputError:
        (ck_path.parent / RESULT).unlink(missing_ok=True)
        raise
    return state if state.params_digest == digest else None


def coarse_stage(image: Path | str, out_dir: Path | str, params: Params, depth: Path | str | None = None,
                 callback: Callback = None, resume: bool = True, progress: bool = True,
                 stop_after: Optional[int] = None, guidance=None, reference=None) -> dict:
    """The coarse NeRF stage (Magic123 §2.1.1; Consistent123's stage 1 and the start of stage 2).

    Every input is loaded and checked before the output folder is created. `guidance` and
    `reference` may be given ready-made (the oracle bench); `stop_after=k` stops after iteration k
    as a kill would (tests). Returns result.json's record ({} when stopped early)."""
    from core.inputs.images import load_reference
    from core.io import writable_folder
    from core.params import step_digest
    from core.perf import compile_cache
    from core.stages.coarse import reference_resolution, run_coarse
    from core.stages.engine import CHECKPOINT

    device = resolve_device(params)
    out = Path(out_dir)
    if reference is None:
        reference = load_reference(image, depth, size=reference_resolution(params),
                                   max_pixels=params.segment.max_input_pixels, object_scale=params.segment.object_scale,
                                   recenter=params.segment.recenter, params=params)
    writable_folder(out)  # before any model is loaded or token learned
    digest = step_digest(params, "coarse")
    earlier = _resumable(out / CHECKPOINT, "coarse", digest, resume)
    if guidance is None:
        guidance = _guidance(params, reference, "coarse", device, token=earlier.token if earlier else None)
    detector = None
    if params.detector.enabled:
        from core.stages.detector import ClipScorer, StageDetector

        detector = StageDetector(params.detector, ClipScorer.from_params(params, device))
    with compile_cache(params.models.compile_cache):
        stage = run_coarse(params, reference, out, guidance=guidance, detector=detector, device=device,
                           params_digest=digest, resume=resume, callback=callback, stop_after=stop_after,
                           progress=progress)
    return stage.record or {}


def fine_stage(coarse_checkpoint: Path | str, out_dir: Path | str, params: Params, image: Path | str | None = None,
               depth: Path | str | None = None, callback: Callback = None, resume: bool = True,
               progress: bool = True, recenter: bool | None = None, stop_after: Optional[int] = None,
               guidance=None, reference=None, turntable_frames: int = 36) -> dict:
    """The fine DMTet stage (Magic123 §2.1.2) from a coarse checkpoint, at params.fine.resolution.

    It continues the coarse run: the same token embedding for the 2D prior (no second textual
    inversion), the guidance clock and Consistent123's stage-2 switch from the coarse state.
    `image`: the reference (default: the coarse folder's reference_rgba.png, already framed);
    `recenter=False` takes an image that is already framed."""
    from core.inputs.images import load_reference
    from core.params import step_digest
    from core.perf import compile_cache
    from core.stages.coarse import load_coarse_field
    from core.stages.fine import run_fine

    device = resolve_device(params)
    coarse_checkpoint = Path(coarse_checkpoint)
    field, coarse = load_coarse_field(coarse_checkpoint, device)
    if reference is None:
        given = image is not None
        image = Path(image) if given else coarse_checkpoint.parent / "reference_rgba.png"
        if recenter is None:
            recenter = given and params.segment.recenter
        reference = load_reference(image, depth, size=params.fine.resolution,
                                   max_pixels=params.segment.max_input_pixels,
                                   object_scale=params.segment.object_scale, recenter=recenter, params=params)
    from core.io import writable_folder

    out = writable_folder(out_dir)
    digest = step_digest(params, "fine")
    if guidance is None:
        guidance = _guidance(params, reference, "fine", device, token=coarse.token)
    coarse.upstream = {"checkpoint": str(coarse_checkpoint), "step": coarse.step, "stage": "coarse"}
    with compile_cache(params.models.compile_cache):
        stage = run_fine(params, reference, field, out, coarse=coarse, guidance=guidance, device=device,
                         params_digest=digest, resume=resume, callback=callback, stop_after=stop_after,
                         progress=progress, turntable_frames=turntable_frames)
    return stage.record or {}
