"""`lift3d bench speed` (default `--stage asset`): one whole asset, timed as a user runs it.

Textual inversion (when the preset learns a token), the coarse stage, the fine stage with its
export, through the same entry points as `lift3d generate` (core.pipeline), with the real prior
architectures at full size and random weights saved in the hub layout and loaded through
core.models.loader (core.testmodels.fullsize_priors). The photo is the oracle torus rendered at the
reference view (or --image/--depth). Per stage: wall seconds (model loading and export included),
the loop's ms per iteration, peak GPU memory; the hash-grid and rasteriser backends in use.
Writes DIR/speed.json after every stage, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any, Optional

import torch

from core.io import atomic_write_text
from core.perf import CompileLedger, GpuClocks, SyncAudit, compile_line, load_compile_cache, save_compile_cache


def _backends(params, device: torch.device) -> dict[str, Any]:
    from core.guidance.factory import guidance_streams
    from core.guidance.sd import compile_mode, unet_layout, vae_compile_mode, vae_graphs_run_on, vae_kernels_mode
    from core.perf import compile_kind
    from core.rendering.raster import nvdiffrast_available
    from core.representations.hashgrid import choose_backend, triton_kind

    raster = "nvdiffrast" if device.type == "cuda" and nvdiffrast_available() else "torch"
    return {"hash_grid": choose_backend(params.coarse.grid.backend, device), "rasteriser": raster,
            # the torch rasteriser's pixel arithmetic compiled (fine.compile); the textual inversion's
            # text encoder in TF32 (textual_inversion.tf32)
            "rasteriser_compile": compile_kind(params.fine.compile, device) if raster == "torch" else "none",
            # the volume renderer's arithmetic compiled (coarse.compile)
            "volume_render_compile": compile_kind(params.coarse.compile, device, "coarse.compile"),
            # the volume renderer's rays and samples (coarse.samples): one Triton kernel or the tensors'
            "volume_render_samples": triton_kind(params.coarse.samples, device, "coarse.samples"),
            "ti_tf32": bool(params.textual_inversion.tf32 and device.type == "cuda"),
            "cudnn_benchmark": bool(params.cudnn_benchmark),
            "unet_compile": {"sd": compile_mode(params.sd.compile, device),
                             "zero123": compile_mode(params.zero123.compile, device)},
            # the compiled UNets' layout (sd/zero123.compile_layout); 'inductor' where not compiled
            "unet_layout": {k: unet_layout(prior.compile, prior.compile_layout, device)
                            for k, prior in (("sd", params.sd), ("zero123", params.zero123))},
            "vae_compile": {"sd": vae_compile_mode(params.sd.vae_compile, device),
                            "zero123": vae_compile_mode(params.zero123.vae_compile, device)},
            "vae_kernels": {"sd": vae_kernels_mode(params.sd.vae_kernels, device),
                            "zero123": vae_kernels_mode(params.zero123.vae_kernels, device)},
            "vae_graphs": {k: getattr(params, k).vae_graphs and vae_graphs_run_on(device) for k in ("sd", "zero123")},
            # the two priors one after the other or on two CUDA streams at once (guidance.streams)
            "guidance_streams": guidance_streams(params, device)}


class _Stage:
    """Wall time, peak GPU memory, the card's clocks (core.perf.GpuClocks) and what compiled
    (core.perf.CompileLedger) of one stage."""

    def __init__(self, device: torch.device):
        self.device = device
        self.clocks = GpuClocks(device)
        self.compiles = CompileLedger()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.clocks.__enter__()
        self.compiles.__enter__()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_gib = round(torch.cuda.max_memory_allocated(self.device) / 2 ** 30, 2)
        else:
            self.peak_gib = None
        self.wall_s = round(time.perf_counter() - self.t0, 2)
        self.compiles.__exit__(*exc)
        self.clocks.__exit__(*exc)
        return False

    def record(self) -> dict[str, Any]:
        """What the stage's record takes from here besides its times: the clocks' summary, where sampled,
        and what compiled, where anything did."""
        return {**({"clocks": self.clocks.summary} if self.clocks.summary else {}),
                **({"compiles": self.compiles.record} if self.compiles.record else {})}


class _Profile:
    """Where a stage's time goes: the loop's scopes (core.perf.scope: render, guidance,
    regularisers, backward, optimiser, checkpoint, set-up, export) timed with the device synchronised
    around each, over the whole stage but the profiler's window, which runs free; then
    torch.profiler's table over `steps` iterations, stepped by the stage's callback, after the
    stage's reference-only warm-up (`skip` iterations: the released 99, which have no guidance),
    `after` more (`bench speed --profile-after`: past the first guided iterations' compiling and
    graph captures) and 5 + 1 more. Both written to `path`."""

    def __init__(self, path: Path, steps: int, device: torch.device, skip: int = 0, after: int = 0,
                 group: tuple[str, ...] = ("op",)):
        self.path, self.steps, self.device, self.prof, self.group = path, steps, device, None, tuple(group)
        self.skip, self.after = int(skip), int(after)
        self.times: dict = {}
        self.iterations = 0  # the stage's iterations seen by the callback
        self.wait, self.warmup = self.waits(self.skip, self.after), self.WARMUP  # the schedule's iterations before the active ones

    WARMUP = 1

    @staticmethod
    def waits(skip: int, after: int) -> int:
        """The profiler schedule's wait: the reference-only warm-up, --profile-after and 5 more."""
        return skip + after + 5

    @classmethod
    def needs(cls, steps: int, skip: int = 0, after: int = 0) -> int:
        """The iterations a stage must run for the window to close: the wait, the warm-up and `steps`."""
        return cls.waits(skip, after) + cls.WARMUP + steps

    def __enter__(self):
        if self.steps > 0:
            from torch.profiler import ProfilerActivity, profile, schedule

            from core import perf

            perf.SCOPE_TIMES = self.times
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.prof = profile(activities=acts,
                                schedule=schedule(wait=self.wait, warmup=self.warmup, active=self.steps, repeat=1),
                                **perf.profiler_options(self.group))
            self.prof.__enter__()
        return self

    @property
    def callback(self):
        if self.prof is None:
            return None

        def step(step, metrics):
            from core import perf

            self.iterations += 1
            self.prof.step()
            # the profiler's window runs free: the scopes' synchronised timing would hold the host to
            # the device at every scope, and the window would show a loop that does not run so
            recorded = self.wait <= self.iterations < self.wait + self.warmup + self.steps
            perf.SCOPE_TIMES = None if recorded else self.times
        step.metrics = False  # the stage calls it every iteration without reading the metrics to the host
        return step

    def summary(self) -> dict:
        return {k: {"calls": n, "seconds": round(t, 3), "ms_per_call": round(1000 * t / max(n, 1), 2)}
                for k, (n, t) in sorted(self.times.items(), key=lambda kv: -kv[1][1])}

    def __exit__(self, *exc):
        if self.prof is None:
            return False
        from core import perf

        perf.SCOPE_TIMES = None
        self.prof.__exit__(None, None, None)
        lines = [f"{'scope':24s} {'calls':>6s} {'seconds':>9s} {'ms/call':>9s}"]
        lines += [f"{k:24s} {v['calls']:6d} {v['seconds']:9.2f} {v['ms_per_call']:9.2f}" for k, v in self.summary().items()]
        text = "\n".join(lines)
        key = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        needed = self.needs(self.steps, self.skip, self.after)
        if self.iterations < needed:
            after = f" + {self.after} more (--profile-after)" if self.after else ""
            text += (f"\n\nno profiler table: the stage ran {self.iterations} iterations; the profile "
                     f"needs {needed} ({self.skip} reference-only{after} + 5 + 1 warm-up + {self.steps})")
        else:
            text += self._table(key)
        atomic_write_text(self.path, text)
        return False

    def _table(self, key: str) -> str:
        try:
            from core.perf import gpu_idle, ops_by_scope, profile_tables, save_events

            events = self.prof.events()
            save_events(events, self.path.with_name(self.path.stem + "_events.npz"))  # to read again offline
            table = profile_tables(self.prof, self.group, key, steps=self.steps)
            text = (f"\n\ntorch.profiler, {self.steps} iterations:\n{table}\n\noperators the host dispatched, by "
                    f"scope:\n{ops_by_scope(events, self.steps)}")
            if self.device.type == "cuda":
                text += f"\n\nwhere the device waited on its host:\n{gpu_idle(events, self.steps)}"
            return text
        except Exception as e:  # noqa: BLE001 - a profile that cannot be summarised is not a failed bench
            return f"\n\nno profiler table: {type(e).__name__}: {e}"


