"""`lift3d coarse IMAGE [--depth D] --out DIR`: the coarse stage on one image (Magic123 §2.1.1).

Inputs are validated before DIR is created, so a bad input leaves nothing behind. The stage is
core.pipeline.coarse_stage, the same composition the Prefect task runs: guidance from
params.guidance.kind ('joint', 'dynamic', 'oracle' or 'none'), Consistent123's detector when
params.detector.enabled. Resumes from DIR/checkpoint.pt unless --fresh.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def cli_coarse(args) -> int:
    from core.errors import InputError
    from core.params import load_params
    from core.pipeline import coarse_stage

    overrides = list(args.overrides)
    if getattr(args, "text", None):
        overrides.append(f"prompt.text={json.dumps(args.text)}")
    if getattr(args, "embeds", None):
        if not Path(args.embeds).is_file():
            raise InputError(f"embeddings file not found: {args.embeds}")
        overrides.append(f"prompt.learned_embeds={json.dumps(str(args.embeds))}")
    params = load_params(args.preset, overrides, args.params)
    out = Path(args.out)
    coarse_stage(args.image, out, params, depth=args.depth, resume=not getattr(args, "fresh", False))
    print(f"coarse stage done: {out / 'result.json'}")
    return 0
