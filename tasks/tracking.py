"""MLflow bookkeeping for the tasks: one run per asset and stage, nested under a benchmark run.

Runs are created with explicit parent ids (the `mlflow.parentRunId` tag), so nesting works from any
process or Dask worker, not only inside an active parent run. The default store is a local SQLite
database (params.tracking.mlflow_uri); any tracking URI works (several hosts: a tracking server, or a
SQLite file on a shared path that one host writes at a time; README "Many photos, many GPUs").

Every run carries the git commit of the code (`mlflow.source.git.commit`, and `git_dirty`) and,
with params.tracking.system_metrics, MLflow's system metrics sampled while it runs (CPU, memory,
disk, network; GPU use and memory where pynvml imports: the `gpu` extra). The benchmark's parent
run gets the per-asset table (`per_asset.json`, mlflow.log_table).
"""
from __future__ import annotations

import json
import logging
import math
from contextlib import contextmanager
from functools import lru_cache
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


REPO = Path(__file__).resolve().parent.parent


@lru_cache(maxsize=1)
def git_tags() -> dict[str, str]:
    """{'mlflow.source.git.commit': sha, 'git_dirty': 'true'|'false'} of this checkout ({} outside git)."""
    import subprocess

    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"mlflow.source.git.commit": sha, "git_dirty": "true" if dirty else "false"} if sha else {}


class SystemMetrics:
    """MLflow's system-metrics sampler on one run (mlflow.system_metrics), while it is open."""

    def __init__(self, params: dict, run_id: str):
        self.monitor = None
        tracking = params.get("tracking", {})
        if not tracking.get("system_metrics", True):
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(run_id, sampling_interval=float(tracking.get("system_metrics_interval", 10)),
                                                tracking_uri=tracking["mlflow_uri"])
            self.monitor.start()
        except Exception as e:  # noqa: BLE001 - metrics of the machine are a bonus, never a failure
            log.warning("MLflow system metrics are off for run %s: %s", run_id, e)
            self.monitor = None

    def finish(self) -> None:
        if self.monitor is not None:
            try:
                self.monitor.finish()
            except Exception as e:  # noqa: BLE001
                log.warning("MLflow system metrics: %s", e)
            self.monitor = None


_PARENT_MONITORS: dict[str, SystemMetrics] = {}


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


RUN_MARKER = ".mlflow_run.json"  # in a stage folder: the MLflow run of the stage run that wrote it


def _earlier_run(client, out_dir: Optional[Path]) -> Optional[str]:
    """The run id an interrupted run of this stage folder left RUNNING (killed before it could end)."""
    marker = Path(out_dir) / RUN_MARKER if out_dir else None
    if marker is None or not marker.is_file():
        return None
    try:
        run_id = json.loads(marker.read_text())["run_id"]
        return run_id if client.get_run(run_id).info.status == "RUNNING" else None
    except Exception:  # noqa: BLE001 - another store, a deleted run: nothing to continue
        return None


@contextmanager
def stage_run(params: dict, name: str, stage: str, parent_run_id: Optional[str] = None,
              tags: Optional[dict] = None, out_dir: Optional[Path | str] = None,
              resuming: bool = False) -> Iterator[Optional[StageRun]]:
    """An MLflow run for one asset and stage (yields None when tracking is off).

    With `out_dir`, the run's id is kept in out_dir/.mlflow_run.json. A run that a killed process
    left RUNNING there is continued when the stage resumes from its checkpoint (`resuming`), so the
    history stays in one run; otherwise it is ended FAILED and a new run starts."""
    if not params.get("tracking", {}).get("enabled", True):
        yield None
        return
    client, exp_id = _client(params)
    earlier = _earlier_run(client, Path(out_dir) if out_dir else None)
    if earlier and resuming:
        run_id = earlier
        log.info("MLflow: continuing the interrupted run %s of %s/%s", run_id, name, stage)
    else:
        if earlier:
            client.set_terminated(earlier, status="FAILED")
        all_tags = {"asset": name, "stage": stage, "mlflow.runName": f"{name}/{stage}", **git_tags(), **(tags or {})}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run_id = client.create_run(exp_id, tags=all_tags).info.run_id
        from mlflow.entities import Param

        flat = _flatten(params)
        client.log_batch(run_id, params=[Param(k, json.dumps(v) if not isinstance(v, str) else v)
                                         for k, v in sorted(flat.items())][:1000])
        if out_dir:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / RUN_MARKER).write_text(json.dumps({"run_id": run_id}))
    handle = StageRun(client, run_id)
    system = SystemMetrics(params, run_id)
    status = "FAILED"
    try:
        yield handle
        status = "FINISHED"
    finally:
        try:
            system.finish()
            handle.flush()
        finally:
            client.set_terminated(run_id, status=status)


def start_parent_run(params: dict, name: str, tags: Optional[dict] = None) -> Optional[str]:
    """A benchmark's parent run; returns its id (None when tracking is off)."""
    if not params.get("tracking", {}).get("enabled", True):
        return None
    client, exp_id = _client(params)
    run = client.create_run(exp_id, tags={"mlflow.runName": name, "kind": "benchmark", **git_tags(), **(tags or {})})
    _PARENT_MONITORS[run.info.run_id] = SystemMetrics(params, run.info.run_id)
    return run.info.run_id


def log_asset_table(params: dict, run_id: Optional[str], rows: list[dict], artifact_file: str = "per_asset.json") -> None:
    """The per-asset table (one dict per asset) on a run, as an MLflow table artifact."""
    if not run_id or not rows:
        return
    try:
        import mlflow
        import pandas as pd

        _client(params)  # sets the tracking URI
        mlflow.log_table(pd.DataFrame(rows), artifact_file, run_id=run_id)
    except Exception as e:  # noqa: BLE001 - the table is also in the report; a failed upload is no failure
        log.warning("MLflow: could not log %s on run %s: %s", artifact_file, run_id, e)


def end_parent_run(params: dict, run_id: Optional[str], metrics: Optional[dict] = None, status: str = "FINISHED",
                   table: Optional[list[dict]] = None) -> None:
    if not run_id:
        return
    monitor = _PARENT_MONITORS.pop(run_id, None)
    if monitor is not None:
        monitor.finish()
    client, _ = _client(params)
    if metrics:
        StageRun(client, run_id).log_metrics(metrics)
    if table:
        log_asset_table(params, run_id, table)
    client.set_terminated(run_id, status=status)
