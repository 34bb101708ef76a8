"""`lift3d prepare IMAGE --out DIR` → DIR/rgba.png, DIR/mask.png, DIR/depth.png (core.inputs.prepare).

The depth map: `--depth FILE` is used as is; otherwise a depth.png beside IMAGE (the benchmark
folders' layout) is used as is when params.depth.use_sibling is on (the default); otherwise DPT
estimates it. The smoke preset (models.tiny) segments and estimates depth with the tiny judges.
"""
from __future__ import annotations

import json
import logging

log = logging.getLogger(__name__)


def cli_prepare(args) -> int:
    from core.params import load_params, resolve_device
    from core.inputs.prepare import prepare_inputs

    params = load_params(args.preset, args.overrides, args.params)
    record = prepare_inputs(args.image, args.out, params, depth=args.depth, device=resolve_device(params))
    print(json.dumps({k: record[k] for k in ("size", "alpha", "depth", "seconds")}))
    print(f"wrote {args.out}/rgba.png, mask.png, depth.png")
    return 0
