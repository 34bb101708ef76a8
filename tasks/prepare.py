"""Task: segment the photo and estimate the reference depth (core.inputs.prepare)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from prefect import task

from core.params import STEP_READS, Params
from tasks.caching import StepCachePolicy
from tasks.common import marked_on_success, recorded_step, transient


@task(name="prepare", retries=1, retry_condition_fn=transient, persist_result=True,
      cache_policy=StepCachePolicy(("core.inputs.prepare",), STEP_READS["prepare"], ("image", "depth"), ("out_dir",)))
def prepare_task(image: str, out_dir: str, params: Params, depth: Optional[str] = None) -> str:
    from core.inputs.prepare import prepare_inputs
    from core.params import resolve_device

    with recorded_step(Path(out_dir).parent, "prepare"), marked_on_success(out_dir, "prepare.json"):
        prepare_inputs(Path(image), Path(out_dir), params, depth=Path(depth) if depth else None,
                       device=resolve_device(params))
    return out_dir
