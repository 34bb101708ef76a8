"""One asset's steps, composed from files: what the CLI commands and the Prefect tasks both call.

Each function takes input paths, an output folder and `Params`, and returns the stage's record (the
JSON it wrote last). None of them knows about Prefect, DVC or MLflow: progress reaches the caller
through an optional `callback(step, metrics)`.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Optional

from core.params import Params, resolve_device

log = logging.getLogger(__name__)

Callback = Optional[Callable[[int, dict], None]]


def _read_result(out: Path, name: str = "result.json") -> dict:
    return json.loads((out / name).read_text())


def textual_inversion_stage(rgba: Path | str, out_dir: Path | str, params: Params, callback: Callback = None,
                            progress: bool = True) -> Path:
    """Learn the token <e> for the reference image (Magic123 §2.2 'Textural inversion', diffusers'
    recipe) and write out_dir/learned_embeds.bin in the benchmark folders' format."""
    from core.guidance.sd import load_stable_diffusion, weights_dtype
    from core.inputs.images import load_reference
    from core.models.sources import prior_model as model_name
    from core.guidance.textual_inversion import learn_token

    device = resolve_device(params)
    out = Path(out_dir)
    ref = load_reference(rgba, None, size=params.sd.resolution, max_pixels=params.segment.max_input_pixels,
                         object_scale=params.segment.object_scale)
    parts = load_stable_diffusion(model_name(params, "sd"), device, weights_dtype(device, params.sd.fp16),
                                  params.models)
    ti = params.textual_inversion
    out.mkdir(parents=True, exist_ok=True)
    target = out / "learned_embeds.bin"
    learn_token(parts, ref.rgb, ref.mask, token=ti.placeholder, initializer=ti.initializer, steps=ti.steps,
                lr=ti.lr, batch_size=ti.batch_size, resolution=params.sd.resolution, seed=params.seed,
                out=target, callback=(lambda s, loss: callback(s, {"ti_loss": loss})) if callback else None)
    return target


def needs_textual_inversion(params: Params) -> bool:
    """A token is learned when SD is used (λ_2D > 0 in some stage), no token or text is given, and
    textual inversion is on (Magic123's default; off for Consistent123)."""
    g = params.guidance
    uses_sd = g.kind in ("joint", "dynamic") and (g.coarse.lambda_2d > 0 or g.fine.lambda_2d > 0)
    return (uses_sd and params.textual_inversion.enabled and params.prompt.learned_embeds is None
            and params.prompt.text is None)


def _guidance(params: Params, reference, stage: str, device):
    """The stage's novel-view guidance; None for 'none' (the loop then renders the reference view only)."""
    from core.guidance.factory import build_guidance

    return None if params.guidance.kind == "none" else build_guidance(params, reference, stage, device)


def coarse_stage(image: Path | str, out_dir: Path | str, params: Params, depth: Path | str | None = None,
                 callback: Callback = None, resume: bool = True, progress: bool = True) -> dict:
    """The coarse NeRF stage (Magic123 §2.1.1; Consistent123's stage 1 and the start of stage 2).

    Every input is loaded and checked before the output folder is created."""
    from core.stages.coarse import run_coarse
    from core.inputs.images import load_reference

    device = resolve_device(params)
    reference = load_reference(image, depth, size=params.coarse.resolution,
                               max_pixels=params.segment.max_input_pixels, object_scale=params.segment.object_scale,
                               recenter=params.segment.recenter)
    guidance = _guidance(params, reference, "coarse", device)
    detector = None
    if params.detector.enabled:
        from core.stages.detector import ClipScorer, StageDetector

        detector = StageDetector(params.detector, ClipScorer.from_params(params, device))
    out = Path(out_dir)
    run_coarse(params, reference, out, guidance=guidance, detector=detector, device=device, callback=callback,
               resume=resume, progress=progress)
    if detector is not None:
        from core.stages.detector import write_trace

        write_trace(detector, out / "detector.json")
    return _read_result(out)


def fine_stage(coarse_checkpoint: Path | str, out_dir: Path | str, params: Params, image: Path | str,
               depth: Path | str | None = None, callback: Callback = None, resume: bool = True,
               progress: bool = True, recenter: bool | None = None) -> dict:
    """The fine DMTet stage (Magic123 §2.1.2) from a coarse checkpoint, at params.fine.resolution.

    `recenter=False` takes an image that is already framed (a coarse folder's reference_rgba.png)."""
    from core.stages.fine import run_fine
    from core.inputs.images import load_reference
    from core.representations.nerf import load_field

    device = resolve_device(params)
    field, _ = load_field(coarse_checkpoint, device)
    reference = load_reference(image, depth, size=params.fine.resolution,
                               max_pixels=params.segment.max_input_pixels, object_scale=params.segment.object_scale,
                               recenter=params.segment.recenter if recenter is None else recenter)
    guidance = _guidance(params, reference, "fine", device)
    out = Path(out_dir)
    run_fine(params, reference, field, out, guidance=guidance, device=device, callback=callback, resume=resume,
             progress=progress, coarse_checkpoint=str(coarse_checkpoint))
    return _read_result(out)
