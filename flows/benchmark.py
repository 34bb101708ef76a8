"""The `benchmark` flow: every object of a dataset folder through the pipeline, then a report.

A dataset is a folder of object folders, each with `rgba.png` (and optionally the authors'
`depth.png` and `learned_embeds.bin`, used as is). With `gpus=N` (or a Dask scheduler address) the
tasks run on Dask workers, one per GPU with dask-cuda, so N assets run at once; otherwise they run
one after another in this process.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from core.errors import InputError
from core.params import Params, load_params
from flows.generate import submit_asset
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


# In-process default: one task at a time. Model loading (transformers' meta-device init) is not
# thread-safe, and a CPU gains nothing from running two assets at once; scale-out is Dask's job.
@flow(name="benchmark", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def benchmark_flow(dataset: str, out: str, params: Params, limit: Optional[int] = None,
                   preset: Optional[str] = None) -> dict:
    """`preset`: the name `params` came from, for the records."""
    ds, out_p = Path(dataset), Path(out)
    objects = discover(ds, limit)
    parent = start_parent_run(params.to_dict(), f"benchmark/{ds.name}/{preset}",
                              tags={"dataset": ds.name, "preset": str(preset)})
    futures, status = {}, "FAILED"
    try:
        for obj in objects:
            p = params
            if params.prompt.text is None and params.method == "consistent123":
                p = params.with_inputs(text=describe(obj.name))
            depth = obj / "depth.png"
            embeds = obj / "learned_embeds.bin"
            use_embeds = embeds.is_file() and p.prompt.text is None and p.method == "magic123"
            futures[obj.name] = submit_asset(obj / "rgba.png", out_p / ds.name / obj.name, p,
                                             depth if depth.is_file() else None,
                                             embeds if use_embeds else None, asset=obj.name, dataset=ds.name,
                                             parent_run_id=parent)
        metrics = {name: f.result() for name, f in futures.items()}
        written = report_task(str(out_p), str(out_p / "report"))
        means = {}
        for key in ("psnr", "lpips", "clip_similarity"):
            vals = [m[key] for m in metrics.values() if isinstance(m.get(key), (int, float))]
            if vals:
                means[f"mean_{key}"] = sum(vals) / len(vals)
        status = "FINISHED"
        return {"assets": metrics, "means": means, "report": written}
    finally:
        end_parent_run(params.to_dict(), parent, means if status == "FINISHED" else None, status)


def task_runner(gpus: Optional[int], scheduler: Optional[str]):
    """Dask for scale-out (an existing scheduler, or one dask-cuda worker per GPU); else in-process."""
    if scheduler or gpus:
        from prefect_dask import DaskTaskRunner

        if scheduler:
            return DaskTaskRunner(address=scheduler)
        try:
            import dask_cuda  # noqa: F401
        except ImportError:
            raise InputError("--gpus needs dask-cuda (pip install dask-cuda) on a machine with GPUs") from None
        return DaskTaskRunner(cluster_class="dask_cuda.LocalCUDACluster",
                              cluster_kwargs={"n_workers": gpus, "threads_per_worker": 1})
    return ThreadPoolTaskRunner(max_workers=1)


def cli_benchmark(args) -> int:
    import json

    discover(args.dataset, args.limit)  # fail on a bad dataset before Prefect starts
    from flows.server import start_reaped_ephemeral_server

    start_reaped_ephemeral_server()  # a killed run leaves no Prefect server behind
    params = load_params(args.preset, args.overrides, args.params)
    runner = task_runner(args.gpus, args.scheduler)
    result = benchmark_flow.with_options(task_runner=runner)(
        str(args.dataset), str(args.out), params, args.limit, args.preset)
    print(json.dumps(result["means"], indent=2))
    print(f"report: {result['report'].get('report')}")
    return 0
