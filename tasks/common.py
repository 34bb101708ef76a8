"""What every task shares: the stale-output check, the step marker, the retry condition, the time limit."""
from __future__ import annotations

import functools
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


STEPS_FOLDER = "steps"  # in an asset's run folder: one record per step that ran (recorded_step)


def worker_name() -> str:
    """host:pid of this process (a Dask worker, or the flow's own process)."""
    import os
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


# the packages whose versions can change a run's numbers (session 31: the README's main job drew another
# picture, with this repository's code unchanged, after a fresh environment's install)
RECORDED_PACKAGES = ("lift3d", "torch", "torchvision", "numpy", "scipy", "scikit-image", "pillow", "diffusers",
                     "transformers", "open_clip_torch", "rembg", "onnxruntime", "trimesh", "xatlas", "triton")


@functools.cache
def package_versions() -> dict[str, Optional[str]]:
    """{package: installed version or None} of RECORDED_PACKAGES and Python, in this worker; an
    imported module's own `__version__` where it has one (torch's carries its build: `+cu130`, `+cpu`)."""
    import importlib.metadata as md
    import platform
    import sys

    def version(name: str) -> Optional[str]:
        own = getattr(sys.modules.get(name.replace("-", "_")), "__version__", None)
        if isinstance(own, str):
            return own
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), **{n: version(n) for n in RECORDED_PACKAGES}}


def _cuda_in_use():
    """torch.cuda when this process has started CUDA (never starts it), else None."""
    import sys

    torch = sys.modules.get("torch")
    try:
        return torch.cuda if torch is not None and torch.cuda.is_initialized() else None
    except Exception:  # noqa: BLE001
        return None


@contextmanager
def recorded_step(asset_dir: str | Path, step: str) -> Iterator[None]:
    """Around a step's work: RUN/steps/STEP.json says which worker ran it (and its GPU, with the
    step's peak of torch's GPU memory), for how long, in which flow run, and how many priors it loaded (core.models.cache: loads here, reuses of models already
    loaded by this worker, and the worker's loads so far), and the versions of the packages that can
    change its numbers (package_versions). Written also when the step fails. Not in a
    stage folder: no step's cache key hashes these records."""
    import json
    import os

    from core.models.cache import prior_stats

    before, t0, ok = prior_stats(), time.perf_counter(), False
    cuda = _cuda_in_use()
    if cuda is not None:
        cuda.reset_peak_memory_stats()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    try:
        yield
        ok = True
    finally:
        after = prior_stats()
        flow_run_id = task_run_id = None
        attempt = None
        try:
            from prefect.context import TaskRunContext

            ctx = TaskRunContext.get()
            if ctx is not None:
                flow_run_id, task_run_id = str(ctx.task_run.flow_run_id), str(ctx.task_run.id)
                attempt = ctx.task_run.run_count
        except Exception:  # noqa: BLE001 - outside Prefect: no run ids
            pass
        record = {"step": step, "ok": ok, "seconds": round(time.perf_counter() - t0, 3), "started": started,
                  "worker": worker_name(), "flow_run_id": flow_run_id, "task_run_id": task_run_id,
                  "attempt": attempt, "prior_loads": after["loads"] - before["loads"],
                  "prior_reuses": after["reuses"] - before["reuses"], "worker_prior_loads": after["loads"],
                  "worker_prior_load_seconds": after["load_seconds"],
                  "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "gpu_peak_gib": None,
                  "versions": package_versions()}
        cuda = _cuda_in_use()
        if cuda is not None:  # the step's peak of this worker's GPU memory (torch's allocations)
            record["gpu_peak_gib"] = round(cuda.max_memory_allocated() / 2 ** 30, 3)
        folder = Path(asset_dir) / STEPS_FOLDER
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{step}.json.{os.getpid()}"
            tmp.write_text(json.dumps(record, indent=1))
            tmp.replace(folder / f"{step}.json")
        except OSError:  # a record is bookkeeping: never the reason a step fails
            pass


def read_step_records(asset_dir: str | Path) -> dict[str, dict]:
    """{step: record} of an asset's run folder (recorded_step)."""
    import json

    out = {}
    for f in sorted((Path(asset_dir) / STEPS_FOLDER).glob("*.json")):
        try:
            out[f.stem] = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
    return out
