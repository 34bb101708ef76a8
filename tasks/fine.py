"""Task: the fine DMTet stage and the textured-mesh export, logged to MLflow."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from prefect import task

from tasks.caching import StepCachePolicy
from tasks.common import FINE_SECTIONS, as_params
from tasks.tracking import stage_run


@task(name="fine", persist_result=True,
      cache_policy=StepCachePolicy(("core.pipeline", "core.stages.fine"), FINE_SECTIONS,
                                   ("coarse_checkpoint", "image", "depth", "embeds"), ("out_dir",)))
def fine_task(coarse_checkpoint: str, out_dir: str, params: dict, image: str, depth: Optional[str] = None,
              embeds: Optional[str] = None, asset: str = "asset", parent_run_id: Optional[str] = None) -> str:
    from core.pipeline import fine_stage

    if embeds:
        params = {**params, "prompt": {**params["prompt"], "learned_embeds": embeds}}
    p = as_params(params)
    with stage_run(params, asset, "fine", parent_run_id) as run:
        result = fine_stage(Path(coarse_checkpoint), Path(out_dir), p, Path(image),
                            depth=Path(depth) if depth else None, callback=run.log_step if run else None)
        if run:
            run.log_metrics({k: v for k, v in result.items() if isinstance(v, (int, float))})
            for name in ("mesh.obj", "mesh.mtl", "texture.png", "mesh.glb", "turntable.gif", "renders"):
                run.log_artifacts(Path(out_dir) / name)
    return out_dir