def steady_ms_per_iter(marks: list, from_step: int) -> Optional[float]:
    """ms an iteration between the first and the last of the stage's [step, seconds] marks at or after
    `from_step` (the engine marks every 25 steps, after the device has caught up): the speed once
    warm-up, reference-only iterations and compilation are behind; None with fewer than two marks."""
    after = [(int(a), float(b)) for a, b in marks if int(a) >= from_step]
    if len(after) < 2 or after[-1][0] == after[0][0]:
        return None
    return round(1000 * (after[-1][1] - after[0][1]) / (after[-1][0] - after[0][0]), 1)


def above_steady_s(loop_s: float, iters: int, steady_ms: Optional[float]) -> Optional[float]:
    """The loop's seconds above `iters` iterations at its steady pace: what its first iterations cost
    beyond it (compiling, CUDA-graph captures, the priors' first calls; the reference-only warm-up runs
    below the pace and takes some off). None without a steady figure."""
    if steady_ms is None:
        return None
    return round(loop_s - iters * steady_ms / 1000, 1)


def timing(loop_s: float, iters: int, marks: list, from_step: int) -> dict[str, Any]:
    """A stage's ms per iteration (mean and steady), the seconds above the steady pace, and its
    [step, seconds] marks (the loop's start and every 25 steps: the run's speed over time, for
    speed_plot.py --timeline)."""
    steady = steady_ms_per_iter(marks, from_step)
    return {"ms_per_iter": round(1000 * loop_s / max(iters, 1), 1), "ms_per_iter_steady": steady,
            "above_steady_s": above_steady_s(loop_s, iters, steady),
            "marks": [[int(a), round(float(b), 3)] for a, b in marks]}


