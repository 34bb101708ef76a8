"""The `benchmark` flow: every object of a dataset folder through the pipeline, then a report.

A dataset is a folder of object folders, each with `rgba.png` (and optionally the authors'
`depth.png` and `learned_embeds.bin`, used as is). With `gpus=N` (or a Dask scheduler address) the
tasks run on Dask workers, one per GPU with dask-cuda, so N assets run at once; otherwise they run
one after another in this process. One failed asset does not sink the benchmark: it is recorded with
its one-line reason (report.md, summary.json) while the others finish. The per-asset table and the
report are also Prefect artifacts (table, markdown) and the table is on the MLflow parent run.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

from prefect import flow
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner

from core.errors import InputError
from core.params import Params, load_params
from flows.failures import first_failure
from flows.generate import submit_asset
from tasks.artifacts import publish_markdown, publish_table
from tasks.common import clear_marker
from tasks.report import report_task
from tasks.tracking import end_parent_run, start_parent_run

log = logging.getLogger(__name__)


def discover(dataset: Path, limit: Optional[int] = None) -> list[Path]:
    """Object folders (those holding rgba.png) of a dataset, sorted by name."""
    if not dataset.is_dir():
        raise InputError(f"dataset folder not found: {dataset}")
    objects = sorted(p for p in dataset.iterdir() if (p / "rgba.png").is_file())
    if not objects:
        raise InputError(f"no object folders with rgba.png in {dataset}")
    return objects[:limit] if limit else objects


def describe(name: str) -> str:
    """A plain description from a folder name ('teddy_bear' → 'a teddy bear'), for Consistent123's y."""
    return "a " + name.replace("_", " ").replace("-", " ")


def per_asset_rows(per_asset_csv: Optional[str], failures: list[dict]) -> list[dict]:
    """The report's per-asset table (status ok) and the failed assets (status failed, step, reason)."""
    rows: list[dict] = []
    if per_asset_csv and Path(per_asset_csv).is_file():
        import pandas as pd

        rows = [{"status": "ok", **r} for r in pd.read_csv(per_asset_csv).to_dict("records")]
    return rows + [{"status": "failed", **f} for f in failures]


def publish_benchmark(name: str, rows: list[dict], report_md: Optional[str]) -> None:
    """The per-asset table and the report as Prefect artifacts of this flow run."""
    publish_table(f"benchmark-{name}", rows, f"benchmark {name}: one row per asset")
    if report_md and Path(report_md).is_file():
        publish_markdown(f"benchmark-{name}-report", Path(report_md).read_text(), f"benchmark {name}: report.md")


def _summary_line(failures) -> str:
    return f"{len(failures)} asset(s) failed: " + ", ".join(f"{f.asset} ({f.step})" for f in failures)


