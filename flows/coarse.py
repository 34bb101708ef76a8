"""`lift3d coarse IMAGE [--depth D] --out DIR`: the coarse stage on one image (Magic123 §2.1.1).

Inputs are validated before DIR is created, so a bad input leaves nothing behind. Guidance comes
from params.guidance.kind: 'oracle' (params.guidance.oracle_object), 'none' (reference-view
losses only), or the priors through core.guidance.factory.build_guidance when it is installed;
without the factory the run falls back to 'none' and says so. Resumes from DIR/checkpoint.pt
unless --fresh.
"""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def build_coarse_guidance(params, reference, device):
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
    try:
        from core.guidance.factory import build_guidance
    except ImportError:
        log.warning("guidance '%s': core.guidance.factory is not available; running with reference-view "
                    "losses only (guidance 'none')", kind)
        return None
    return build_guidance(params, reference, "coarse", device)


def build_coarse_detector(params, reference, device):
    """Consistent123's stage detector when enabled and installed (core.detector.build_detector)."""
    if not params.detector.enabled:
        return None
    try:
        from core.detector import build_detector
    except ImportError:
        log.warning("detector enabled but core.detector.build_detector is not available: no stage detection")
        return None
    return build_detector(params, reference, device)


def cli_coarse(args) -> int:
    from core.coarse import run_coarse
    from core.images import load_reference
    from core.params import load_params, resolve_device

    params = load_params(args.preset, args.overrides, args.params)
    if getattr(args, "text", None):
        params.prompt.text = args.text
    if getattr(args, "embeds", None):
        params.prompt.learned_embeds = str(args.embeds)
    # validate every input before anything is written
    reference = load_reference(args.image, args.depth, size=params.coarse.resolution,
                               max_pixels=params.segment.max_input_pixels, object_scale=params.segment.object_scale)
    if getattr(args, "embeds", None) and not Path(args.embeds).is_file():
        from core.errors import InputError

        raise InputError(f"embeddings file not found: {args.embeds}")
    device = resolve_device(params)
    guidance = build_coarse_guidance(params, reference, device)
    detector = build_coarse_detector(params, reference, device)
    out = Path(args.out)
    run_coarse(params, reference, out, guidance=guidance, detector=detector, device=device,
               resume=not getattr(args, "fresh", False))
    print(f"coarse stage done: {out / 'result.json'}")
    return 0
