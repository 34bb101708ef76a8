"""Task: segment the photo and estimate the reference depth (core.inputs.prepare)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from prefect import task

from tasks.caching import StepCachePolicy
from tasks.common import PREPARE_SECTIONS, as_params


@task(name="prepare", retries=1, persist_result=True,
      cache_policy=StepCachePolicy(("core.inputs.prepare",), PREPARE_SECTIONS, ("image", "depth"), ("out_dir",)))
def prepare_task(image: str, out_dir: str, params: dict, depth: Optional[str] = None) -> str:
    from core.inputs.prepare import prepare_inputs
    from core.params import resolve_device

    p = as_params(params)
    prepare_inputs(Path(image), Path(out_dir), p, depth=Path(depth) if depth else None, device=resolve_device(p))
    return out_dir
