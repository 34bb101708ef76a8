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
    from core.params import ParamsError, Params, _format_errors, _set_dotted, load_params, parse_override

    if preset:
        return load_params(preset, overrides, params_file)
    tree = checkpoint_params.to_dict()
    for o in overrides or []:
        key, value = parse_override(o)
        _set_dotted(tree, key, value)
    from pydantic import ValidationError

    try:
        return Params.model_validate(tree)
    except ValidationError as e:
        raise ParamsError(_format_errors(e)) from None


def build_fine_guidance(params, reference, device):
    kind = params.guidance.kind
    if kind == "none":
        return None
    if kind == "oracle":
        from core.errors import Lift3DError
        from core.guidance.oracle import OracleGuidance

        if not params.guidance.oracle_object:
            raise Lift3DError("guidance.kind is 'oracle' but guidance.oracle_object is not set "
                              "(e.g. --set guidance.oracle_object=torus)")
        return OracleGuidance(params.guidance.oracle_object, params)
    from core.guidance.factory import build_guidance

    return build_guidance(params, reference, "fine", device)


def cli_refine(args) -> int:
    from core.errors import InputError
    from core.fine import run_fine
    from core.images import load_reference
    from core.nerf import load_field
    from core.params import resolve_device

    ckpt = Path(args.checkpoint)
    field, ck_params = load_field(ckpt, "cpu")  # validates the checkpoint (InputError when it is not one)
    params = refine_params(ck_params, args.preset, args.overrides, args.params)
    given = getattr(args, "image", None)
    image = Path(given) if given else ckpt.parent / "reference_rgba.png"
    if not image.is_file():
        raise InputError(f"no reference image: {image} is missing (give one with --image)")
    # the coarse folder's reference_rgba.png is already centred and scaled: used as it is
    reference = load_reference(image, getattr(args, "depth", None), size=params.fine.resolution,
                               max_pixels=params.segment.max_input_pixels, object_scale=params.segment.object_scale,
                               recenter=bool(given) and params.segment.recenter)
    device = resolve_device(params)
    guidance = build_fine_guidance(params, reference, device)
    out = Path(args.out)
    run_fine(params, reference, field, out, guidance=guidance, device=device,
             resume=not getattr(args, "fresh", False), coarse_checkpoint=str(ckpt))
    print(f"fine stage done: {out / 'result.json'} (mesh.obj, mesh.glb, turntable.gif)")
    return 0
