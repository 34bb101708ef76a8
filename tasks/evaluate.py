"""Task: PSNR / LPIPS at the reference view, CLIP similarity of novel views (core.evaluation.evaluate)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from prefect import task

from core.params import STEP_READS, Params
from tasks.caching import StepCachePolicy
from tasks.common import marked_on_success, recorded_step
from tasks.tracking import stage_run


@task(name="evaluate", persist_result=True,
      cache_policy=StepCachePolicy(("core.evaluation.evaluate",), STEP_READS["evaluate"], ("stage_dir",),
                                   ("run_dir", "dataset", "asset")))
def evaluate_task(run_dir: str, stage_dir: str, params: Params, dataset: Optional[str] = None,
                  asset: Optional[str] = None, parent_run_id: Optional[str] = None) -> dict:
    """`stage_dir` is the folder evaluated (its contents are the cache key); `run_dir` gets metrics.json."""
    from core.evaluation.evaluate import evaluate_run
    from core.params import resolve_device

    with recorded_step(run_dir, "evaluate"), marked_on_success(run_dir, "metrics.json"), stage_run(
            params.to_dict(), asset or Path(run_dir).name, "evaluate", parent_run_id) as run:
        metrics = evaluate_run(Path(run_dir), params, resolve_device(params), dataset=dataset, asset=asset)
        if run:
            run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            run.log_artifacts(Path(run_dir) / "metrics.json")
    return json.loads(json.dumps(metrics, default=str))
