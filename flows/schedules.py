"""Scheduled benchmarks: serve the benchmark flow on a cron schedule.

`lift3d schedule DATASET --cron "0 2 * * *" --preset magic123` registers a deployment of the
benchmark flow and serves it from this process (Ctrl-C stops it). Schedules live in a Prefect
server, so point PREFECT_API_URL at one (`prefect server start`) before serving.
"""
from __future__ import annotations

from typing import Optional

from flows.benchmark import benchmark_flow


def benchmark_deployment(dataset: str, out: str, cron: str, preset: str = "magic123",
                         overrides: Optional[list[str]] = None, limit: int = 0, name: Optional[str] = None):
    """A deployment of the benchmark flow with a cron schedule (not yet registered)."""
    from pathlib import Path

    return benchmark_flow.to_deployment(
        name=name or f"{Path(dataset).name}-{preset}", cron=cron,
        parameters={"dataset": dataset, "out": out, "preset": preset, "overrides": list(overrides or []),
                    "limit": limit})


def cli_schedule(args) -> int:
    import os

    from prefect import serve

    from core.params import load_params
    from flows.benchmark import discover

    discover(args.dataset, args.limit)
    load_params(args.preset, args.overrides, args.params)
    if not os.environ.get("PREFECT_API_URL"):
        from core.errors import Lift3DError

        raise Lift3DError("schedules need a Prefect server: run `prefect server start` and set PREFECT_API_URL")
    serve(benchmark_deployment(str(args.dataset), str(args.out), args.cron, args.preset, list(args.overrides),
                               args.limit))
    return 0
