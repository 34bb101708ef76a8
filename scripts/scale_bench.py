"""Scale-out on GPUs: the same assets on 1 and on N GPUs through `lift3d generate-many`, with the
full-size random-weight priors (they cost what the real weights cost) and short stages.

    python scripts/scale_bench.py --out /tmp/scale --gpus 4            # 8 assets, on 1 then on 4 GPUs

Writes OUT/scale.json (after each run): per GPU count the wall time, the speed-up over one GPU, each
GPU's peak memory (nvidia-smi's memory.used, sampled every 0.5 s, so the CUDA context included; and
torch's peak per step from the step records), how often each worker loaded the priors, and the
per-asset seconds. Each run is the real command, in a fresh output folder and Prefect home (so no step
is Cached from an earlier run): `python -m flows.cli generate-many OUT/photos --out OUT/gpusK --gpus K`
with one dask-cuda worker per GPU; without dask-cuda the script starts the same thing itself, a Dask
scheduler and one single-thread worker per GPU (CUDA_VISIBLE_DEVICES=i), and passes `--scheduler`.

The photos are the oracle objects rendered at the reference view with their depth maps (no
segmentation or depth model runs); evaluation's CLIP and LPIPS trunk are local stand-ins (write_judges).

Needs on the GPU machine: torch with CUDA, diffusers, transformers, dask + distributed, prefect and
prefect-dask, pandas, open_clip_torch, lpips (the project's dependencies; mlflow is not needed:
tracking is off here). The
script itself imports only the standard library at the top.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NEEDED = ("torch", "torchvision", "diffusers", "transformers", "dask", "distributed", "prefect", "prefect_dask",
          "pandas", "open_clip", "lpips")
OBJECTS = ("torus", "blocks", "snowman")  # core.oracle.objects: photos the presets can run on


def _python(code: str, env: dict | None = None) -> str:
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"scale_bench: failed: {code[:80]}…\n{r.stderr[-3000:]}")
    return r.stdout.strip()


def check_imports() -> bool:
    """Which of the needed modules import; exit with their names when some do not. True with dask-cuda."""
    code = ("import importlib.util, json; print(json.dumps({m: importlib.util.find_spec(m) is not None for m in "
            f"{list(NEEDED) + ['dask_cuda']!r}}}))")
    found = json.loads(_python(code))
    missing = [m for m in NEEDED if not found[m]]
    if missing:
        raise SystemExit(f"scale_bench: missing modules: {', '.join(missing)} (install their wheels first)")
    # what generate-many starts before any asset: Prefect's local server and Dask's scheduler (a
    # Prefect whose FastAPI or asyncpg does not match fails here, in seconds, not after the models)
    r = subprocess.run([sys.executable, "-c", "import prefect.server.api.server, distributed.cli.dask_scheduler"],
                       cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        raise SystemExit(f"scale_bench: Prefect's server or Dask's scheduler does not import: {last}")
    return found["dask_cuda"]


def gpu_count() -> int:
    return int(_python("import torch; print(torch.cuda.device_count())"))


def write_models(models: Path) -> dict:
    """The full-size random priors in the hub layout, once (core.testmodels.fullsize_priors)."""
    code = ("import json; from core.testmodels.fullsize_priors import write_fullsize_priors; "
            f"print(json.dumps(write_fullsize_priors({str(models)!r}, 'cuda')))")
    return json.loads(_python(code).splitlines()[-1])


def write_judges(folder: Path) -> dict:
    """Stand-ins for evaluation's judges, which the GPU machine cannot download: the tiny CLIP of
    core.testmodels.judges (an open_clip config + checkpoint) and a random AlexNet trunk for LPIPS,
    passed as local files through the real loaders. Evaluation is not what this bench measures."""
    code = ("import json, torch, torchvision; from pathlib import Path; "
            "from core.testmodels.judges import ensure_tiny_judges; "
            f"root = Path({str(folder)!r}); j = ensure_tiny_judges(root / 'judges'); "
            "trunk = root / 'alexnet-random.pth'; "
            "torch.save(torchvision.models.alexnet(weights=None).state_dict(), trunk); "
            "print(json.dumps({'clip_model': str(j.clip_config), 'clip_pretrained': str(j.clip_checkpoint), "
            "'lpips_trunk': str(trunk)}))")
    return json.loads(_python(code).splitlines()[-1])


def write_photos(folder: Path, n: int, preset: str) -> list[Path]:
    """n photos (rgba.png + depth.png), the oracle objects at the reference view, in folder/NAME/."""
    names = [f"{OBJECTS[i % len(OBJECTS)]}_{i:02d}" for i in range(n)]
    code = ("from pathlib import Path; from core.params import load_params; "
            "from core.oracle.bench import write_reference_view; "
            f"p = load_params({preset!r}); "
            f"[write_reference_view(nm.rsplit('_', 1)[0], Path({str(folder)!r}) / nm / 'rgba.png', 256, p) "
            f"for nm in {names!r}]")
    _python(code)
    return [folder / nm / "rgba.png" for nm in names]


class GpuMemory:
    """Peak memory.used per GPU (MiB), from nvidia-smi every `interval` seconds while running; only
    GPUs 0..gpus-1 (the ones the run uses: other jobs may hold the rest)."""

    def __init__(self, gpus: int | None = None, interval: float = 0.5):
        self.gpus, self.interval, self.peak, self._stop = gpus, interval, {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                for line in out.strip().splitlines():
                    i, used = (x.strip() for x in line.split(","))
                    if self.gpus is not None and int(i) >= self.gpus:
                        continue
                    self.peak[i] = max(self.peak.get(i, 0), int(float(used)))
            except (OSError, ValueError, subprocess.SubprocessError):
                pass
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=15)
        return False


class DaskCluster:
    """A scheduler and one single-thread worker per GPU (CUDA_VISIBLE_DEVICES=i): what
    dask_cuda.LocalCUDACluster starts, for machines without dask-cuda."""

    def __init__(self, gpus: int, folder: Path, env: dict):
        self.gpus, self.folder, self.env, self.procs = gpus, folder, env, []

    def __enter__(self) -> str:
        self.folder.mkdir(parents=True, exist_ok=True)
        sched = self.folder / "scheduler.json"
        sched.unlink(missing_ok=True)
        log = open(self.folder / "dask.log", "w")
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--scheduler-file", str(sched), "--port", "0",
             "--dashboard-address", ":0"], cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.time() + 120
        while not sched.is_file():
            if time.time() > deadline:
                raise SystemExit(f"scale_bench: the Dask scheduler did not start (see {self.folder / 'dask.log'})")
            time.sleep(0.5)
        for i in range(self.gpus):
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file", str(sched), "--nthreads", "1",
                 "--nworkers", "1", "--name", f"gpu{i}", "--dashboard-address", ":0"],
                cwd=ROOT, env={**self.env, "CUDA_VISIBLE_DEVICES": str(i)}, stdout=log, stderr=subprocess.STDOUT))
        address = json.loads(sched.read_text())["address"]
        code = (f"from distributed import Client; c = Client({address!r}); c.wait_for_workers({self.gpus}, timeout=300); "
                "print(len(c.scheduler_info()['workers']))")
        _python(code, self.env)
        return address

    def __exit__(self, *exc):
        for p in reversed(self.procs):
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        return False


def read_steps(out: Path) -> list[dict]:
    steps = []
    for f in sorted(out.glob("*/steps/*.json")):
        try:
            steps.append({"asset": f.parent.parent.name, **json.loads(f.read_text())})
        except (OSError, ValueError):
            pass
    return steps


def child_env(out: Path, environ: dict | None = None) -> dict:
    """The environment of a run's processes: its own Prefect home and no server URL (nothing Cached
    from an earlier run), the repository in front of any PYTHONPATH already set (a machine whose
    packages live there keeps them), the prior cache on."""
    environ = dict(os.environ if environ is None else environ)
    env = {**environ, "PREFECT_HOME": str(out / "prefect-home"),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), environ.get("PYTHONPATH", "")) if p),
           "LIFT3D_PRIOR_CACHE": environ.get("LIFT3D_PRIOR_CACHE", "1")}
    env.pop("PREFECT_API_URL", None)
    return env


def one_run(k: int, photos: Path, out: Path, sets: list[str], preset: str, use_dask_cuda: bool) -> dict:
    """generate-many of every photo on k GPUs, in a fresh folder; its numbers."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    env = child_env(out)
    cmd = [sys.executable, "-m", "flows.cli", "generate-many", str(photos), "--out", str(out / "assets"),
           "--preset", preset, *[a for s in sets for a in ("--set", s)]]
    cluster = None
    if use_dask_cuda:
        cmd += ["--gpus", str(k)]
    else:
        cluster = DaskCluster(k, out / "dask", env)
        cmd += ["--scheduler", cluster.__enter__()]
    print(f"[{k} GPU(s)] {' '.join(cmd)}", flush=True)
    try:
        with open(out / "generate-many.log", "w") as log, GpuMemory(k) as mem:
            t0 = time.perf_counter()
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
            wall = time.perf_counter() - t0
    finally:
        if cluster is not None:
            cluster.__exit__(None, None, None)
    summary_f = out / "assets" / "manifest.summary.json"
    summary = json.loads(summary_f.read_text()) if summary_f.is_file() else {}
    rows = list(csv.DictReader(open(out / "assets" / "manifest.csv"))) if (out / "assets" / "manifest.csv").is_file() else []
    steps = read_steps(out / "assets")
    torch_peak: dict[str, float] = {}
    for s in steps:
        if s.get("gpu_peak_gib") is not None:
            g = str(s.get("gpu"))
            torch_peak[g] = max(torch_peak.get(g, 0.0), float(s["gpu_peak_gib"]))
    return {
        "gpus": k, "returncode": rc, "wall_seconds": round(wall, 1),
        "runner": "dask-cuda LocalCUDACluster (--gpus)" if use_dask_cuda else "Dask scheduler + 1 worker per GPU (--scheduler)",
        "assets_ok": summary.get("ok"), "assets_failed": summary.get("failed"), "failures": summary.get("failures"),
        "prior_loads_total": summary.get("prior_loads"), "prior_reuses_total": summary.get("prior_reuses"),
        "workers": summary.get("workers"),
        "peak_memory_used_mib_per_gpu": {i: v for i, v in sorted(mem.peak.items())},
        "torch_peak_gib_per_gpu": torch_peak,
        "asset_seconds": {r["asset"]: float(r["seconds"]) for r in rows if r.get("seconds")},
        "step_seconds": {f"{s['asset']}/{s['step']}": s.get("seconds") for s in steps},
        "command": cmd, "log": str(out / "generate-many.log"),
    }


