"""Run `lift3d prepare` (smoke preset: tiny judges) on every benchmark input under
../shared/benchmarks (NeRF4 + RealFusion15 rgba.png) and report time and memory.

    .venv/bin/python scripts/prepare_benchmarks.py --out /tmp/prepared [--bench ../shared/benchmarks]

Checks per input: exit status 0, the input alpha used (no segmentation), the given depth.png used,
the outputs' sizes. Prints a table and writes OUT/prepare_benchmarks.json. Peak memory is the
process's resident-set high-water mark after each input (it only grows), next to the mark right
after the imports and the tiny judges were loaded.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", type=Path, default=REPO.parent / "shared" / "benchmarks")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", default="smoke")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="parameter overrides passed on to lift3d prepare")
    args = ap.parse_args()
    from PIL import Image

    from core.params import load_params
    from core.inputs.prepare import prepare_inputs  # noqa: F401  (imports counted in the baseline)
    from core.testmodels.judges import ensure_tiny_judges
    from flows.cli import main as lift3d

    ensure_tiny_judges(params=load_params(args.preset, args.overrides))
    base = peak_mib()
    images = sorted(args.bench.glob("*/*/rgba.png"))
    rows, failures = [], 0
    t_all = time.perf_counter()
    for img in images:
        name = f"{img.parent.parent.name}/{img.parent.name}"
        out = args.out / name
        t0 = time.perf_counter()
        sets = [a for kv in args.overrides for a in ("--set", kv)]
        rc = lift3d(["prepare", str(img), "--out", str(out), "--preset", args.preset, *sets])
        dt = time.perf_counter() - t0
        ok = rc == 0
        rec = json.loads((out / "prepare.json").read_text()) if ok else {}
        if ok:
            ok = rec["alpha"] == "input" and rec["depth_given"] and rec["depth"] == str(img.with_name("depth.png"))
            sizes = {Image.open(out / n).size for n in ("rgba.png", "mask.png", "depth.png")}
            ok = ok and len(sizes) == 1
        failures += not ok
        rows.append({"input": name, "source_size": rec.get("source_size"), "rc": rc, "ok": ok,
                     "seconds": round(dt, 3), "peak_rss_mib": round(peak_mib(), 1)})
        print(f"{name:36s} {str(rec.get('source_size')):14s} rc={rc} ok={ok} {dt:6.2f}s peak {peak_mib():7.1f} MiB",
              flush=True)
    total = time.perf_counter() - t_all
    summary = {"inputs": len(images), "failures": failures, "total_seconds": round(total, 2),
               "baseline_peak_rss_mib": round(base, 1), "final_peak_rss_mib": round(peak_mib(), 1),
               "preset": args.preset, "overrides": args.overrides, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prepare_benchmarks.json").write_text(json.dumps(summary, indent=2))
    print(f"{len(images)} inputs, {failures} failures, {total:.1f} s in all; peak RSS {base:.0f} MiB after "
          f"imports → {peak_mib():.0f} MiB at the end")
    return 1 if failures or not images else 0


if __name__ == "__main__":
    sys.exit(main())
