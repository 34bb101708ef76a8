"""The coarse stage's first guided iterations, run in a side process while the textual inversion runs,
so that the coarse stage finds its priors' compiled code in the machine's compile caches.

On a machine whose compile caches are empty the coarse stage stood ~3 min at its first guided
iteration while its priors' UNets and VAE encoders compiled (session 41, one H200: 208 s of its 354 s
above its steady pace); with the caches warm from an earlier process the same stage spends ~35 s
there (session 40). The textual inversion before it keeps the card busy for minutes while the host,
its cores idle, waits on it. So the asset starts a second process beside the textual inversion that
builds the coarse stage as the stage will (`make_coarse_stage`, `build_guidance`, the same params and
reference, a stand-in token of the learned one's shape) and runs its first few guided iterations, then
the fine stage's from that field: Inductor's and AOTAutograd's caches and Triton's then hold what
the stages compile, and the stages themselves only trace and load (`models.compile_ahead`). The method is untouched: the side process's
field, optimiser and token are thrown away; nothing it computes reaches the asset.

Measured (session 42, one H200, a whole asset on a fresh machine): the side process ran both stages'
first guided iterations in 202.6 s, well inside the textual inversion's 553 s, without slowing it
(139.6 ms a step); but the asset's own stages still missed Inductor's and AOTAutograd's caches on
every graph (Triton's kernels were found: 10 new in the coarse stage), so the coarse stage stood
180 s above its pace against 208 s before. A second side process does hit the first one's entries
(tiny priors, same GPU). Found after the device time: the textual inversion's TF32 block left torch's
`fp32_precision` 'ieee' where it had been 'none' (the same arithmetic), a part of every Inductor key;
core.perf.tf32_matmuls now restores it exactly (not yet measured on a GPU;
reports/speed/paper_run/fx_keys/ logs both processes' cache keys to compare).

The side process writes `compile_ahead.json` (what it ran and compiled: core.perf.CompileLedger) and
its log beside the textual inversion's outputs; the textual inversion waits for it before it returns,
so that the coarse stage starts on warm caches, and stops it if the textual inversion fails.

    python -m core.stages.compile_ahead PARAMS.json RGBA.png OUT.json   (what `start` runs)
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)

GUIDED_ITERATIONS = 4  # the priors' compiles, their graphs' captures (core.perf.GraphedCall: 3 warm-up calls)
# 'auto' needs a card this big: on one H200 (session 42) the side process peaked at 26.2 GiB allocated beside
# the textual inversion's 12.7 GiB, ~40 GiB with the two processes' CUDA contexts
MIN_GIB = 48.0
WAIT_S = 1800.0  # the longest the textual inversion waits for it (a cold coarse stage compiles in ~3 min)


def why_not(params, device) -> str:
    """'' when `models.compile_ahead` comes to a side process on `device`, else why not (for the log).
    'on' always (tests run it on a CPU); 'auto' where the coarse stage's priors compile (a GPU where
    Inductor builds) and the card holds both processes (MIN_GIB); 'off' never."""
    mode = params.models.compile_ahead
    if mode == "on":
        return ""
    if mode == "off":
        return "models.compile_ahead is off"
    from core.guidance.factory import priors_compile

    g, device = params.guidance, torch.device(device)
    if g.kind not in ("joint", "dynamic"):
        return f"guidance.kind is {g.kind!r}"
    if not priors_compile(params, device, g.coarse.lambda_2d > 0, g.coarse.lambda_3d > 0):
        return "the coarse stage's priors do not compile here"
    gib = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
    if gib < MIN_GIB:
        return f"the card's {gib:.0f} GiB is under the {MIN_GIB:.0f} GiB both processes need"
    return ""


def _die_with_parent() -> None:  # Linux: the side process ends when the asset's process does
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class CompileAhead:
    """The side process; `start` it, then `finish` (waits, returns its record) or leave the `with`
    block (stops it where it still runs)."""

    def __init__(self, params, rgba: Path | str, folder: Path | str):
        self.params, self.rgba, self.folder = params, Path(rgba), Path(folder)
        self.report, self.log_path = self.folder / "compile_ahead.json", self.folder / "compile_ahead.log"
        self.proc: Optional[subprocess.Popen] = None
        self.started = 0.0

    def start(self) -> "CompileAhead":
        from core.io import atomic_write_text

        self.folder.mkdir(parents=True, exist_ok=True)
        self.report.unlink(missing_ok=True)
        params_file = self.folder / "compile_ahead_params.json"
        atomic_write_text(params_file, json.dumps(self.params.to_dict()))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        root = str(Path(__file__).resolve().parents[2])  # this checkout, as the asset's process imports it
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        with open(self.log_path, "w") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "core.stages.compile_ahead", str(params_file), str(self.rgba), str(self.report)],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, env=env,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        self.started = time.perf_counter()
        log.info("compile ahead: the coarse stage's first guided iterations in a side process (pid %d) while "
                 "the textual inversion runs; its log: %s", self.proc.pid, self.log_path)
        return self

    def finish(self, timeout: float = WAIT_S) -> dict:
        """Wait for the side process (at most `timeout` s; then it is stopped) and return its record:
        compile_ahead.json's content with `waited_s`, or {"error": …} where it failed."""
        if self.proc is None:
            return {}
        t0 = time.perf_counter()
        if self.proc.poll() is None:
            log.info("compile ahead: waiting for the side process to finish compiling (%.0f s since it started)",
                     t0 - self.started)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            rc = None
        waited = round(time.perf_counter() - t0, 1)
        self.proc = None
        try:
            rec = json.loads(self.report.read_text())
        except (OSError, ValueError):
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-1:] if self.log_path.is_file() else []
            why = f"stopped after {timeout:.0f} s" if rc is None else f"exit {rc}"
            rec = {"error": f"{why}: {tail[0] if tail else 'no log'}"[:300]}
            log.warning("compile ahead: the side process did not finish (%s); the coarse stage compiles itself "
                        "(see %s)", rec["error"], self.log_path)
        else:
            log.info("compile ahead: done in %.1f s (%d guided iterations), the textual inversion waited %.1f s",
                     rec.get("seconds", 0.0), rec.get("guided_iterations", 0), waited)
        rec["waited_s"] = waited
        return rec

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "CompileAhead":
        return self

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False


