"""What a long step cost: seconds, iterations per second and peak memory, as one record and one line.

Every step that runs for long (prepare, textual inversion, the coarse and fine stages with their
exports) ends with `summary_line` printed (logged at INFO, which the CLI shows) and the same numbers
in the step's record file (result.json, prepare.json). Peak memory: on a GPU, PyTorch's
`max_memory_allocated` since the step began (the step resets the counter); on a CPU, the process's
maximum resident set size (`resource.getrusage`), which the OS keeps for the process's whole life —
so within a benchmark of many assets it is the largest of this step and every step before it in the
same process, and says so (`memory_kind`).
"""
from __future__ import annotations

import contextlib
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import torch


_CONSTANTS: dict = {}


def device_constant(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant tensor, copied to `device` once and kept (a fresh torch.tensor(…, device=cuda)
    each call is a host → GPU copy that waits for the GPU's queue). Read-only: do not write to it."""
    key = (tuple(map(tuple, values)) if isinstance(values[0], (tuple, list)) else tuple(values), dtype, str(device))
    t = _CONSTANTS.get(key)
    if t is None:
        t = _CONSTANTS[key] = torch.tensor(values, dtype=dtype, device=device)
    return t


# torch.compile'd twins of pure tensor functions (fine.compile, coarse.compile), built on first use
_COMPILED: dict = {}


def compiled_twin(fn, on: bool, dynamic: Optional[bool] = None):
    """`fn` itself, or (on) its torch.compile'd twin, built once a process. Inductor fuses each into a
    few kernels forward and backward where eagerly every operation is a kernel the host launches.
    Without gradients (a stage's output views, the texture's bake, the turntable) `fn` itself: a few
    renders at new sizes gain less than compiling their inference graphs costs (seconds a graph).
    `dynamic`: torch.compile's, True for inputs whose length changes every call."""
    if not (on and torch.is_grad_enabled()):
        return fn
    c = _COMPILED.get(fn)
    if c is None:
        c = _COMPILED[fn] = torch.compile(fn, dynamic=dynamic)
    return c


class GraphedCall:
    """`fn(*tensors) -> tensor(s)` replayed as one CUDA graph per input signature (shapes, dtypes,
    devices): the first call of a signature runs `fn` a few times on a side stream (its compiling,
    autotuning and cuBLAS's workspaces happen there), then captures one call; every call copies its
    inputs into the graph's and replays it, so the host issues a few copies and one launch for all
    of `fn`'s kernels, with no Python, Dynamo guard or allocator work in between.
    `fn` must be capturable: no host sync, no host → device copy, no randomness of its own.
    Without gradients unless `grad` (then `fn` may run a backward inside, torch.autograd.grad: the
    gradients it returns are outputs like any other). Other threads may use the GPU meanwhile (the
    capture checks this thread's calls only).
    The outputs live in the graph's memory and the next replay overwrites them: use them (or clone
    them) before the next call. GPU only; on the CPU it calls `fn`."""

    def __init__(self, fn, warmup: int = 3, grad: bool = False):
        self.fn, self.warmup, self.grad = fn, int(warmup), bool(grad)
        self.graphs: dict = {}

    def __call__(self, *args: torch.Tensor):
        with torch.set_grad_enabled(self.grad and torch.is_grad_enabled()):
            if not args[0].is_cuda:
                return self.fn(*args)
            key = self._key(args)
            with torch.cuda.device(args[0].device):  # capture and replay on the inputs' GPU
                entry = self.graphs.get(key)
                if entry is None:  # its warm-ups and capture are no step's time (SCOPE_TIMES)
                    with untimed():
                        entry = self.graphs[key] = self._capture(args)
                graph, static, out = entry
                for buf, a in zip(static, args):
                    buf.copy_(a)
                graph.replay()
            return out

    def ready(self, *args: torch.Tensor) -> bool:
        """Whether a call with `args` replays a graph captured before (no warm-ups, no capture)."""
        return self._key(args) in self.graphs

    @staticmethod
    def _key(args) -> tuple:
        return tuple((tuple(a.shape), a.dtype, a.device) for a in args)

    def _capture(self, args):
        """Warm `fn` up on a side stream with copies of `args`, then capture it: (graph, inputs, outputs)."""
        static = [a.detach().clone() for a in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = self.fn(*static)
        return graph, static, out


def inductor_missing(have_triton: Optional[bool] = None, have_cc: Optional[bool] = None) -> str:
    """Why Inductor cannot build its GPU kernels here ('' where it can): Triton must import and a C
    compiler be on PATH (for Triton's launchers). `have_*` stand in for the tests (tests/test_priors.py)."""
    if have_triton is None:
        from core.representations.hashgrid import triton_available  # the hash grid's own test: it imports

        have_triton = triton_available()
    if have_cc is None:
        import os
        import shutil
        have_cc = any(shutil.which(c) for c in (os.environ.get("CC") or "cc", "gcc", "clang") if c)
    return "" if have_triton and have_cc else ("no triton" if not have_triton else "no C compiler on PATH")


def compile_kind(mode: str, device, key: str = "fine.compile") -> str:
    """What a renderer's compile setting `key` (auto | none | default; fine.compile, coarse.compile)
    comes to on `device`: 'none' off a GPU; 'auto' is 'default' where Inductor can build its kernels
    (`inductor_missing`), else 'none'."""
    if mode not in ("auto", "none", "default"):
        raise ValueError(f"unknown {key} {mode!r} (auto | none | default)")
    if mode == "none" or torch.device(device).type != "cuda":
        return "none"
    return "default" if mode == "default" or not inductor_missing() else "none"


# the file each compile cache path last held as this process read or wrote it (sha256), so that a
# process loads a file once and rewrites it only with something new
_COMPILE_CACHES: dict[str, str] = {}


def _cache_key(path: Path | str) -> tuple[Path, str]:
    p = Path(path).expanduser()
    return p, str(p.resolve())


# the compile cache file (models.compile_cache): a zip (stored, not compressed) of torch's portable artifacts
# and the Triton kernels they and lift3d's own kernels compiled to; before session 41 the file was torch's
# bytes alone, which load_compile_cache still reads
_TORCH_MEMBER = "torch_cache_artifacts.bin"
_TRITON_MEMBERS = "triton/"
# lift3d's own Triton kernels (launched by lift3d, outside torch.compile: no torch cache carries them)
_TRITON_MODULES = ("core.representations.hashgrid_triton", "core.representations.samples_triton",
                   "core.rendering.coverage_triton", "core.guidance.group_norm_triton")


def lift3d_kernel_names() -> set[str]:
    """The names of lift3d's Triton kernels (their @triton.jit functions), empty without Triton."""
    import importlib

    names: set[str] = set()
    for mod in _TRITON_MODULES:
        try:
            m = importlib.import_module(mod)
        except Exception:  # noqa: BLE001 — no Triton here: no kernels of ours either
            continue
        names.update(v.fn.__name__ for v in vars(m).values()
                     if type(v).__name__ == "JITFunction" and hasattr(v, "fn"))
    return names


def _kernel_name(entry: Path) -> Optional[str]:
    """The kernel a folder of Triton's cache holds (its metadata `NAME.json`), None for anything else."""
    names = [f.stem for f in entry.glob("*.json") if not f.name.startswith("__grp__")]
    return names[0] if len(names) == 1 else None


def _carried_kernels() -> dict[str, Path]:
    """Triton's cache folders worth carrying: Inductor's kernels (named triton_…) and lift3d's, by hash."""
    ours = lift3d_kernel_names()
    found: dict[str, Path] = {}
    for d in triton_cache_dirs():
        if not d.is_dir():
            continue
        for entry in sorted(d.iterdir()):
            name = _kernel_name(entry) if entry.is_dir() else None
            if name and (name.startswith("triton_") or name in ours):
                found.setdefault(entry.name, entry)
    return found


def _triton_home() -> Path:
    """Where carried kernels go: TRITON_CACHE_DIR, set first (to the folder Inductor would set it to) where
    it is not, so that lift3d's kernels, Inductor's and Triton all look in one place."""
    import os

    if not os.environ.get("TRITON_CACHE_DIR"):
        from torch._inductor.runtime.cache_dir_utils import triton_cache_dir

        os.environ["TRITON_CACHE_DIR"] = triton_cache_dir(torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return Path(os.environ["TRITON_CACHE_DIR"])


def _unpack_kernels(zf, home: Path) -> int:
    """The carried kernels' folders written under `home` (those it lacks); each group file's paths, which
    Triton writes absolute, pointed at the new folder. The kernels written."""
    import json
    import shutil

    written = 0
    entries: dict[str, list] = {}
    for info in zf.infolist():
        if info.filename.startswith(_TRITON_MEMBERS) and not info.is_dir():
            entry, _, name = info.filename[len(_TRITON_MEMBERS):].partition("/")
            entries.setdefault(entry, []).append((name, info))
    for entry, files in entries.items():
        target = home / entry
        if target.exists() or entry in ("", ".", ".."):
            continue
        tmp = home / f".{entry}.part"  # the folder appears whole or not at all
        try:
            tmp.mkdir(parents=True, exist_ok=True)
            for name, info in files:
                data = zf.read(info)
                if name.startswith("__grp__"):
                    grp = json.loads(data)
                    grp["child_paths"] = {k: str(target / Path(v).name) for k, v in grp.get("child_paths", {}).items()}
                    data = json.dumps(grp).encode()
                (tmp / Path(name).name).write_bytes(data)
            tmp.rename(target)
            written += 1
        except OSError:  # another process put it there first, or no room: Triton compiles it as without
            pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return written


def load_compile_cache(path: Path | str) -> bool:
    """torch.compile's portable artifacts (torch.compiler's "mega-cache": Inductor's compiled graphs and
    kernels, AOTAutograd's, the autotuner's) read from `path` into this process's compile caches, and the
    Triton kernels carried with them into Triton's cache (`_triton_home`), once a process
    (models.compile_cache; `bench speed --compile-cache`). False where there is no such file yet. A file
    this torch cannot read (another version's) is skipped with a warning: the run compiles as it would
    without it. It carries the compiles to a machine whose own caches are empty, of the same GPU and
    software: a cold process spends ~100–200 s of a stage compiling (reports/speed: the coarse stage
    157.0 s above its steady pace cold in session 41, 35.3 s with its caches warm in session 40; torch's
    artifacts alone took 17 s of it off)."""
    import hashlib
    import io
    import logging
    import zipfile

    p, key = _cache_key(path)
    if key in _COMPILE_CACHES:
        return True
    if not p.is_file():
        return False
    data = p.read_bytes()
    kernels = 0
    try:
        if zipfile.is_zipfile(io.BytesIO(data)):
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                artifacts = zf.read(_TORCH_MEMBER)
                if any(n.startswith(_TRITON_MEMBERS) for n in zf.namelist()):
                    kernels = _unpack_kernels(zf, _triton_home())
        else:
            artifacts = data  # torch's bytes alone (the file before session 41)
        why = "" if torch.compiler.load_cache_artifacts(artifacts) is not None else "not torch's format, or torn"
    except Exception as e:  # noqa: BLE001 — an unusable cache is a slower run, not a failed one
        why = f"{type(e).__name__}: {e}"
    if why:
        logging.getLogger(__name__).warning("compile cache %s not loaded (%s); compiling as without it", p, why)
        return False
    _COMPILE_CACHES[key] = hashlib.sha256(data).hexdigest()
    logging.getLogger(__name__).info("compile cache: %s loaded (%.1f MB; %d Triton kernels new here)", p,
                                     len(data) / 1e6, kernels)
    return True


def _zip_member(zf, name: str, data: bytes) -> None:
    import zipfile

    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))  # the same bytes for the same contents
    info.compress_type = zipfile.ZIP_STORED
    zf.writestr(info, data)


def save_compile_cache(path: Path | str) -> int:
    """What this process compiled or found in its caches (torch.compiler.save_cache_artifacts), with the
    Triton kernels in Triton's caches (`_carried_kernels`), written to `path` at once (core.io.atomic_write_bytes:
    workers that share the file never leave it torn); the bytes written, 0 where nothing was compiled or
    the file already holds exactly this."""
    import hashlib
    import io
    import zipfile

    from core.io import atomic_write_bytes

    saved = torch.compiler.save_cache_artifacts()
    if not saved or not saved[0]:
        return 0
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        _zip_member(zf, _TORCH_MEMBER, saved[0])
        for entry_name, entry in sorted(_carried_kernels().items()):
            for f in sorted(entry.iterdir()):
                if f.is_file() and f.name != "lock":
                    _zip_member(zf, f"{_TRITON_MEMBERS}{entry_name}/{f.name}", f.read_bytes())
    data = buf.getvalue()
    p, key = _cache_key(path)
    digest = hashlib.sha256(data).hexdigest()
    if _COMPILE_CACHES.get(key) == digest:
        return 0
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(p, data)
    _COMPILE_CACHES[key] = digest
    return len(data)


@contextlib.contextmanager
def compile_cache(path: Path | str | None):
    """A stage's compiles read from and written back to `path` (models.compile_cache): loaded before
    (once a process), saved after the stage ends well; nothing where `path` is None."""
    if path is None:
        yield
        return
    load_compile_cache(path)
    yield
    save_compile_cache(path)


def triton_cache_dirs() -> list[Path]:
    """The folders Triton's compiled kernels may go to in this process: TRITON_CACHE_DIR when set (Inductor
    sets it to its own cache's triton/ the first time it loads a kernel of its own) and Triton's default
    (~/.triton/cache, or what its knobs say). A kernel compiled is one new folder, named by its hash."""
    import os

    dirs = [os.environ.get("TRITON_CACHE_DIR")]
    try:
        from triton import knobs

        dirs.append(knobs.cache.dir)
    except (ImportError, AttributeError):
        dirs.append(str(Path.home() / ".triton" / "cache"))
    return list(dict.fromkeys(Path(d) for d in dirs if d))


def _cache_entries(dirs: list[Path]) -> set[str]:
    import os

    seen: set[str] = set()
    for d in dirs:
        with contextlib.suppress(OSError):
            seen.update(f"{d}/{name}" for name in os.listdir(d))
    return seen


# torch's compile counters a stage's record takes (torch._dynamo.utils.counters: group, key), and its
# compile timers (compilation_time_metrics): Dynamo's compile of a frame (the forward's Inductor compile
# inside it), the backward's compile (at a compiled function's first backward, outside the frame's), and
# Inductor's share of both
_COMPILE_COUNTERS = {
    "frames": ("frames", "ok"), "graphs": ("stats", "unique_graphs"),
    "inductor_cache_hit": ("inductor", "fxgraph_cache_hit"), "inductor_cache_miss": ("inductor", "fxgraph_cache_miss"),
    "inductor_cache_bypass": ("inductor", "fxgraph_cache_bypass"),
    "aot_cache_hit": ("aot_autograd", "autograd_cache_hit"), "aot_cache_miss": ("aot_autograd", "autograd_cache_miss"),
    "aot_cache_bypass": ("aot_autograd", "autograd_cache_bypass"),
}
_COMPILE_TIMERS = {"dynamo_s": "_compile.compile_inner", "backward_s": "compile_fx.<locals>.bw_compiler",
                   "inductor_s": "compile_fx_inner"}
# the loggers that say why a graph could not be cached (at INFO: "Bypassing FX Graph Cache because …")
_BYPASS_LOGGERS = ("torch._inductor.codecache", "torch._functorch._aot_autograd.autograd_cache")


def _guard_failures() -> dict:
    """Dynamo's guard failures so far, by code object: why each recompile happened ({} where this torch keeps none)."""
    from torch._dynamo import utils

    return dict(getattr(utils, "guard_failures", {}))


class CompileLedger:
    """What torch.compile and Triton did while the block ran: frames and graphs compiled, Inductor's and
    AOTAutograd's cache hits, misses and bypasses (with the bypasses' reasons), why a function already
    compiled was compiled again (Dynamo's failed guards, by function), the seconds Dynamo and
    Inductor spent, and the Triton kernels compiled anew (new folders in Triton's caches: Inductor's
    kernels and lift3d's own, which no torch cache carries). `record` after the block: only what
    changed, {} where nothing compiled (a CPU run with compiling off, a warm process)."""

    def __enter__(self):
        import logging

        from torch._dynamo.utils import compilation_time_metrics, counters

        self._counters = {k: counters[g][c] for k, (g, c) in _COMPILE_COUNTERS.items()}
        self._timers = {k: sum(compilation_time_metrics.get(m, ())) for k, m in _COMPILE_TIMERS.items()}
        self._dirs = triton_cache_dirs()
        self._kernels = _cache_entries(self._dirs)
        self._failures = {code: len(r) for code, r in _guard_failures().items()}
        self.reasons: dict[str, int] = {}
        self._loggers = []
        for name in _BYPASS_LOGGERS:  # INFO let through to this filter alone: the rest still see what they saw
            lg = logging.getLogger(name)
            self._loggers.append((lg, lg.level, self._filter(lg.getEffectiveLevel())))
            lg.addFilter(self._loggers[-1][2])
            lg.setLevel(min(lg.getEffectiveLevel(), logging.INFO))
        self.record: dict = {}
        return self

    def _filter(self, level: int):
        def keep(rec) -> bool:
            msg = rec.getMessage()
            if msg.startswith("Bypassing"):
                self.reasons[msg[:200]] = self.reasons.get(msg[:200], 0) + 1
            return rec.levelno >= level

        return keep

    def __exit__(self, *exc):
        from torch._dynamo.utils import compilation_time_metrics, counters

        for lg, level, keep in self._loggers:
            lg.removeFilter(keep)
            lg.setLevel(level)
        rec = {k: counters[g][c] - self._counters[k] for k, (g, c) in _COMPILE_COUNTERS.items()}
        rec = {k: v for k, v in rec.items() if v}
        secs = {k: round(sum(compilation_time_metrics.get(m, ())) - self._timers[k], 1) for k, m in _COMPILE_TIMERS.items()}
        rec.update({k: v for k, v in secs.items() if v > 0})
        dirs = list(dict.fromkeys([*self._dirs, *triton_cache_dirs()]))
        new = len(_cache_entries(dirs) - self._kernels)
        if new:
            rec["triton_kernels"] = new
        if self.reasons:
            rec["bypassed_because"] = self.reasons
        recompiles: dict[str, int] = {}
        for code, reasons in _guard_failures().items():
            for why in reasons[self._failures.get(code, 0):]:
                what = f"{getattr(code, 'co_name', code)}: {str(why).splitlines()[0][:200]}"
                recompiles[what] = recompiles.get(what, 0) + 1
        if recompiles:
            rec["recompiled_because"] = dict(sorted(recompiles.items(), key=lambda kv: -kv[1])[:12])
        self.record = rec
        return False


def compile_line(name: str, rec: dict) -> str:
    """One line of what a stage compiled (CompileLedger.record), for a bench's table."""
    secs = rec.get("dynamo_s", 0.0) + rec.get("backward_s", 0.0)
    caches = [f"Inductor's cache {rec.get('inductor_cache_hit', 0)} hit / {rec.get('inductor_cache_miss', 0)} missed"
              f" / {rec.get('inductor_cache_bypass', 0)} bypassed",
              f"AOTAutograd's {rec.get('aot_cache_hit', 0)} / {rec.get('aot_cache_miss', 0)} / {rec.get('aot_cache_bypass', 0)}"]
    line = (f"{name}: compiled {rec.get('graphs', 0)} graphs in {secs:.1f} s (Inductor {rec.get('inductor_s', 0.0):.1f} s"
            f" of it; {', '.join(caches)}), {rec.get('triton_kernels', 0)} Triton kernels new to its caches")
    for why, n in (rec.get("bypassed_because") or {}).items():
        line += f"\n  {n}× {why}"
    for why, n in (rec.get("recompiled_because") or {}).items():
        line += f"\n  {n}× recompiled, {why}"
    return line


def _allow_tf32(m) -> bool:
    """The cuBLAS fp32 matmuls' TF32 setting, read through whichever API set it (torch refuses the old
    flag's read once the new `fp32_precision` has set a different value)."""
    try:
        return bool(m.allow_tf32)
    except RuntimeError:
        return getattr(m, "fp32_precision", "") == "tf32"


@contextlib.contextmanager
def _tf32_setting(allow: bool):
    """torch.backends.cuda.matmul.allow_tf32 = `allow` inside the block; after it the setting exactly as
    before: the flag and, on a torch that has it (2.9+), `fp32_precision` too. Setting the flag back to
    False alone leaves `fp32_precision` 'ieee' where it was 'none' (nothing had set it): the same
    arithmetic, but a part of every Inductor FX-graph cache key, so that each graph compiled after the
    block missed what a process that never entered it had compiled (session 42, one H200: every graph
    of the coarse and fine stages after the textual inversion's TF32 steps, against the side process's
    compiles of them)."""
    m = torch.backends.cuda.matmul
    before, precision = _allow_tf32(m), getattr(m, "fp32_precision", None)
    m.allow_tf32 = allow
    try:
        yield
    finally:
        m.allow_tf32 = before
        if precision is not None:
            m.fp32_precision = precision


def tf32_matmuls(on: bool = True):
    """fp32 matmuls on the tensor cores in TF32 inside the block (`on`; off, the process's setting
    stands), the process's setting again after it. Only what runs inside is affected: a step whose
    forward and backward both run in the block (the textual inversion's) has both in TF32."""
    return _tf32_setting(bool(on) or _allow_tf32(torch.backends.cuda.matmul))


def to_device(t: torch.Tensor, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`t` on `device` (and `dtype`). A host tensor going to a GPU is copied with non_blocking: the
    copy of a few numbers need not wait for the GPU's queue (pageable memory is staged at once, so
    the source may change afterwards). Other directions block as usual: a non_blocking copy to the
    host would land in pinned memory and could be read before the GPU wrote it."""
    device = torch.device(device)
    fast = t.device.type == "cpu" and device.type != "cpu"
    return t.to(device=device, dtype=dtype or t.dtype, non_blocking=fast)


def reset_peak_memory(device: torch.device | str) -> None:
    """Start the GPU's peak-memory counter afresh (nothing to do on a CPU)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device | str) -> tuple[float, str]:
    """(GiB, kind): the GPU's max allocated memory, or the process's max RSS on a CPU."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / 2**30, "GPU max allocated"
    try:
        import resource
    except ImportError:  # not on POSIX
        return float("nan"), "unknown"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes
    return (rss / 2**30 if sys.platform == "darwin" else rss / 2**20), "process max RSS"


def summary(device: torch.device | str, seconds: float, iterations: Optional[int] = None,
            **extra: float) -> dict:
    """The record: seconds, iterations, it_per_s (None without iterations), peak_memory_gib, memory_kind."""
    gib, kind = peak_memory(device)
    rec: dict = {"seconds": round(float(seconds), 3), "iterations": iterations,
                 "it_per_s": (round(iterations / seconds, 4) if iterations and seconds > 0 else None),
                 "peak_memory_gib": round(gib, 3), "memory_kind": kind}
    rec.update({k: (round(v, 3) if isinstance(v, float) else v) for k, v in extra.items()})
    return rec


def summary_line(step: str, rec: dict) -> str:
    """'coarse: 300 iterations in 612.3 s (0.49 it/s), outputs 35.2 s, peak memory 2.31 GiB (process max RSS)'."""
    parts = [f"{rec['iterations']} iterations in {rec['seconds']:.1f} s ({rec['it_per_s']:.2f} it/s)"
             if rec.get("iterations") else f"{rec['seconds']:.1f} s"]
    if rec.get("outputs_seconds") is not None:
        parts.append(f"outputs {rec['outputs_seconds']:.1f} s")
    parts.append(f"peak memory {rec['peak_memory_gib']:.2f} GiB ({rec['memory_kind']})")
    return f"{step}: " + ", ".join(parts)


class Timer:
    """Seconds since it was made (time.perf_counter)."""

    def __init__(self):
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0


# The card's clocks while a stage runs (issue 15, session 30: the textual inversion's step held by the
# H200's power cap, not by its host): nvidia-smi's samples, read back as rows and summed up.
SMI_QUERY = "timestamp,clocks.sm,power.draw,utilization.gpu,clocks_event_reasons.active"
SW_POWER_CAP = 0x4  # nvmlClocksEventReasonSwPowerCap: the clocks held down to keep to the power limit


def smi_id(device) -> Optional[str]:
    """nvidia-smi's name ('GPU-' and the UUID) of a CUDA device, whatever CUDA_VISIBLE_DEVICES makes of
    its index; None off a GPU."""
    import uuid

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return f"GPU-{uuid.UUID(bytes=bytes(torch.cuda.get_device_properties(device).uuid.bytes))}"


class GpuClocks:
    """nvidia-smi's SM clock, power draw, utilisation and clock-event reasons of `device`, every
    `every_ms`, while the block runs (a process of its own: no Python of this one's); after it
    `rows` (read_smi) and `summary` (clock_summary), both None off a GPU, without nvidia-smi, or
    when it gave nothing (an older driver, which names the reasons otherwise). The CSV is kept at
    `path` when given."""

    def __init__(self, device, path: Optional[Path] = None, every_ms: int = 250):
        self.device, self.path, self.every_ms = torch.device(device), path, int(every_ms)
        self.rows: Optional[list] = None
        self.summary: Optional[dict] = None
        self._proc, self._temporary = None, path is None

    def __enter__(self):
        import os
        import shutil
        import subprocess
        import tempfile

        gpu = smi_id(self.device)
        exe = shutil.which("nvidia-smi")
        if gpu is None or exe is None:
            return self
        if self._temporary:
            fd, name = tempfile.mkstemp(prefix="lift3d-clocks-", suffix=".csv")
            os.close(fd)
            self.path = Path(name)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._out = self.path.open("w")
        try:
            self._proc = subprocess.Popen([exe, f"--query-gpu={SMI_QUERY}", "--format=csv", f"-lms={self.every_ms}",
                                           "-i", gpu], stdout=self._out, stderr=subprocess.DEVNULL)
        except OSError:
            self._out.close()
        return self

    def __exit__(self, *exc):
        if self._proc is None:
            return False
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except Exception:  # noqa: BLE001 - a sampler that will not stop must not fail the stage
            self._proc.kill()
        self._out.close()
        try:
            self.rows = read_smi(self.path)
        except (OSError, ValueError, StopIteration):  # nothing, or not the query's columns
            self.rows = None
        self.summary = clock_summary(self.rows) if self.rows else None
        if self._temporary:
            self.path.unlink(missing_ok=True)
        return False


def read_smi(path: Path) -> list[dict]:
    """nvidia-smi's --format=csv log → rows of t (s from the first), sm_mhz, power_w, util (%), reasons
    (the clock-event bits), by the header's names (any other columns are ignored)."""
    import csv
    from datetime import datetime

    def number(v: str) -> float:
        return float(v.strip().split()[0])

    with Path(path).open() as f:
        rows = [[c.strip() for c in r] for r in csv.reader(f) if r]
    if not rows:
        return []
    head, rows = rows[0], [r for r in rows[1:] if len(r) == len(rows[0])]
    col = {name: next(i for i, h in enumerate(head) if h.split(" [")[0] in names)
           for name, names in (("t", ("timestamp",)), ("sm_mhz", ("clocks.current.sm", "clocks.sm")),
                               ("power_w", ("power.draw",)), ("util", ("utilization.gpu",)),
                               ("reasons", ("clocks_event_reasons.active", "clocks_throttle_reasons.active")))}
    out = []
    for r in rows:
        t = datetime.strptime(r[col["t"]], "%Y/%m/%d %H:%M:%S.%f").timestamp()
        out.append({"t": t, "sm_mhz": number(r[col["sm_mhz"]]), "power_w": number(r[col["power_w"]]),
                    "util": number(r[col["util"]]), "reasons": int(r[col["reasons"]], 16)})
    t0 = out[0]["t"] if out else 0.0
    for o in out:
        o["t"] = round(o["t"] - t0, 3)
    return out


def clock_summary(rows: list[dict], busy: float = 50.0) -> dict:
    """What the card did while busy (utilisation ≥ `busy` %): all the samples and the busy ones, the
    median SM clock, power and utilisation, and the share of those samples with the power cap holding
    the clocks down. A stage whose GPU never reached `busy` (tiny priors, for one) has only
    the counts."""
    import statistics

    on = [r for r in rows if r["util"] >= busy]
    if not on:
        return {"samples": len(rows), "busy_samples": 0}
    return {"samples": len(rows), "busy_samples": len(on), "sm_mhz_median": statistics.median(r["sm_mhz"] for r in on),
            "power_w_median": round(statistics.median(r["power_w"] for r in on), 1),
            "util_median": statistics.median(r["util"] for r in on),
            "power_capped_share": round(sum(bool(r["reasons"] & SW_POWER_CAP) for r in on) / len(on), 3)}


# Where a step's time goes. Each part of a step runs in a named scope: a torch.profiler range, and
# when SCOPE_TIMES is a dict (bench speed --profile sets it), also timed with the device synchronised
# around it, so that a run's seconds per part add up without the profiler's overhead.
SCOPE_TIMES: Optional[dict] = None


_UNTIMED = threading.local()


@contextlib.contextmanager
def untimed():
    """This thread's scopes inside the block are profiler ranges only, never in SCOPE_TIMES."""
    before = getattr(_UNTIMED, "on", False)
    _UNTIMED.on = True
    try:
        yield
    finally:
        _UNTIMED.on = before


class scope:
    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.rf = torch.profiler.record_function(self.name)
        self.rf.__enter__()
        # not timed in a CUDA graph's warm-ups and capture (`untimed`): they are no step's time, and a
        # sync would end the capture
        self.timed = SCOPE_TIMES is not None and not getattr(_UNTIMED, "on", False)
        if self.timed:
            _device_sync()
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.timed and SCOPE_TIMES is not None:
            _device_sync()
            n, t = SCOPE_TIMES.get(self.name, (0, 0.0))
            SCOPE_TIMES[self.name] = (n + 1, t + time.perf_counter() - self.t0)
        self.rf.__exit__(*exc)
        return False


PROFILE_GROUPS = ("op", "shape", "stack")


def profiler_options(group: tuple[str, ...]) -> dict:
    """torch.profiler's keywords for the tables `group` asks for (profile_tables): input shapes for
    'shape', Python stacks for 'stack' (both cost the host time, so a window that records them does
    not run at the loop's pace). With 'stack', the experimental config's `verbose` too: without it
    torch.profiler keeps no operator's own stack (pytorch/pytorch#100253; session 36 found the GPU
    machine's torch 2.11 gives no Python events above its operators either, so the call-site table
    named none of the project's lines)."""
    unknown = [g for g in group if g not in PROFILE_GROUPS]
    if unknown or not group:
        raise ValueError(f"profile tables: {', '.join(unknown) or 'none given'} (choose from {', '.join(PROFILE_GROUPS)})")
    options = {"record_shapes": "shape" in group, "with_stack": "stack" in group}
    if "stack" in group:
        from torch._C._profiler import _ExperimentalConfig

        options["experimental_config"] = _ExperimentalConfig(verbose=True)
    return options


def profile_tables(prof, group: tuple[str, ...], key: str, rows: int = 30, steps: int = 1) -> str:
    """A finished profiler's tables, one after another: 'op' (operators and kernels by name), 'shape'
    (an operator by its inputs' shapes) and 'stack' (kernel_ms_by_call_site: by the lines of the
    project that called it): which call of an operator costs the time. Sorted by `key` (e.g.
    self_cuda_time_total; the 'stack' table by the device's time, the host's off a GPU, a step of
    `steps`)."""
    how = {"op": {}, "shape": {"group_by_input_shape": True}}
    return "\n\n".join((f"by {g}:\n" if len(group) > 1 else "")
                       + (kernel_ms_by_call_site(prof.events(), steps, rows=rows) if g == "stack" else
                          prof.key_averages(**how[g]).table(sort_by=key, row_limit=rows, max_name_column_width=60,
                                                            max_shapes_column_width=90)) for g in group)


def profile_table(fn, device: torch.device, rows: int = 30, events: Optional[list] = None,
                  group: tuple[str, ...] = ("op",), steps: int = 1) -> str:
    """torch.profiler's tables (profile_tables, `group`) for running `fn()` once on `device`: operators
    and kernels by their own device time (CPU time off a GPU), the `rows` largest, with the scopes
    above as ranges. `events`: a list the profiler's events are appended to (for `kernel_ms_by_scope`,
    `gpu_idle`). `steps`: the iterations `fn` runs (the 'stack' table's times are a step's)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []),
                 **profiler_options(group)) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize(device)
    if events is not None:
        events.extend(prof.events())
    return profile_tables(prof, group, "self_cuda_time_total" if cuda else "self_cpu_time_total", rows, steps)


def _top_level(e) -> bool:
    """A profiler event with no aten operator above it: one the host dispatched itself."""
    parent = e.cpu_parent
    while parent is not None and not parent.name.startswith("aten::"):
        parent = parent.cpu_parent
    return parent is None


def _scope_at(events, prefix: str):
    """A function of a time: the innermost `prefix` scope open on the host then (on any thread), or
    "(outside the scopes)". The profiler also mirrors the scopes on the device's timeline: not those."""
    from torch.autograd import DeviceType

    spans = sorted(((e.time_range.start, e.time_range.end, e.name) for e in events
                    if e.name.startswith(prefix) and e.device_type == DeviceType.CPU), key=lambda s: (s[0], -s[1]))

    def where(t: float) -> str:
        inner = [s for s in spans if s[0] <= t <= s[1]]
        return min(inner, key=lambda s: s[1] - s[0])[2] if inner else "(outside the scopes)"

    return where


def ops_by_scope(events, steps: int, prefix: str = "lift3d.") -> str:
    """How many operators each scope dispatched a step, from torch.profiler's `events()`: every aten
    operator called from outside another aten operator (what the host dispatched), and every GPU
    kernel the profiler tied to an operator at any depth, each counted under the innermost `prefix`
    scope whose time span holds the operator's start (the autograd engine runs the backward on
    another thread, outside the scope's record_function stack). A loop that waits on its host is
    made faster by fewer of these, not by faster kernels."""
    from collections import Counter

    where = _scope_at(events, prefix)
    ops, kernels, names = Counter(), Counter(), {}
    for e in events:
        if not e.name.startswith("aten::"):
            continue
        w = where(e.time_range.start)
        kernels[w] += len(getattr(e, "kernels", []) or [])  # a kernel is tied to the innermost operator
        if not _top_level(e):  # called by another aten operator: not a dispatch of the loop's own
            continue
        ops[w] += 1
        names.setdefault(w, Counter())[e.name] += 1
    steps = max(int(steps), 1)
    lines = [f"{'scope':24s} {'ops/step':>9s} {'kernels/step':>13s}  most called (a step)"]
    for w, n in ops.most_common():
        top = ", ".join(f"{k.removeprefix('aten::')} {v / steps:.0f}" for k, v in names[w].most_common(6))
        lines.append(f"{w:24s} {n / steps:9.0f} {kernels[w] / steps:13.0f}  {top}")
    return "\n".join(lines)


def kernel_ms_by_scope(events, steps: int, prefix: str = "lift3d.") -> dict:
    """The device's kernel time a step (ms) by the innermost `prefix` scope open on the host when the
    kernel's launching event began (as `ops_by_scope` places operators: the backward's, launched by
    the autograd engine's thread, fall in the scope around `backward()`), from torch.profiler's live
    `events()`: each kernel is tied to the one host event that launched it (an aten operator, or a
    compiled graph's Triton launch), so none is counted twice. Kernels on other streams count too
    (where several streams run at once the sum can exceed the step). {scope: ms}, largest first."""
    from collections import Counter

    from torch.autograd import DeviceType

    where = _scope_at(events, prefix)
    us: Counter = Counter()
    for e in events:
        ks = getattr(e, "kernels", None) or []
        if e.device_type == DeviceType.CPU and ks:
            us[where(e.time_range.start)] += sum(float(k.duration) for k in ks)
    steps = max(int(steps), 1)
    return {k: round(v / 1000.0 / steps, 2) for k, v in us.most_common()}


def _own_frame(name: str) -> bool:
    """A Python frame ("path/file.py(line): function") of the project's, not torch's nor a library's."""
    if ".py(" not in name or "): " not in name:
        return False
    path = name.split("(", 1)[0]
    return not any(part in path for part in ("torch/", "site-packages/", "contextlib.py", "threading.py"))


def _frames(node, depth: int) -> list:
    """The innermost `depth` Python frames of the project's that called profiler event `node`, as
    "file.py(line): function", from the event's own stack (recorded with profiler_options' 'stack')."""
    stack = [f for f in (getattr(node, "stack", None) or []) if _own_frame(f)]
    return [f.rsplit("/", 1)[-1] for f in stack[:depth]]


def _call_site(e, depth: int, forward: dict) -> tuple[str, str]:
    """The outermost aten operator above (or at) profiler event `e`, and where it was called: the
    innermost `depth` Python frames of the project (_frames, innermost first, joined by " < "); for
    an operator of the backward (on a GPU the autograd engine's thread, with no Python above it),
    "backward of " the forward operator and its place (`forward`: (thread, sequence number) → the
    forward's event; the engine's node carries the forward's numbers), else "(the autograd engine)"."""
    op, node, fwd = None, e, None
    while node is not None:
        if node.name.startswith("aten::"):
            op = node.name
        elif fwd is None and getattr(node, "sequence_nr", -1) >= 0 and not node.name.startswith("autograd::"):
            fwd = forward.get((getattr(node, "fwd_thread", None), node.sequence_nr))
        node = node.cpu_parent
    if fwd is not None:
        return op or e.name, f"backward of {fwd.name.removeprefix('aten::')} at " + (" < ".join(_frames(fwd, depth)) or "?")
    frames = _frames(e, depth)
    return op or e.name, " < ".join(frames) if frames else "(the autograd engine)"


def kernel_ms_by_call_site(events, steps: int, depth: int = 3, rows: int = 30) -> str:
    """The device's kernel time a step by the operator the host dispatched and the project's lines
    that called it (`_call_site`, from torch.profiler's `events()` recorded with profiler_options'
    'stack': each operator's own Python stack). Each kernel is tied to the event that launched it, so
    none counts twice; a CPU-only profile has no kernels, and the operators' own host time counts
    instead. Where one operator is called from many places (index_select's gathers, say), this says
    which of them costs the time."""
    from collections import Counter

    from torch.autograd import DeviceType

    us: Counter = Counter()
    launches: Counter = Counter()
    any_kernels = any(getattr(e, "kernels", None) for e in events)
    forward = {(e.thread, e.sequence_nr): e for e in events  # the forward operators autograd numbered
               if e.name.startswith("aten::") and getattr(e, "sequence_nr", -1) >= 0 and _top_level(e)}
    for e in events:
        if e.device_type != DeviceType.CPU:
            continue
        ks = getattr(e, "kernels", None) or []
        if any_kernels:
            if not ks:
                continue
            t = sum(float(k.duration) for k in ks)
        else:  # off a GPU: each operator's own host time, where the operators are
            if not e.name.startswith("aten::"):
                continue
            t = float(e.self_cpu_time_total)
        key = _call_site(e, depth, forward)
        us[key] += t
        launches[key] += len(ks) if any_kernels else int(_top_level(e))
    steps = max(int(steps), 1)
    unit, count = ("device", "kernels/step") if any_kernels else ("host", "calls/step")
    lines = [f"{unit + ' ms/step':>14s} {count:>12s}  {'operator':34s} called from (innermost first)"]
    for (op, site), t in us.most_common(rows):
        lines.append(f"{t / 1000.0 / steps:14.3f} {launches[(op, site)] / steps:12.1f}  {op[:34]:34s} {site}")
    return "\n".join(lines)


def _merged(intervals: list) -> list:
    """Sorted, disjoint union of (start, end) intervals."""
    out: list = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def gpu_idle(events, steps: int, prefix: str = "lift3d.", top: int = 12) -> str:
    """Where the device waited on its host, from torch.profiler's `events()`: the gaps between the
    device's activities (kernels, copies, sets; those inside CUDA graphs too), over the window from
    its first activity to its last, a step. Each gap is charged (1) to the innermost `prefix` scope
    open on the host during it (split where scopes open or close inside it); (2) to the host's
    operators running during it: every aten operator called from outside another (on any thread: the
    backward's are on the autograd engine's), by how much of the gap it overlaps, the rest being the
    host's own Python and engine work; (3) to the innermost host event of any kind open during it (an
    operator, a runtime call such as cudaLaunchKernel or cudaStreamSynchronize, a compiled graph's
    call, a scope: the shortest open on any thread). Gaps shorter than 10 µs are the launch latency
    between queued kernels, counted apart. A loop whose device idles here is made faster by less host
    work in these places, not by faster kernels."""
    import bisect
    import heapq
    from collections import Counter

    from torch.autograd import DeviceType

    steps = max(int(steps), 1)
    host = [e for e in events if e.device_type == DeviceType.CPU]
    host_names = {e.name for e in host}

    def works(e) -> bool:  # a kernel, copy or set; not the host's ranges mirrored on the device
        # (ProfilerStep#, the scopes: user annotations) nor the device's side of a synchronisation.
        # A compiled graph's Triton kernel has a host range of its own name (Inductor's launcher):
        # it is work (until session 29 it was taken for a mirrored range, and a compiled step's
        # busy time came out short); were its mirror counted too, it covers the same span
        return (e.device_type != DeviceType.CPU and e.time_range.end > e.time_range.start
                and (e.name not in host_names or e.name.startswith("triton_"))
                and "Sync" not in e.name and "Wait" not in e.name
                and getattr(e, "activity_type", None) not in ("gpu_user_annotation", "cuda_sync"))

    busy = _merged([(e.time_range.start, e.time_range.end) for e in events if works(e)])
    if not busy:
        return "no device activity in the window"
    gaps = [(busy[i][1], busy[i + 1][0]) for i in range(len(busy) - 1) if busy[i + 1][0] > busy[i][1]]
    window = busy[-1][1] - busy[0][0]
    idle = sum(b - a for a, b in gaps)
    short = sum(b - a for a, b in gaps if b - a < 10.0)

    spans = [(e.time_range.start, e.time_range.end, e.name) for e in host if e.name.startswith(prefix)]
    cuts = sorted({t for s in spans for t in s[:2]})
    by_scope: Counter = Counter()
    for a, b in gaps:
        edges = [a] + cuts[bisect.bisect_right(cuts, a):bisect.bisect_left(cuts, b)] + [b]
        for u, v in zip(edges, edges[1:]):
            m = 0.5 * (u + v)
            inner = [s for s in spans if s[0] <= m <= s[1]]
            by_scope[min(inner, key=lambda s: s[1] - s[0])[2] if inner else "(outside the scopes)"] += v - u

    starts = [g[0] for g in gaps]

    def charge(intervals, into: Counter) -> list:  # (start, end, name) → overlaps with the gaps, by name
        hit = []
        for s, t, name in intervals:
            i = max(bisect.bisect_right(starts, s) - 1, 0)
            while i < len(gaps) and gaps[i][0] < t:
                o = min(t, gaps[i][1]) - max(s, gaps[i][0])
                if o > 0:
                    into[name] += o
                    hit.append((max(s, gaps[i][0]), min(t, gaps[i][1])))
                i += 1
        return hit

    by_op: Counter = Counter()
    ops = [(e.time_range.start, e.time_range.end, e.name) for e in host if e.name.startswith("aten::") and _top_level(e)]
    under_ops = sum(b - a for a, b in _merged(charge(ops, by_op)))

    # the innermost host event at each moment: a sweep over the events' ends, the shortest open one
    marks = sorted({t for e in host for t in (e.time_range.start, e.time_range.end)})
    order = sorted(host, key=lambda e: e.time_range.start)
    heap: list = []
    k = 0
    pieces = []
    for u, v in zip(marks, marks[1:]):
        while k < len(order) and order[k].time_range.start <= u:
            e = order[k]
            heapq.heappush(heap, (e.time_range.end - e.time_range.start, k, e.time_range.end, e.name))
            k += 1
        while heap and heap[0][2] <= u:  # ended events below the top wait until they surface (a lazy heap)
            heapq.heappop(heap)
        if heap:
            pieces.append((u, v, heap[0][3]))
    by_event: Counter = Counter()
    under_events = sum(b - a for a, b in _merged(charge(pieces, by_event)))

    ms = lambda us: us / 1000.0 / steps  # noqa: E731 - the events' times are µs
    lines = [f"device busy {ms(window - idle):.2f} ms a step, idle {ms(idle):.2f} ms in {len(gaps) / steps:.0f} gaps "
             f"(the window from its first activity to its last: {ms(window):.2f} ms a step); "
             f"{ms(short):.2f} ms of it in gaps under 10 µs",
             f"{'idle, by the scope open on the host':40s} {'ms/step':>8s}"]
    lines += [f"{k:40s} {ms(v):8.2f}" for k, v in by_scope.most_common()]
    lines.append(f"{'idle, by the host operator running':40s} {'ms/step':>8s}")
    lines += [f"{k.removeprefix('aten::'):40s} {ms(v):8.2f}" for k, v in by_op.most_common(top)]
    lines.append(f"{'(under no operator: Python, the engine)':40s} {ms(idle - under_ops):8.2f}")
    lines.append(f"{'idle, by the innermost host event':40s} {'ms/step':>8s}")
    lines += [f"{k[:40]:40s} {ms(v):8.2f}" for k, v in by_event.most_common(2 * top)]
    lines.append(f"{'(under no host event)':40s} {ms(idle - under_events):8.2f}")
    return "\n".join(lines)


def save_events(events, path: Path) -> None:
    """torch.profiler's `events()` as arrays in one compressed .npz (name, device type, thread,
    start and end in µs, the parent's row; a few MB for ten iterations), for reading the window
    again without the device: `load_events(path)` gives back what `gpu_idle` and `ops_by_scope` read."""
    import numpy as np

    from torch.autograd import DeviceType

    events = list(events)
    row = {id(e): i for i, e in enumerate(events)}
    names: dict = {}
    name_of = [names.setdefault(e.name, len(names)) for e in events]
    threads: dict = {}  # each thread by a small number: the Python tracer's ids (with_stack) pass int64's range
    thread_of = [threads.setdefault(int(getattr(e, "thread", 0) or 0), len(threads)) for e in events]
    np.savez_compressed(
        path, names=np.array(list(names), dtype=object).astype(str), name=np.array(name_of, dtype=np.int32),
        cpu=np.array([e.device_type == DeviceType.CPU for e in events]),
        thread=np.array(thread_of, dtype=np.int64),
        start=np.array([e.time_range.start for e in events], dtype=np.float64),
        end=np.array([e.time_range.end for e in events], dtype=np.float64),
        parent=np.array([row.get(id(e.cpu_parent), -1) if e.cpu_parent is not None else -1 for e in events],
                        dtype=np.int64))


def load_events(path: Path) -> list:
    """The events `save_events` wrote, as objects with the attributes `gpu_idle` reads."""
    from types import SimpleNamespace

    import numpy as np

    from torch.autograd import DeviceType

    z = np.load(path, allow_pickle=False)
    names = [str(n) for n in z["names"]]
    out = [SimpleNamespace(name=names[n], device_type=DeviceType.CPU if c else DeviceType.CUDA, thread=int(th),
                           time_range=SimpleNamespace(start=float(a), end=float(b)), cpu_parent=None)
           for n, c, th, a, b in zip(z["name"], z["cpu"], z["thread"], z["start"], z["end"])]
    for e, p in zip(out, z["parent"]):
        if p >= 0:
            e.cpu_parent = out[p]
    return out


def gflop_of(fn) -> float:
    """GFLOP of running `fn()` once, as torch.utils.flop_counter counts them (matmuls, convolutions,
    attention; not the elementwise work); on the meta device too, where nothing runs."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops() / 1e9


def matmul_tflops(device: torch.device, size: int = 8192, repeats: int = 20) -> float:
    """The card's rate for a large square matmul, as its BLAS gives it (fp16 on a GPU, fp32 on a
    CPU), in TFLOP/s to 4 significant digits: the rate a part's FLOPs are a floor at."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    a = torch.randn(size, size, device=device, dtype=torch.float16 if cuda else torch.float32)
    for _ in range(3):
        a @ a
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ a
    if cuda:
        torch.cuda.synchronize(device)
    return float(f"{2 * size ** 3 * repeats / (time.perf_counter() - t0) / 1e12:.4g}")


def _device_sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


SYNC_WARNING = "called a synchronizing CUDA operation"  # torch's text (c10/cuda/CUDAFunctions.cpp)
_THIS = Path(__file__).resolve()
_ROOT = _THIS.parent.parent


def _own_site(frames) -> str:
    """'core/guidance/sds.py:120 (sds_step)': the innermost frame of lift3d's own code (not this file),
    else the innermost frame at all."""
    for f in reversed(frames):
        path = Path(f.filename).resolve()
        if path == _THIS or _ROOT not in path.parents or ".venv" in path.parts:
            continue
        return f"{path.relative_to(_ROOT)}:{f.lineno} ({f.name})"
    f = frames[-1]
    return f"{f.filename}:{f.lineno} ({f.name})"


class SyncAudit:
    """Count the host–device synchronisations of a block of work, by the line of lift3d that caused them.

    `torch.cuda.set_sync_debug_mode("warn")` makes every synchronising CUDA call warn (`.item()`,
    `float()` of a GPU tensor, a copy to the host, a copy from pageable memory, `nonzero`, …): each
    such warning is attributed to the innermost frame of lift3d's own code on the stack and counted in
    `counts`; other warnings pass through. A sync stalls the host until the GPU has caught up, so a
    loop that is launch-bound pays for each one. The stack walk slows the audited run: its times are
    not figures. Off (`enabled=False`), or without CUDA, it counts only what is warned by hand."""

    def __init__(self, enabled: bool = True):
        from collections import Counter

        self.enabled, self.counts = enabled, Counter()
        self._catch = None

    def __enter__(self):
        if not self.enabled:
            return self
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()  # restores the filters and showwarning on exit
        warnings.filterwarnings("always", message=SYNC_WARNING)  # every occurrence, not once per line
        self._show = warnings.showwarning
        warnings.showwarning = self._record
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def _record(self, message, category, filename, lineno, file=None, line=None):
        import traceback

        if SYNC_WARNING in str(message):
            self.counts[_own_site(traceback.extract_stack()[:-1])] += 1
        else:
            self._show(message, category, filename, lineno, file, line)

    def __exit__(self, *exc):
        if self._catch is not None:
            if torch.cuda.is_available():
                torch.cuda.set_sync_debug_mode(0)
            self._catch.__exit__(*exc)
            self._catch = None
        return False

    def summary(self, iterations: int, top: int = 20) -> dict:
        """{"total", "per_iteration", "sites": {site: count} (the `top` most frequent)}."""
        total = sum(self.counts.values())
        return {"total": total, "per_iteration": round(total / max(iterations, 1), 2),
                "sites": dict(self.counts.most_common(top))}
