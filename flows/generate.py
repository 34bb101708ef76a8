"""The `generate` flow: one image → inputs → (token) → coarse NeRF → fine mesh → metrics.

Each step is a cached Prefect task (tasks/), so re-running after a change redoes only what the change
touches. The same `submit_asset` chain serves the benchmark flow, where a Dask task runner spreads
the assets over GPUs. When a step fails, the flow raises that step's error (flows.failures): the
CLI prints it as one line.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from core.params import Params, load_params
from core.pipeline import needs_textual_inversion
from flows.failures import first_failure
from tasks.coarse import coarse_task
from tasks.common import clear_marker, complete
from tasks.evaluate import evaluate_task
from tasks.fine import fine_task
from tasks.prepare import prepare_task
from tasks.textual_inversion import textual_inversion_task

log = logging.getLogger(__name__)


def _fresh_if_incomplete(task, out_dir: Path, marker: str = "result.json"):
    """A cached record whose files were deleted must not stand: re-run the task then."""
    return task.with_options(refresh_cache=True) if not complete(out_dir, marker) else task


def submit_asset(image: Path, out: Path, params: Params, depth: Optional[Path] = None,
                 embeds: Optional[Path] = None, asset: Optional[str] = None, dataset: Optional[str] = None,
                 parent_run_id: Optional[str] = None, step_timeout: Optional[float] = None) -> dict:
    """Submit one asset's chain of tasks to the flow's task runner; returns {step: future} in chain
    order (the last, "evaluate", gives the metrics). `step_timeout`: seconds per attempt of the coarse
    and fine stages, the long steps (checked between iterations: tasks.common.with_deadline)."""
    asset = asset or image.parent.name
    inputs, coarse, fine = out / "inputs", out / "coarse", out / "fine"
    rgba, ref_depth = inputs / "rgba.png", inputs / "depth.png"
    chain = {"prepare": _fresh_if_incomplete(prepare_task, inputs, "prepare.json").submit(
        str(image), str(inputs), params, str(depth) if depth else None)}
    if embeds is None and needs_textual_inversion(params):
        ti_dir = out / "textual_inversion"
        chain["textual_inversion"] = _fresh_if_incomplete(textual_inversion_task, ti_dir, "learned_embeds.bin").submit(
            str(rgba), str(ti_dir), params, wait_for=[chain["prepare"]])
        embeds = ti_dir / "learned_embeds.bin"
    if embeds is not None:
        params = params.with_inputs(learned_embeds=str(embeds))
    inputs_ready = chain.get("textual_inversion", chain["prepare"])
    chain["coarse"] = _fresh_if_incomplete(coarse_task, coarse).submit(
        str(rgba), str(coarse), params, depth=str(ref_depth), asset=asset, parent_run_id=parent_run_id,
        timeout=step_timeout, wait_for=[inputs_ready])
    # the fine stage continues the coarse run: its token, prior clock and stage-2 switch
    chain["fine"] = _fresh_if_incomplete(fine_task, fine).submit(
        str(coarse / "checkpoint.pt"), str(fine), params, image=str(rgba), depth=str(ref_depth),
        asset=asset, parent_run_id=parent_run_id, timeout=step_timeout, wait_for=[chain["coarse"]])
    chain["evaluate"] = _fresh_if_incomplete(evaluate_task, out, "metrics.json").submit(
        str(out), str(fine), params, dataset=dataset, asset=asset, parent_run_id=parent_run_id,
        wait_for=[chain["fine"]])
    return chain


@flow(name="generate", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def generate_flow(image: str, out: str, params: Params, depth: Optional[str] = None,
                  embeds: Optional[str] = None, step_timeout: Optional[float] = None) -> dict:
    """One image to a textured mesh, evaluated. Returns the metrics; raises the first failed step's
    error (flows.failures.Failure.exception)."""
    chain = submit_asset(Path(image), Path(out), params, Path(depth) if depth else None,
                         Path(embeds) if embeds else None, step_timeout=step_timeout)
    failed = first_failure(Path(image).parent.name, chain)
    if failed:
        clear_marker(out, "metrics.json")  # an earlier run's metrics are not this run's
        raise failed.exception()
    return chain["evaluate"].result()


def _check_inputs(image: Path, depth: Optional[Path], embeds: Optional[Path]) -> None:
    from core.errors import InputError

    for what, p in (("image", image), ("depth map", depth), ("embeddings file", embeds)):
        if p is not None and not p.is_file():
            raise InputError(f"{what} not found: {p}")


def cli_generate(args) -> int:
    import json

    _check_inputs(args.image, args.depth, args.embeds)
    from flows.server import start_reaped_ephemeral_server

    start_reaped_ephemeral_server()  # a killed run leaves no Prefect server behind
    params = load_params(args.preset, args.overrides, args.params).with_inputs(text=args.text)
    metrics = generate_flow(str(args.image), str(args.out), params,
                            str(args.depth) if args.depth else None, str(args.embeds) if args.embeds else None,
                            step_timeout=args.step_timeout or None)
    print(json.dumps({k: metrics[k] for k in ("psnr", "lpips", "clip_similarity") if k in metrics}, indent=2))
    print(f"mesh: {Path(args.out) / 'fine'}  metrics: {Path(args.out) / 'metrics.json'}")
    return 0
