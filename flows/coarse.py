"""`lift3d coarse IMAGE [--depth D] --out DIR`: the coarse stage on one image (Magic123 §2.1.1).

Inputs are validated before DIR is created, so a bad input leaves nothing behind. The stage is
core.pipeline.coarse_stage, the same composition the Prefect task runs. Resumes from
DIR/checkpoint.pt (when it was made with the same parameters) unless --fresh.
"""
from __future__ import annotations

from pathlib import Path


def cli_coarse(args) -> int:
    from core.errors import InputError
    from core.params import load_params
    from core.pipeline import coarse_stage

    if args.embeds is not None and not Path(args.embeds).is_file():
        raise InputError(f"embeddings file not found: {args.embeds}")
    params = load_params(args.preset, args.overrides, args.params).with_inputs(
        text=args.text, learned_embeds=str(args.embeds) if args.embeds else None)
    out = Path(args.out)
    coarse_stage(args.image, out, params, depth=args.depth, resume=not args.fresh)
    print(f"coarse stage done: {out / 'result.json'}")
    return 0