def maybe_start(params, rgba: Path | str, folder: Path | str, device) -> Optional[CompileAhead]:
    """The side process started (`CompileAhead`), or None (logged why) where `why_not` says no."""
    why = why_not(params, device)
    if why:
        log.info("compile ahead: no side process (%s)", why)
        return None
    return CompileAhead(params, rgba, folder).start()


def _guided(stage, guided: int, ref_every: int) -> dict:
    """Run `stage` from its first guided iteration until `guided` guided iterations ran."""
    stage.state.step = stage.spec.ref_warmup
    steps = done = 0
    cap = max(1, guided) * (ref_every + 1) + 20  # reference iterations come between them
    while done < guided and steps < cap and stage.state.step < stage.spec.iters:
        done += not stage.step()["reference"]
        steps += 1
    return {"iterations": steps, "guided_iterations": done, "from_iteration": stage.spec.ref_warmup}


def first_guided_iterations(params, reference, device, guided: int = GUIDED_ITERATIONS, fine: bool = True) -> dict:
    """Build the coarse stage as `core.pipeline.coarse_stage` does and run it from its first guided
    iteration until `guided` guided iterations ran; then (`fine`) the fine stage from that field as
    `core.pipeline.fine_stage` builds it, the same way. Returns what ran: the coarse stage's counts,
    and under "fine" the fine stage's (or {"error": …}: a mesh from a field this young may not be
    one the fine stage takes; the coarse stage's compiling is the most of it). The 2D prior guides
    with a stand-in token of the learned embedding's shape (zeros) where the textual inversion learns one."""
    from core.guidance.factory import build_guidance, stable_diffusion_parts
    from core.stages.coarse import make_coarse_stage
    from core.stages.fine import make_fine_stage

    token = None
    if params.guidance.coarse.lambda_2d > 0 and params.prompt.text is None:  # the token being learned
        width = stable_diffusion_parts(params, device).text_encoder.get_input_embeddings().weight.shape[1]
        token = {params.textual_inversion.placeholder: torch.zeros(width)}
    stage = make_coarse_stage(params, reference, guidance=build_guidance(params, reference, "coarse", device, token),
                              device=device)
    ran = _guided(stage, guided, params.camera.ref_every)
    if fine and params.fine.iters > 0:
        try:
            nxt = make_fine_stage(params, reference, stage.rep.field, coarse=stage.state, device=device,
                                  guidance=build_guidance(params, reference, "fine", device, token))
            ran["fine"] = _guided(nxt, guided, params.camera.ref_every)
        except Exception as e:  # noqa: BLE001 - reported; the asset's own fine stage is untouched
            log.warning("compile ahead: the fine stage's first iterations failed here (%s: %s)", type(e).__name__, e)
            ran["fine"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return ran


def main(argv: Optional[list[str]] = None) -> int:
    from core.inputs.images import load_reference
    from core.io import atomic_write_text
    from core.params import Params, resolve_device
    from core.perf import CompileLedger, Timer, load_compile_cache, peak_memory, reset_peak_memory
    from core.stages.coarse import reference_resolution

    params_file, rgba, out = (argv if argv is not None else sys.argv[1:])[:3]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    params = Params.model_validate(json.loads(Path(params_file).read_text()))
    device = resolve_device(params)
    reset_peak_memory(device)
    wall = Timer()
    reference = load_reference(rgba, None, size=reference_resolution(params), max_pixels=params.segment.max_input_pixels,
                               object_scale=params.segment.object_scale, recenter=params.segment.recenter, params=params)
    if params.models.compile_cache:  # read, not written: the asset's stages write what they found
        load_compile_cache(params.models.compile_cache)
    with CompileLedger() as ledger:
        ran = first_guided_iterations(params, reference, device)
    peak, _ = peak_memory(device)
    rec = {"seconds": round(wall.seconds, 1), **ran, "device": str(device), "peak_gib": round(peak, 2),
           "compiles": ledger.record, "pid": os.getpid()}
    atomic_write_text(out, json.dumps(rec, indent=2))
    log.info("compile ahead: %s", rec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
