"""Task: tables, plots and a gallery from the metrics under a results folder (core.evaluation.report)."""
from __future__ import annotations

from pathlib import Path

from prefect import task


@task(name="report")
def report_task(results: str, out: str) -> dict:
    from core.evaluation.report import write_report

    return write_report(Path(results), Path(out))
