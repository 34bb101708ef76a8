"""`lift3d refine COARSE_CHECKPOINT --out DIR`: the fine stage (Magic123 §2.1.2) from a coarse run.

It continues the coarse run: the parameters stored in its checkpoint (so a smoke coarse run
refines as smoke) — or `--preset` when given — then `--set` overrides; the same token embedding
for the 2D prior; Consistent123's prior clock and stage-2 switch. The reference view: `--image`
(and `--depth`) when given, else the coarse folder's reference_rgba.png. Resumes from
DIR/checkpoint.pt unless --fresh. Writes the textured mesh (OBJ+MTL+PNG, GLB), turntable.gif,
renders/ and result.json.
"""
from __future__ import annotations

from pathlib import Path


def refine_params(checkpoint_params, preset, overrides, params_file=None):
    """The coarse run's parameters, or a preset's when one is named; then the overrides."""
    from core.params import apply_overrides, load_params

    if preset:
        return load_params(preset, overrides, params_file)
    return apply_overrides(checkpoint_params, overrides)


def cli_refine(args) -> int:
    from core.errors import InputError
    from core.params import Params
    from core.pipeline import fine_stage
    from core.stages.engine import read_state

    ckpt = Path(args.checkpoint)
    coarse = read_state(ckpt, "coarse")  # one line (InputError) when it is not a coarse checkpoint
    params = refine_params(Params.model_validate(coarse.params), args.preset, args.overrides, args.params)
    if args.image is not None and not Path(args.image).is_file():
        raise InputError(f"reference image not found: {args.image}")
    if args.image is None and not (ckpt.parent / "reference_rgba.png").is_file():
        raise InputError(f"no reference image: {ckpt.parent / 'reference_rgba.png'} is missing (give one with --image)")
    out = Path(args.out)
    fine_stage(ckpt, out, params, args.image, args.depth, resume=not args.fresh)
    print(f"fine stage done: {out / 'result.json'} (mesh.obj, mesh.glb, turntable.gif)")
    return 0
