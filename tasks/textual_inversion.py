"""Task: learn the token <e> for the reference image (core.pipeline.textual_inversion_stage)."""
from __future__ import annotations

from pathlib import Path

from prefect import task

from core.params import STEP_READS, Params
from tasks.caching import StepCachePolicy
from tasks.common import marked_on_success, recorded_step


@task(name="textual-inversion", persist_result=True,
      cache_policy=StepCachePolicy(("core.pipeline",), STEP_READS["textual_inversion"], ("rgba",), ("out_dir",)))
def textual_inversion_task(rgba: str, out_dir: str, params: Params) -> str:
    from core.pipeline import textual_inversion_stage

    with recorded_step(Path(out_dir).parent, "textual_inversion"), marked_on_success(out_dir, "learned_embeds.bin"):
        return str(textual_inversion_stage(Path(rgba), Path(out_dir), params))