def trace_workload(trace: Path, from_step: int) -> dict[str, int]:
    """A stage's workload from its trace.csv: the fine mesh's face count and the coarse renders'
    evaluated samples, each the median over the rows at or after `from_step` (the rows
    ms_per_iter_steady covers) and the last row's. A figure is quoted with its workload: a fine
    iteration most likely grows with its mesh (reports/speed session 17), a coarse one with its
    samples. Empty for a trace without either column, or without a trace."""
    import pandas as pd

    try:
        rows = pd.read_csv(trace)
    except (OSError, ValueError):  # no trace yet, or an empty one
        return {}
    out: dict[str, int] = {}
    for col in ("faces", "samples"):
        if col not in rows or rows[col].dropna().empty:
            continue
        have = rows.dropna(subset=[col])
        steady = have[have["step"] >= from_step][col]
        out[f"{col}_steady_median"] = int((steady if len(steady) else have[col]).median())
        out[f"{col}_last"] = int(have[col].iloc[-1])
    return out


STAGES = ("textual_inversion", "coarse", "fine")


def _profile_window_misses(params, stages, steps: int, after: int) -> list[tuple[str, int, int]]:
    """(the stage's count key, its value, the iterations `_Profile`'s window needs) for each stage of
    `stages` too short for it (coarse and fine skip their reference-only warm-up first)."""
    from core.pipeline import needs_textual_inversion

    misses = []
    for name in stages:
        if name == "textual_inversion":
            if not needs_textual_inversion(params):
                continue
            key, n, skip = "textual_inversion.steps", params.textual_inversion.steps, 0
        else:
            key, n, skip = f"{name}.iters", getattr(params, name).iters, getattr(params, name).ref_warmup
        need = _Profile.needs(steps, skip, after)
        if n < need:
            misses.append((key, n, need))
    return misses


