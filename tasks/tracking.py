"""MLflow bookkeeping for the tasks: one run per asset and stage, nested under a benchmark run.

Runs are created with explicit parent ids (the `mlflow.parentRunId` tag), so nesting works from any
process or Dask worker, not only inside an active parent run. The default store is a local SQLite
database (params.tracking.mlflow_uri); any tracking URI works.
"""
from __future__ import annotations

import json
import logging
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

log = logging.getLogger(__name__)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _client(params: dict):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = params["tracking"]["mlflow_uri"]
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    name = params["tracking"]["experiment"]
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else client.create_experiment(name)
    return client, exp_id


class StageRun:
    """A handle on one MLflow run: log step metrics as they come, final metrics and artifacts."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id
        self._buffer: list = []

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric
        import time

        ts = int(time.time() * 1000)
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(float(v)):
                self._buffer.append(Metric(k, float(v), ts, int(step)))
        if len(self._buffer) >= 500:
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            self.client.log_batch(self.run_id, metrics=self._buffer)
            self._buffer = []

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        self.log_step(0, {k: v for k, v in _flatten(metrics).items() if isinstance(v, (int, float))})
        self.flush()

    def log_artifacts(self, path: Path | str, artifact_path: Optional[str] = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path)


@contextmanager
def stage_run(params: dict, name: str, stage: str, parent_run_id: Optional[str] = None,
              tags: Optional[dict] = None) -> Iterator[Optional[StageRun]]:
    """An MLflow run for one asset and stage (yields None when tracking is off)."""
    if not params.get("tracking", {}).get("enabled", True):
        yield None
        return
    client, exp_id = _client(params)
    all_tags = {"asset": name, "stage": stage, "mlflow.runName": f"{name}/{stage}", **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, tags=all_tags)
    handle = StageRun(client, run.info.run_id)
    flat = _flatten(params)
    from mlflow.entities import Param

    client.log_batch(run.info.run_id, params=[Param(k, json.dumps(v) if not isinstance(v, str) else v)
                                               for k, v in sorted(flat.items())][:1000])
    status = "FAILED"
    try:
        yield handle
        status = "FINISHED"
    finally:
        try:
            handle.flush()
        finally:
            client.set_terminated(run.info.run_id, status=status)


def start_parent_run(params: dict, name: str, tags: Optional[dict] = None) -> Optional[str]:
    """A benchmark's parent run; returns its id (None when tracking is off)."""
    if not params.get("tracking", {}).get("enabled", True):
        return None
    client, exp_id = _client(params)
    run = client.create_run(exp_id, tags={"mlflow.runName": name, "kind": "benchmark", **(tags or {})})
    return run.info.run_id


def end_parent_run(params: dict, run_id: Optional[str], metrics: Optional[dict] = None, status: str = "FINISHED") -> None:
    if not run_id:
        return
    client, _ = _client(params)
    if metrics:
        StageRun(client, run_id).log_metrics(metrics)
    client.set_terminated(run_id, status=status)
