"""Oracle-bench sweeps: many (preset, overrides, object) variants of the coarse stage, side by side.

A tuning and diagnosis tool, not part of the pipeline. Each variant trains the coarse NeRF under
oracle guidance in its own process (the coarse stage, as `lift3d bench oracle` runs it) and, every
`--eval-every` iterations and at the end, scores the bench's held-out views (core/oracle/bench.py
EVAL_VIEWS) and appends a line to OUT/NAME.jsonl:
  {"name", "object", "step", "seconds", "psnr_novel", "mask_iou", "err_edge", "err_inside", "err_outside"}
err_*: the share of the squared error on the silhouette band (1 px each side of the true mask's
edge), inside the object and outside it (floaters).

  python3 scripts/oracle_sweep.py sweep --spec SPEC.json --out DIR [--jobs N]
      SPEC.json: [{"name": ..., "object": ..., "preset": ..., "set": ["coarse.iters=300", ...],
                   "eval_every": 100 (optional)}, ...]
  python3 scripts/oracle_sweep.py one --name N --object torus --preset smoke --out DIR [--set k=v ...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def score(trainer, obj, params) -> dict:
    import torch.nn.functional as F

    from core.evaluation.metrics import mask_iou, psnr
    from core.oracle.bench import render_eval_views

    field = trainer.rep.field
    was = field.training
    field.eval()
    out, tgt = render_eval_views(field, obj, params, trainer.rep.occupancy, trainer.device)
    field.train(was)
    m = tgt["opacity"]
    edge = (F.max_pool2d(m, 3, 1, 1) + F.max_pool2d(-m, 3, 1, 1)) > 0
    se = ((out.rgb - tgt["rgb"]) ** 2).mean(1, keepdim=True)
    tot = float(se.sum()) or 1.0
    return {"psnr_novel": round(psnr(out.rgb, tgt["rgb"]), 3),
            "mask_iou": round(mask_iou(out.opacity, m), 4),
            "err_edge": round(float(se[edge].sum()) / tot, 3),
            "err_inside": round(float(se[(m > 0.5) & ~edge].sum()) / tot, 3),
            "err_outside": round(float(se[(m < 0.5) & ~edge].sum()) / tot, 3)}


def one(name: str, obj_name: str, preset: str, overrides: list[str], out: Path, eval_every: int) -> int:
    import torch

    from core.stages.coarse import make_coarse_stage
    from core.oracle.guidance import OracleGuidance
    from core.oracle.objects import make_object
    from core.params import load_params, resolve_device
    from core.oracle.bench import oracle_reference

    params = load_params(preset, overrides)
    device = resolve_device(params)
    obj = make_object(obj_name)
    trainer = make_coarse_stage(params, oracle_reference(obj, params, device), guidance=OracleGuidance(obj, params),
                                device=device)
    total = params.coarse.iters
    log = out / f"{name}.jsonl"
    log.unlink(missing_ok=True)
    t0 = time.perf_counter()
    for step in range(total):
        trainer.step()
        if (step + 1) % eval_every == 0 or step + 1 == total:
            if device.type == "cuda":
                torch.cuda.synchronize()
            r = {"name": name, "object": obj_name, "step": step + 1, "seconds": round(time.perf_counter() - t0, 1),
                 **score(trainer, obj, params)}
            with open(log, "a") as f:
                f.write(json.dumps(r) + "\n")
            print(json.dumps(r), flush=True)
    return 0


def gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        return 0


def launch(cmd: list[str], log: Path, slot: int, n_gpus: int) -> subprocess.Popen:
    """Start `cmd` in the repository root, output to `log`; with several GPUs, on GPU slot % n
    (processes sharing one GPU are time-sliced, not concurrent)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if n_gpus > 1:
        env["CUDA_VISIBLE_DEVICES"] = str(slot % n_gpus)
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)


def sweep(spec: Path, out: Path, jobs: int, eval_every: int) -> int:
    variants = json.loads(spec.read_text())
    pending = list(variants)
    running: list[tuple[dict, subprocess.Popen]] = []
    rc = 0
    n_gpus = gpu_count()
    launched = 0
    while pending or running:
        while pending and len(running) < jobs:
            v = pending.pop(0)
            cmd = [sys.executable, __file__, "one", "--name", v["name"], "--object", v["object"],
                   "--preset", v.get("preset", "smoke"), "--out", str(out), "--eval-every", str(v.get("eval_every", eval_every))]
            cmd += [x for o in v.get("set", []) for x in ("--set", o)]
            running.append((v, launch(cmd, out / f"{v['name']}.log", launched, n_gpus)))
            launched += 1
        time.sleep(1.0)
        for item in list(running):
            v, p = item
            if p.poll() is not None:
                running.remove(item)
                rc |= p.returncode
                last = (out / f"{v['name']}.jsonl")
                line = last.read_text().strip().splitlines()[-1] if last.is_file() and last.read_text().strip() else "(no result)"
                print(f"[{p.returncode}] {line}", flush=True)
                if p.returncode:
                    tail = (out / f"{v['name']}.log").read_text().splitlines()[-15:]
                    print("\n".join(f"    {v['name']}: {t}" for t in tail), flush=True)
    return rc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["sweep", "one"])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--spec", type=Path)
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--name")
    ap.add_argument("--object", default="torus")
    ap.add_argument("--preset", default="smoke")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.what == "one":
        return one(a.name or a.object, a.object, a.preset, a.overrides, a.out, a.eval_every)
    if a.spec is None:
        ap.error("sweep needs --spec")
    return sweep(a.spec, a.out, a.jobs, a.eval_every)


if __name__ == "__main__":
    sys.exit(main())
