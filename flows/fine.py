"""`lift3d refine COARSE_CHECKPOINT --out DIR`: the fine stage (Magic123 §2.1.2) from a coarse run.

Parameters: those stored in the coarse checkpoint (so a smoke coarse run refines as smoke), then
`--preset` if given (replacing them), then `--set` overrides. The reference view: `--image` (and
`--depth`) when given, else the coarse folder's reference_rgba.png (the reference as the coarse
stage used it; no depth then), brought to the fine resolution. Guidance: params.guidance.kind as
in the coarse stage, with the fine-stage prior weights. Resumes from DIR/checkpoint.pt unless
--fresh. Writes the textured mesh (OBJ+MTL+PNG, GLB), turntable.gif, renders/ and result.json.
"""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def refine_params(checkpoint_params, preset, overrides, params_file=None):
    """The coarse run's parameters, or a preset's when one is named; then the overrides."""
    from core.params import apply_overrides, load_params

    if preset:
        return load_params(preset, overrides, params_file)
    return apply_overrides(checkpoint_params, overrides)


def cli_refine(args) -> int:
    from core.errors import InputError
    from core.representations.nerf import load_field
    from core.pipeline import fine_stage

    ckpt = Path(args.checkpoint)
    _, ck_params = load_field(ckpt, "cpu")  # validates the checkpoint (InputError when it is not one)
    params = refine_params(ck_params, args.preset, args.overrides, args.params)
    given = getattr(args, "image", None)
    image = Path(given) if given else ckpt.parent / "reference_rgba.png"
    if not image.is_file():
        raise InputError(f"no reference image: {image} is missing (give one with --image)")
    out = Path(args.out)
    # the coarse folder's reference_rgba.png is already centred and scaled: used as it is
    fine_stage(ckpt, out, params, image, getattr(args, "depth", None), resume=not getattr(args, "fresh", False),
               recenter=bool(given) and params.segment.recenter)
    print(f"fine stage done: {out / 'result.json'} (mesh.obj, mesh.glb, turntable.gif)")
    return 0
