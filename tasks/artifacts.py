"""Prefect artifacts of the pipeline: the per-asset tables and reports as table and markdown
artifacts, and progress artifacts for the long steps (a stage's iterations, a batch's assets).

core/ knows nothing of this: a stage reports its iterations through its `callback(step, metrics)`,
and `progress_callback` is such a callback. An artifact that cannot be written (no API, a key Prefect
rejects) is logged and skipped: it never fails a step.
"""
from __future__ import annotations

import logging
import math
import re
import time
from typing import Any, Callable, Iterable, Optional

log = logging.getLogger(__name__)


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes) from free text."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(p for p in parts if p).lower()).strip("-")[:100] or "lift3d"


def _plain(v: Any) -> Any:
    """JSON-safe cell: NaN and infinities become None, numpy scalars plain numbers."""
    if hasattr(v, "item") and not isinstance(v, (list, dict, str)):
        try:
            v = v.item()
        except (TypeError, ValueError):
            pass
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def publish_table(key: str, rows: Iterable[dict], description: str = "") -> Optional[str]:
    """A table artifact of `rows` (one dict per asset); returns its id, None when it could not be written."""
    try:
        from prefect.artifacts import create_table_artifact

        table = [{k: _plain(v) for k, v in r.items()} for r in rows]
        return str(create_table_artifact(table=table, key=artifact_key(key), description=description))
    except Exception as e:  # noqa: BLE001 - an artifact is a view, never a reason to fail
        log.warning("could not write the table artifact %s: %s", key, e)
        return None


def publish_markdown(key: str, markdown: str, description: str = "") -> Optional[str]:
    try:
        from prefect.artifacts import create_markdown_artifact

        return str(create_markdown_artifact(markdown=markdown, key=artifact_key(key), description=description))
    except Exception as e:  # noqa: BLE001
        log.warning("could not write the markdown artifact %s: %s", key, e)
        return None


class Progress:
    """A progress artifact (0–100 %) updated at most every `min_interval` seconds, and always at the end."""

    def __init__(self, total: int, description: str, key: Optional[str] = None, min_interval: float = 2.0):
        self.total, self.description, self.min_interval = max(1, int(total)), description, min_interval
        self._last, self._id = 0.0, None
        try:
            from prefect.artifacts import create_progress_artifact

            self._id = create_progress_artifact(0.0, key=artifact_key(key) if key else None, description=description)
        except Exception as e:  # noqa: BLE001
            log.warning("could not create the progress artifact (%s): %s", description, e)

    def update(self, done: int, force: bool = False) -> None:
        if self._id is None:
            return
        now = time.monotonic()
        if not force and done < self.total and now - self._last < self.min_interval:
            return
        self._last = now
        try:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self._id, min(100.0, 100.0 * done / self.total))
        except Exception as e:  # noqa: BLE001
            log.warning("could not update the progress artifact (%s): %s", self.description, e)
            self._id = None


def progress_callback(total: int, description: str, min_interval: float = 2.0) -> Callable[[int, dict], None]:
    """A stage callback (step, metrics) that keeps a progress artifact of `total` iterations."""
    progress = Progress(total, description, min_interval=min_interval)
    return lambda step, metrics: progress.update(step + 1)


def chain_callbacks(*callbacks: Optional[Callable[[int, dict], None]]) -> Optional[Callable[[int, dict], None]]:
    """One stage callback that calls each given one in order (None when none is given)."""
    given = [c for c in callbacks if c is not None]
    if not given:
        return None
    if len(given) == 1:
        return given[0]

    def call(step: int, metrics: dict) -> None:
        for c in given:
            c(step, metrics)

    return call
