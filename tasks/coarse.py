"""Task: the coarse NeRF stage, logged to MLflow as one run of this asset.

A failed attempt is retried once (not for the user's errors: tasks.common.transient); the retry
resumes from the stage's last checkpoint in out_dir. `timeout`: seconds per attempt, checked between
iterations (tasks.common.with_deadline)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from prefect import task

from core.params import STEP_READS, Params
from tasks.caching import StepCachePolicy
from tasks.artifacts import chain_callbacks, progress_callback
from tasks.common import marked_on_success, recorded_step, transient, with_deadline
from tasks.tracking import stage_run


@task(name="coarse", retries=1, retry_condition_fn=transient, persist_result=True,
      cache_policy=StepCachePolicy(("core.pipeline", "core.stages.coarse"), STEP_READS["coarse"],
                                   ("image", "depth", "params.prompt.learned_embeds"), ("out_dir",)))
def coarse_task(image: str, out_dir: str, params: Params, depth: Optional[str] = None,
                asset: str = "asset", parent_run_id: Optional[str] = None, timeout: Optional[float] = None) -> str:
    from core.pipeline import coarse_stage, will_resume

    with recorded_step(Path(out_dir).parent, "coarse"), marked_on_success(out_dir, "result.json"), stage_run(
            params.to_dict(), asset, "coarse", parent_run_id, out_dir=out_dir,
            resuming=will_resume(out_dir, "coarse", params)) as run:
        result = coarse_stage(Path(image), Path(out_dir), params, depth=Path(depth) if depth else None,
                              callback=with_deadline(timeout, chain_callbacks(
                                  run.log_step if run else None,
                                  progress_callback(params.coarse.iters, f"{asset}: coarse stage iterations"))))
        if run:
            run.log_metrics({k: v for k, v in result.items() if isinstance(v, (int, float))})
            for name in ("mesh.obj", "renders", "detector.json"):
                run.log_artifacts(Path(out_dir) / name)
    return out_dir