def run_asset_bench(params, device: torch.device, out: Path, *, models_dir: Optional[Path] = None,
                    image: Optional[Path] = None, depth: Optional[Path] = None, tiny: bool = False,
                    progress: bool = True, profile_steps: int = 0, profile_after: int = 0,
                    profile_by: tuple[str, ...] = ("op",), sync_audit: bool = False,
                    stages: tuple[str, ...] = STAGES, compile_cache: Optional[Path] = None,
                    metrics_callback: bool = False) -> dict[str, Any]:
    """Time a whole asset; `params` as the user's run would have them (the prior folders are set here).

    `stages`: a part of the asset in this run, the rest from DIR (a run split across machines or
    calls): the records of the other stages are kept from DIR/speed.json; the fine stage starts from
    DIR/coarse/checkpoint.pt, the coarse one guides with DIR/textual_inversion/learned_embeds.bin
    when it is there (else with a text prompt: the same cost). A stage cut short resumes from its
    checkpoint in DIR; the textual inversion's record then counts its loop seconds over every run.

    `compile_cache`: torch.compile's artifacts (torch.compiler's portable "mega-cache") read from this
    file before the run when it is there, and written to it after (core.perf.load_compile_cache; the
    pipeline's models.compile_cache is the same file format): a run on another machine of the same GPU
    and software compiles the UNets from it instead of from nothing.

    `profile_steps=N`: torch.profiler over N iterations of each stage (after its reference-only
    warm-up, `profile_after` more and 5 + 1), written to DIR/profile_STAGE.txt (the scopes are timed
    with the device synchronised around each outside the profiler's window, so those runs' timings
    are not the bench's figures). `profile_by`: its tables (core.perf.profile_tables: by operator, by input
    shape, by the Python lines that called it).

    `metrics_callback=True`: the coarse and fine stages run with a callback that takes every
    iteration's metrics, as a real run's Prefect tasks attach one (MLflow's per-step logging, the
    progress artifact), so the figures are those of such a run; not with `profile_steps`.

    `sync_audit=True`: every host–device synchronisation of each stage counted by the line of lift3d
    that caused it (core.perf.SyncAudit) → speed.json "host_syncs" and DIR/sync_audit.txt (the stack
    walk slows the run: not the bench's figures either)."""
    from core.errors import InputError
    from core.params import apply_overrides
    from core.pipeline import coarse_stage, fine_stage, needs_textual_inversion, textual_inversion_stage

    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise InputError(f"bench speed --stages: {', '.join(unknown) or 'none given'} (choose from {', '.join(STAGES)})")
    if metrics_callback and profile_steps:
        raise InputError("bench speed: --metrics-callback and --profile go apart (the profiler steps through a "
                         "callback that reads no metrics)")
    if profile_steps:  # before any model loads: a window past a stage's end draws no table (session 34 lost a call so)
        from core.perf import profiler_options

        try:
            profiler_options(tuple(profile_by))
        except ValueError as e:
            raise InputError(f"bench speed --profile-by: {e}") from None
        short = [f"{key}={n} < {need}" for key, n, need in _profile_window_misses(params, stages, profile_steps,
                                                                                    profile_after)]
        if short:
            raise InputError(f"bench speed --profile {profile_steps} --profile-after {profile_after}: the profiler's "
                             f"window ends past the stage ({', '.join(short)}: its reference-only warm-up + "
                             f"--profile-after + 6 + --profile iterations); raise the iterations or lower --profile-after")
    if "fine" in stages and "coarse" not in stages and not (out / "coarse" / "checkpoint.pt").is_file():
        raise InputError(f"bench speed --stages fine: no coarse checkpoint at {out / 'coarse' / 'checkpoint.pt'} "
                         f"(run the coarse stage into {out} first)")
    out.mkdir(parents=True, exist_ok=True)
    earlier: dict[str, Any] = {}
    if tuple(stages) != STAGES and (out / "speed.json").is_file():
        earlier = json.loads((out / "speed.json").read_text()).get("stages", {})
    t_all = time.perf_counter()
    result: dict[str, Any] = {
        "command": "lift3d bench speed --stage asset", "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "method": params.method, "backends": _backends(params, device),
        "metrics_callback": bool(metrics_callback),
        "models": "tiny random (core.testmodels.priors)" if tiny else
        "full-size random weights in the hub layout (core.testmodels.fullsize_priors), loaded by core.models.loader",
        "iterations": {"textual_inversion": params.textual_inversion.steps if needs_textual_inversion(params) else 0,
                       "coarse": params.coarse.iters, "fine": params.fine.iters},
        "resolutions": {"coarse": params.coarse.resolution, "fine": params.fine.resolution,
                        "sd": params.sd.resolution, "zero123": params.zero123.resolution},
        "stages": {k: v for k, v in earlier.items() if k not in stages},
    }
    if tuple(stages) != STAGES:
        result["stages_this_run"] = list(stages)
    if compile_cache is not None:
        result["compile_cache"] = {"file": str(compile_cache), "loaded": load_compile_cache(compile_cache)}

    def save() -> None:
        result["stages"] = {k: result["stages"][k] for k in STAGES if k in result["stages"]}
        result["total_seconds"] = round(time.perf_counter() - t_all, 1)
        atomic_write_text(out / "speed.json", json.dumps(result, indent=2))

    def syncs(stage: str, audit: SyncAudit, iterations: int) -> None:
        if not sync_audit:
            return
        result.setdefault("host_syncs", {})[stage] = audit.summary(iterations)
        lines = []
        for name, rec in result["host_syncs"].items():
            lines.append(f"{name}: {rec['total']} host syncs, {rec['per_iteration']} an iteration")
            lines += [f"  {n:7d}  {site}" for site, n in rec["sites"].items()]
        atomic_write_text(out / "sync_audit.txt", "\n".join(lines) + "\n")

    if not tiny:
        t0 = time.perf_counter()
        from core.testmodels.fullsize_priors import fullsize_judge_overrides, sd_arch_of, write_fullsize_priors

        arch = sd_arch_of(params.sd.model)
        folders = write_fullsize_priors(models_dir or out / "models", device, sd_arch=arch)
        judges = fullsize_judge_overrides(params, models_dir or out / "models")
        result["sd_architecture"] = arch
        result["models_written_seconds"] = round(time.perf_counter() - t0, 1)  # not part of the asset's time
        if judges:
            result["judges"] = judges
        params = apply_overrides(params, [f"sd.model={folders['sd']}", f"zero123.model={folders['zero123']}", *judges])
    if image is None:
        from core.oracle.bench import write_reference_view

        image = write_reference_view("torus", out / "photo" / "rgba.png", size=512, params=params)
        depth = image.with_name("depth.png")
    result["photo"] = str(image)
    save()
    t_asset = time.perf_counter()
    ti_needed = needs_textual_inversion(params)
    ti_token = out / "textual_inversion" / "learned_embeds.bin"
    if ti_needed and "textual_inversion" not in stages:
        params = params.with_inputs(learned_embeds=str(ti_token)) if ti_token.is_file() else \
            params.with_inputs(text="a torus")
    elif ti_needed:
        marks: list = []  # [step, seconds] every 25 steps: each step reads its loss back, so the device has caught up
        t_ti = time.perf_counter()

        def ti_callback(step: int, metrics: dict) -> None:
            if step % 25 == 0:
                marks.append([step, time.perf_counter() - t_ti])
            if prof.callback is not None:
                prof.callback(step, metrics)

        with _Stage(device) as st, _Profile(out / "profile_textual_inversion.txt", profile_steps, device,
                                            after=profile_after, group=profile_by) as prof, \
                SyncAudit(sync_audit) as audit:
            embeds = textual_inversion_stage(image, out / "textual_inversion", params, progress=progress,
                                             callback=ti_callback)
        n = params.textual_inversion.steps
        syncs("textual_inversion", audit, n)
        ti_record = json.loads((out / "textual_inversion" / "result.json").read_text())
        summ = ti_record["summary"]
        loop_s, resumed_from = float(summ["seconds"]), int(summ.get("resumed_from") or 0)
        earlier_loop = float(summ.get("seconds_before_resume") or 0.0)  # the checkpoint's, from earlier runs
        this_loop = loop_s - earlier_loop
        wall = st.wall_s + earlier_loop  # as one uninterrupted run: one model load, every step once
        result["stages"]["textual_inversion"] = {"wall_s": round(wall, 2), "iters": n, "loop_s": round(loop_s, 2),
                                                 # steady: the second half, past any compiling
                                                 **timing(loop_s, n, marks, max(resumed_from, n // 2)),
                                                 "outside_loop_s": round(st.wall_s - this_loop, 2),
                                                 "peak_gib": st.peak_gib, **st.record()}
        if resumed_from:
            result["stages"]["textual_inversion"]["resumed_from"] = resumed_from
        if "compile_ahead" in ti_record:  # the coarse stage's first guided iterations, run beside it
            result["stages"]["textual_inversion"]["compile_ahead"] = ti_record["compile_ahead"]
        if profile_steps:
            result.setdefault("scopes", {})["textual_inversion"] = prof.summary()
        params = params.with_inputs(learned_embeds=str(embeds))
        save()
    elif params.prompt.text is None and params.prompt.learned_embeds is None:
        params = params.with_inputs(text="a torus")
    for name, run in (
        ("coarse", lambda cb: coarse_stage(image, out / "coarse", params, depth=depth, progress=progress, callback=cb)),
        ("fine", lambda cb: fine_stage(out / "coarse" / "checkpoint.pt", out / "fine", params, progress=progress,
                                       callback=cb)),
    ):
        if name not in stages:
            continue
        warmup = getattr(params, name).ref_warmup  # profile guided steps, not the reference-only ones
        seen: list = []
        with _Stage(device) as st, _Profile(out / f"profile_{name}.txt", profile_steps, device, skip=warmup,
                                            after=profile_after, group=profile_by) as prof, \
                SyncAudit(sync_audit) as audit:
            record = run((lambda s, m: seen.append(len(m))) if metrics_callback else prof.callback)
        loop_s, steps = float(record.get("seconds", 0.0)), int(record.get("steps", 0))
        syncs(name, audit, steps)
        if profile_steps:
            result.setdefault("scopes", {})[name] = prof.summary()
        result["stages"][name] = {"wall_s": st.wall_s, "iters": steps, "loop_s": round(loop_s, 2),
                                  # steady: the second half, past the reference-only warm-up (and any compiling)
                                  **timing(loop_s, steps, record.get("marks") or [], max(warmup, steps // 2)),
                                  "outside_loop_s": round(st.wall_s - loop_s, 2), "peak_gib": st.peak_gib,
                                  # of which writing the stage's outputs (renders; the fine stage's export)
                                  "outputs_s": round(float(record.get("outputs_seconds") or 0.0), 2),
                                  **trace_workload(out / name / "trace.csv", max(warmup, steps // 2)),
                                  **st.record()}
        if metrics_callback:  # every iteration's metrics reached the callback
            result["stages"][name]["callback_iterations"] = len(seen)
        save()
    if compile_cache is not None:
        result["compile_cache"]["saved_bytes"] = save_compile_cache(compile_cache)
    if tuple(stages) == STAGES:
        result["asset_seconds"] = round(time.perf_counter() - t_asset, 1)
    elif all(s in result["stages"] for s in STAGES if s != "textual_inversion" or ti_needed):
        # the parts of a split run: each stage's wall time, summed
        result["asset_seconds"] = round(sum(v["wall_s"] for v in result["stages"].values()), 1)
        result["asset_seconds_note"] = "the sum of the stages' wall times, measured in separate runs"
    save()
    return result


def run_assets_in_process(n: int, params, device: torch.device, out: Path, **kw) -> list[dict[str, Any]]:
    """`run_asset_bench` `n` times in this process, into OUT, OUT/asset_2, …, OUT/asset_N, as a worker
    that generates many assets runs them (`generate-many`, one Dask worker a GPU): the second and later
    assets find the priors loaded and compiled (core.models.cache) and the kernels built, so their figures
    are what each further asset costs. OUT/speed.json (the first asset's) gains `assets_in_process`, each
    asset's stage figures; the results are returned in order."""
    from core.errors import InputError

    if n < 1:
        raise InputError(f"bench speed --assets: {n} (at least 1)")
    stages = tuple(kw.get("stages", STAGES))
    if n > 1 and "fine" in stages and "coarse" not in stages:
        raise InputError("bench speed --assets N: each further asset starts from nothing, so its --stages "
                         "need the coarse stage before the fine one")
    results = [run_asset_bench(params, device, out if k == 1 else out / f"asset_{k}", **kw) for k in range(1, n + 1)]
    if n > 1:
        from core.io import atomic_write_text

        keep = ("wall_s", "loop_s", "ms_per_iter_steady", "above_steady_s", "outside_loop_s", "peak_gib")
        first = json.loads((out / "speed.json").read_text())
        first["assets_in_process"] = [
            {"dir": str(out if k == 1 else out / f"asset_{k}"), "asset_seconds": r.get("asset_seconds"),
             "stages": {name: {x: st.get(x) for x in keep} for name, st in r["stages"].items()
                        if name in (r.get("stages_this_run") or r["stages"])}}  # not an earlier run's record
            for k, r in enumerate(results, 1)]
        atomic_write_text(out / "speed.json", json.dumps(first, indent=1))
        results[0] = first
    return results


def format_assets_in_process(first: dict[str, Any]) -> str:
    """A line per asset of `run_assets_in_process`: each stage's wall seconds and the seconds its
    loop spent above its steady pace ('' for a single asset)."""
    rows = first.get("assets_in_process") or []
    if len(rows) < 2:
        return ""

    def stage(name: str, st: dict) -> str:
        above = st.get("above_steady_s")
        return f"{name} {st['wall_s']:.1f} s" + (f" ({above:.1f} above its pace)" if above is not None else "")

    lines = [f"{len(rows)} assets in one process (the priors loaded and compiled once):"]
    for k, row in enumerate(rows, 1):
        total = sum(st["wall_s"] for st in row["stages"].values())
        lines.append(f"  asset {k}: {total:.1f} s — " + ", ".join(stage(n, st) for n, st in row["stages"].items()))
    return "\n".join(lines)


def _compiled(modes: dict[str, str]) -> str:
    """'eager', 'reduce-overhead' or 'sd reduce-overhead, zero123 none' (older speed.json: '?')."""
    if not modes:
        return "?"
    if len(set(modes.values())) == 1:
        m = next(iter(modes.values()))
        return "eager" if m == "none" else m
    return ", ".join(f"{k} {v}" for k, v in modes.items())


def _graphed(on: dict[str, bool]) -> str:
    """', replayed as CUDA graphs (sd)' for the priors whose encoder is graphed; '' for none."""
    names = [k for k, v in on.items() if v]
    return f", replayed as CUDA graphs ({', '.join(names)})" if names else ""


def _forced_layout(layouts: dict[str, str]) -> str:
    """' channels-last (sd, zero123)' for the priors whose compiled UNets run Inductor's forced
    channels-last layout (unet_layout), '' where none does (and in older speed.json)."""
    forced = [k for k, v in layouts.items() if v == "channels_last"]
    return f" channels-last ({', '.join(forced)})" if forced else ""


def format_asset_table(r: dict[str, Any]) -> str:
    lines = [f"bench speed (asset) — {r['gpu']} ({r['device']}), torch {r['torch']}, {r['method']}",
             f"backends: hash grid {r['backends']['hash_grid']}"
             f"{' (renderer compiled)' if r['backends'].get('volume_render_compile', 'none') != 'none' else ''}"
             f"{' (samples on Triton)' if r['backends'].get('volume_render_samples') == 'triton' else ''}, "
             f"rasteriser {r['backends']['rasteriser']}"
             f"{' (compiled)' if r['backends'].get('rasteriser_compile', 'none') != 'none' else ''}, UNets "
             f"{_compiled(r['backends'].get('unet_compile', {}))}{_forced_layout(r['backends'].get('unet_layout', {}))}"
             f", VAE encoders "
             f"{_compiled(r['backends'].get('vae_compile', {}))} on {_compiled(r['backends'].get('vae_kernels', {}))} "
             f"kernels{_graphed(r['backends'].get('vae_graphs', {}))}"
             f"{', the priors on two streams' if r['backends'].get('guidance_streams') == 'two' else ''}; {r['models']}",
             "", f"{'stage':18s} {'iters':>6s} {'wall s':>8s} {'ms/iter':>8s} {'steady':>7s} {'outside loop s':>15s} "
             f"{'(outputs s)':>12s} {'peak GiB':>9s}"]
    for name, s in r["stages"].items():
        peak = "-" if s.get("peak_gib") is None else f"{s['peak_gib']:.2f}"
        steady = "-" if s.get("ms_per_iter_steady") is None else f"{s['ms_per_iter_steady']:.1f}"
        outputs = "-" if s.get("outputs_s") is None else f"{s['outputs_s']:.1f}"
        lines.append(f"{name:18s} {s['iters']:6d} {s['wall_s']:8.1f} {s['ms_per_iter']:8.1f} {steady:>7s} "
                     f"{s.get('outside_loop_s', 0.0):15.1f} {outputs:>12s} {peak:>9s}")
    for name, s in r["stages"].items():
        if s.get("above_steady_s") is not None:
            lines.append(f"{name}: the loop took {s['above_steady_s']:.1f} s above its steady pace (its first "
                         f"iterations: compiling, CUDA-graph captures, the priors' first calls)")
    for name, s in r["stages"].items():
        if s.get("faces_steady_median") is not None:
            lines.append(f"{name}: a mesh of {s['faces_steady_median']:,} faces over the steady iterations "
                         f"(median; {s['faces_last']:,} at the end)")
        if s.get("samples_steady_median") is not None:
            lines.append(f"{name}: {s['samples_steady_median']:,} samples evaluated a render over the steady "
                         f"iterations (median; {s['samples_last']:,} at the end)")
    for name, s in r["stages"].items():
        c = s.get("clocks") or {}
        if c.get("busy_samples"):
            lines.append(f"{name}: while the GPU was busy, SM {c['sm_mhz_median']:.0f} MHz and {c['power_w_median']:.0f} W "
                         f"(medians), the power cap holding the clocks in {100 * c['power_capped_share']:.0f}% of "
                         f"{c['busy_samples']} samples")
        elif c.get("samples"):
            lines.append(f"{name}: the GPU under 50% busy in all {c['samples']} samples of its clocks")
    lines += [compile_line(name, s["compiles"]) for name, s in r["stages"].items() if s.get("compiles")]
    ahead = (r["stages"].get("textual_inversion") or {}).get("compile_ahead")
    if ahead and "error" in ahead:
        lines.append(f"compile ahead (beside the textual inversion): failed, {ahead['error']}")
    elif ahead:
        lines.append(f"compile ahead (beside the textual inversion): the coarse stage's first {ahead['guided_iterations']} "
                     f"guided iterations in {ahead['seconds']:.1f} s, peak {ahead['peak_gib']:.2f} GiB; the textual "
                     f"inversion waited {ahead['waited_s']:.1f} s for it")
        if ahead.get("compiles"):
            lines.append(compile_line("  its compiles", ahead["compiles"]))
    if "asset_seconds" in r:
        lines.append(f"whole asset: {r['asset_seconds']:.1f} s" + (f" ({r['asset_seconds_note']})"
                                                                 if r.get("asset_seconds_note") else ""))
    else:
        lines.append(f"whole asset: not yet (this run: {', '.join(r.get('stages_this_run') or r['stages'])}; "
                     f"the rest with --stages into the same --out)")
    return "\n".join(lines)
