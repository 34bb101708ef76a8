"""What every task shares: the stale-output check, the step marker, the retry condition, the time limit."""
from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional


def complete(out_dir: str | Path, marker: str = "result.json") -> bool:
    """A stage folder is complete when its marker file (written last) exists."""
    return (Path(out_dir) / marker).is_file()


def clear_marker(out_dir: str | Path, marker: str = "result.json") -> None:
    """Take a folder's marker away: what is left there no longer looks complete."""
    (Path(out_dir) / marker).unlink(missing_ok=True)


@contextmanager
def marked_on_success(out_dir: str | Path, marker: str) -> Iterator[None]:
    """Around a step's work: the marker (which the step writes last) is removed before the work and
    again when the work fails, so a step folder holds it only after a run of the step that succeeded —
    never after a failed, timed-out or killed one."""
    clear_marker(out_dir, marker)
    try:
        yield
    except BaseException:
        clear_marker(out_dir, marker)
        raise


class StepTimeout(TimeoutError):
    """A stage ran past its time limit (--step-timeout)."""


def with_deadline(seconds: Optional[float], callback: Optional[Callable] = None) -> Optional[Callable]:
    """A stage's per-iteration callback that also ends the stage once `seconds` have passed since this
    call: StepTimeout, raised between two iterations, so the checkpoint stays whole and a retry resumes
    from it. (Prefect's `timeout_seconds` would raise inside the worker thread wherever it happens to
    be — in an import, a lock, a checkpoint write — which can leave the process broken.)"""
    if not seconds:
        return callback
    deadline = time.monotonic() + seconds

    def check(step: int, metrics: dict) -> None:
        if callback is not None:
            callback(step, metrics)
        if time.monotonic() > deadline:
            raise StepTimeout(f"ran past the step timeout of {seconds:g} s (at iteration {step + 1})")

    return check


def transient(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry a failed step unless its error is the user's
    (core.errors.Lift3DError: a bad input, a missing model — the same again on every attempt)."""
    from core.errors import Lift3DError

    try:
        exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - an unreadable result: retry as Prefect would
        return True
    return not isinstance(exc, Lift3DError)
