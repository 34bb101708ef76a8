"""`lift3d evaluate RUN_DIR` → RUN_DIR/metrics.json (psnr, lpips, clip_similarity; core.evaluation.evaluate),
and `lift3d report RESULTS --out reports/` (core.evaluation.report)."""
from __future__ import annotations

import json
import logging

log = logging.getLogger(__name__)


def cli_evaluate(args) -> int:
    from core.evaluation.evaluate import evaluate_run
    from core.params import load_params, resolve_device

    params = load_params(args.preset, args.overrides, args.params)
    metrics = evaluate_run(args.run_dir, params, resolve_device(params))
    print(json.dumps({k: metrics[k] for k in ("psnr", "lpips", "clip_similarity", "stage")}))
    print(f"wrote {args.run_dir}/metrics.json")
    return 0


def cli_report(args) -> int:
    from core.evaluation.report import write_report

    out = write_report(args.results, args.out)
    for k, v in out.items():
        print(f"{k}: {v}")
    return 0