# In-process default: one task at a time. Model loading (transformers' meta-device init) is not
# thread-safe, and a CPU gains nothing from running two assets at once; scale-out is Dask's job.
@flow(name="benchmark", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def benchmark_flow(dataset: str, out: str, params: Params, limit: Optional[int] = None,
                   preset: Optional[str] = None, report: Optional[str] = None,
                   step_timeout: Optional[float] = None):
    """Every object of `dataset` into OUT/<dataset>/<object>, then the report of those objects into
    `report` (default OUT/<dataset>/report): report.md, per_asset.csv, summary.json, plots.

    An asset whose step fails is recorded (asset, step, one-line reason) while the others finish;
    coarse and fine steps are retried once first, from their checkpoints (tasks/). Returns
    {assets, failures, summary, means, report}; with failures, the flow run ends Failed with that
    result as its data (`return_state=True` to read it). `preset`: the name `params` came from, for
    the records. `step_timeout`: seconds per attempt of a coarse or fine stage."""
    ds, out_p = Path(dataset), Path(out)
    runs = out_p / ds.name
    objects = discover(ds, limit)
    parent = start_parent_run(params.to_dict(), f"benchmark/{ds.name}/{preset}",
                              tags={"dataset": ds.name, "preset": str(preset)})
    chains, means, failures, rows = {}, None, [], None
    try:
        for obj in objects:
            p = params
            if params.prompt.text is None and params.method == "consistent123":
                p = params.with_inputs(text=describe(obj.name))
            depth = obj / "depth.png"
            embeds = obj / "learned_embeds.bin"
            use_embeds = embeds.is_file() and p.prompt.text is None and p.method == "magic123"
            chains[obj.name] = submit_asset(obj / "rgba.png", runs / obj.name, p,
                                            depth if depth.is_file() else None,
                                            embeds if use_embeds else None, asset=obj.name, dataset=ds.name,
                                            parent_run_id=parent, step_timeout=step_timeout)
        metrics = {}
        for name, chain in chains.items():
            failed = first_failure(name, chain)
            if failed is None:
                metrics[name] = chain["evaluate"].result()
                continue
            log.error("benchmark: %s failed at %s: %s", name, failed.step, failed.reason)
            clear_marker(runs / name, "metrics.json")  # an earlier run's metrics are not this run's
            failures.append(failed)
        written = report_task(str(runs), str(Path(report) if report else runs / "report"),
                              runs=[str(runs / name) for name in metrics],
                              failures=[f.record() for f in failures])
        summary = json.loads(Path(written["summary"]).read_text())
        means = {k: v for k, v in summary.items() if k.startswith("mean_")}
        rows = per_asset_rows(written.get("per_asset"), summary["failures"])
        publish_benchmark(f"{ds.name}-{preset}", rows, written.get("report"))
        result = {"assets": metrics, "failures": summary["failures"], "summary": summary, "means": means,
                  "report": written}
        if failures:
            return Failed(message=_summary_line(failures), data=result)
        return result
    finally:
        end_parent_run(params.to_dict(), parent, means, "FINISHED" if means is not None and not failures else "FAILED",
                       table=rows)


def worker_env(workers: int) -> dict[str, str]:
    """PyTorch threads for each of `workers` local worker processes: the machine's cores shared out
    (core.params.env_threads reads it). Without it each process took every core (2 workers on 2
    cores: 6.5 s per smoke coarse iteration, against 1.2 s for one process alone)."""
    import os

    n = str(max(1, (os.cpu_count() or 1) // max(1, workers)))
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}


def gpu_worker_specs(gpus: int, per_gpu: int) -> dict[str, dict]:
    """distributed.SpecCluster's worker specs for `per_gpu` worker processes on each of `gpus` GPUs:
    worker i sees GPU i mod `gpus` alone (CUDA_VISIBLE_DEVICES, so each process's cuda:0 is its GPU),
    one thread each, and the cores shared out among all of them (worker_env). The first `gpus`
    workers cover every GPU once, so a short queue still spreads over the GPUs."""
    n = gpus * per_gpu
    return {f"gpu{i % gpus}-{i // gpus}": {"cls": "distributed.Nanny",
                                          "options": {"nthreads": 1,
                                                      "env": {**worker_env(n), "CUDA_VISIBLE_DEVICES": str(i % gpus)}}}
            for i in range(n)}


def task_runner(gpus: Optional[int], scheduler: Optional[str], workers: Optional[int] = None, per_gpu: int = 1):
    """Dask for scale-out: an existing scheduler (`--scheduler ADDRESS`, any number of hosts), one
    dask-cuda worker per GPU (`--gpus N`), `per_gpu` worker processes on each GPU (`--gpus N
    --per-gpu K`: a distributed.SpecCluster, gpu_worker_specs), or N local worker processes
    (`--workers N`, CPU), each running one step at a time on its share of the cores (worker_env);
    else in-process, one step at a time. A worker started by Dask's nanny without worker_env
    (dask-cuda's, or `dask worker` on another host) has OMP_NUM_THREADS=1, so its PyTorch CPU work runs
    on one thread. Each worker keeps the priors it loaded for the next asset it runs (core.models.cache).

    Several workers on one GPU overlap one worker's compiling, exports and prior loads (host work) with
    another's loops: two short assets (coarse 300 + fine 200) on one H200 at once took 116 s against
    90 s each alone (session 27), two cold paper-length assets 954 s against 624 s (session 28). The
    loops themselves gain ~nothing: one worker keeps an H200 85–94% busy in them, and a pair did
    1.02–1.03× its steady iterations (session 28). Each worker holds its own priors (~9–12 GiB at the
    peak of a stage), so the default stays one worker a GPU."""
    if per_gpu < 1:
        raise InputError(f"--per-gpu {per_gpu}: at least 1")
    if per_gpu > 1 and not gpus:
        raise InputError("--per-gpu K needs --gpus N (K worker processes on each of N GPUs)")
    if scheduler or gpus or workers:
        from prefect_dask import DaskTaskRunner

        if scheduler:
            return DaskTaskRunner(address=scheduler)
        if workers and not gpus:
            return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                                  cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                                  "dashboard_address": ":0", "env": worker_env(workers)})
        if per_gpu > 1:
            return DaskTaskRunner(cluster_class="distributed.SpecCluster",
                                  cluster_kwargs={"workers": gpu_worker_specs(gpus, per_gpu),
                                                  "scheduler": {"cls": "distributed.Scheduler",
                                                                "options": {"dashboard_address": ":0"}}})
        try:
            import dask_cuda  # noqa: F401
        except ImportError:
            raise InputError("--gpus needs dask-cuda: pip install -e '.[gpu]' on a machine with GPUs") from None
        return DaskTaskRunner(cluster_class="dask_cuda.LocalCUDACluster",
                              cluster_kwargs={"n_workers": gpus, "threads_per_worker": 1})
    return ThreadPoolTaskRunner(max_workers=1)


def cli_benchmark(args) -> int:
    """Exit 0 when every asset finished; 1 when some failed, with one line per failed asset."""
    discover(args.dataset, args.limit)  # fail on a bad dataset before Prefect starts
    # and on bad scale-out options (the runner starts its cluster only when the flow runs)
    runner = task_runner(args.gpus, args.scheduler, getattr(args, "workers", None), getattr(args, "per_gpu", 1))
    from flows.server import start_reaped_ephemeral_server

    start_reaped_ephemeral_server()  # a killed run leaves no Prefect server behind
    params = load_params(args.preset, args.overrides, args.params)
    state = benchmark_flow.with_options(task_runner=runner)(
        str(args.dataset), str(args.out), params, args.limit, args.preset,
        str(args.report) if args.report else None, args.step_timeout or None, return_state=True)
    result = state.result(raise_on_failure=False)
    if isinstance(result, BaseException):  # the flow itself failed (not one asset): its error
        raise result
    print(json.dumps(result["means"], indent=2))
    print(f"report: {result['report'].get('report')}  summary: {result['report'].get('summary')}")
    for f in result["failures"]:
        print(f"lift3d: error: {f['asset']}: {f['step']} failed: {f['reason']}", file=sys.stderr)
    return 1 if result["failures"] else 0
