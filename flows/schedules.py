"""Scheduled benchmarks: serve the benchmark flow on a cron schedule.

`lift3d schedule DATASET --cron "0 2 * * *" --preset magic123` registers a deployment of the
benchmark flow and serves it from this process (Ctrl-C stops it). Schedules live in a Prefect
server, so point PREFECT_API_URL at one (`prefect server start`) before serving.
"""
from __future__ import annotations

from typing import Optional

from flows.benchmark import benchmark_flow


def benchmark_deployment(dataset: str, out: str, cron: str, params, preset: str = "magic123", limit: int = 0,
                         name: Optional[str] = None):
    """A deployment of the benchmark flow with a cron schedule (not yet registered); `params` is
    the validated Params, stored in the deployment as its JSON and validated again at each run.
    One run at a time: a tick that comes while the previous run still works on the same folders is
    cancelled (it would write into them too), not queued up behind it."""
    from pathlib import Path

    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    return benchmark_flow.to_deployment(
        name=name or f"{Path(dataset).name}-{preset}", cron=cron,
        parameters={"dataset": dataset, "out": out, "params": params.to_dict(), "limit": limit, "preset": preset},
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW))


def cli_schedule(args) -> int:
    import os

    from prefect import serve

    from core.params import load_params
    from flows.benchmark import discover

    discover(args.dataset, args.limit)
    params = load_params(args.preset, args.overrides, args.params)
    if not os.environ.get("PREFECT_API_URL"):
        from core.errors import Lift3DError

        raise Lift3DError("schedules need a Prefect server: run `prefect server start` and set PREFECT_API_URL")
    serve(benchmark_deployment(str(args.dataset), str(args.out), args.cron, params, args.preset, args.limit))
    return 0