def earlier_runs(scale_json: Path, same: dict) -> dict:
    """The runs an earlier invocation on the same OUT wrote with the same settings (so `--only 1` and
    a later `--only 4` make one table with its speed-up); none when the settings differ."""
    try:
        earlier = json.loads(scale_json.read_text())
    except (OSError, ValueError):
        return {}
    return dict(earlier.get("runs", {})) if all(earlier.get(k) == v for k, v in same.items()) else {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--gpus", type=int, default=0, help="N for the N-GPU run (default: every visible GPU)")
    ap.add_argument("--assets", type=int, default=8)
    ap.add_argument("--preset", default="magic123", help="the preset whose sizes run (default magic123: the paper's)")
    ap.add_argument("--coarse-iters", type=int, default=100)
    ap.add_argument("--fine-iters", type=int, default=50)
    ap.add_argument("--ti-steps", type=int, default=20)
    ap.add_argument("--models-dir", type=Path, default=None, help="the full-size random priors (default OUT/models)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--only", type=int, action="append", default=None, help="run only these GPU counts")
    args = ap.parse_args(argv)

    use_dask_cuda = check_imports()
    n = args.gpus or gpu_count()
    if n < 1:
        raise SystemExit("scale_bench: no CUDA device")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    models = write_models((args.models_dir or out / "models").resolve())
    models_s = round(time.perf_counter() - t0, 1)
    judges = write_judges((args.models_dir or out / "models").resolve())
    photos = out / "photos"
    write_photos(photos, args.assets, args.preset)
    sets = ["device=cuda", "models.tiny=false", f"sd.model={models['sd']}", f"zero123.model={models['zero123']}",
            f"coarse.iters={args.coarse_iters}", f"fine.iters={args.fine_iters}",
            f"textual_inversion.steps={args.ti_steps}", "tracking.enabled=false",
            *[f"evaluate.{k}={v}" for k, v in judges.items()], *args.overrides]
    result = {"assets": args.assets, "preset": args.preset, "sets": sets, "models": models,
              "models_written_seconds": models_s, "gpu_name": _python(
                  "import torch; print(torch.cuda.get_device_name(0))"), "runs": earlier_runs(
                  out / "scale.json", {"assets": args.assets, "preset": args.preset, "sets": sets})}
    counts = args.only or sorted({1, n})
    for k in counts:
        r = one_run(k, photos, out / f"gpus{k}", sets, args.preset, use_dask_cuda)
        result["runs"][str(k)] = r
        if "1" in result["runs"] and k != 1 and r["wall_seconds"]:
            r["speedup_over_1"] = round(result["runs"]["1"]["wall_seconds"] / r["wall_seconds"], 2)
        (out / "scale.json").write_text(json.dumps(result, indent=2))
        print(f"[{k} GPU(s)] rc {r['returncode']}, wall {r['wall_seconds']} s, ok {r['assets_ok']}, "
              f"prior loads {r['prior_loads_total']} (workers: {r['workers']}), "
              f"peak MiB per GPU {r['peak_memory_used_mib_per_gpu']}"
              + (f", speed-up ×{r['speedup_over_1']}" if "speedup_over_1" in r else ""), flush=True)
    print(f"wrote {out / 'scale.json'}")
    return 0 if all(r["returncode"] == 0 for r in result["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
