"""Task: tables, plots, a gallery and summary.json from the metrics under a results folder
(core.evaluation.report)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from prefect import task


@task(name="report")
def report_task(results: str, out: str, runs: Optional[list[str]] = None,
                failures: Optional[list[dict]] = None) -> dict:
    from core.evaluation.report import write_report

    return write_report(Path(results), Path(out), runs=runs, failures=failures or ())
