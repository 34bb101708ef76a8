"""Task: learn the token <e> for the reference image (core.pipeline.textual_inversion_stage)."""
from __future__ import annotations

from pathlib import Path

from prefect import task

from tasks.caching import StepCachePolicy
from tasks.common import TI_SECTIONS, as_params


@task(name="textual-inversion", persist_result=True,
      cache_policy=StepCachePolicy(("core.pipeline",), TI_SECTIONS, ("rgba",), ("out_dir",)))
def textual_inversion_task(rgba: str, out_dir: str, params: dict) -> str:
    from core.pipeline import textual_inversion_stage

    return str(textual_inversion_stage(Path(rgba), Path(out_dir), as_params(params)))
