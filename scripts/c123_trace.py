"""Consistent123 on the CPU with tiny priors, coarse then refine, for each dynamic schedule: what
trace.csv says about the prior weights and the detector (issue 12's must-show).

    .venv/bin/python scripts/c123_trace.py --out reports/fidelity/c123_trace

Per schedule (exp, linear, log; the released readings): the consistent123 preset with tiny random
priors at a CPU size, the detector checking every 5 iterations inside a window [earliest, latest]
shrunk to the short run, through core.pipeline's coarse and fine stages (the `lift3d coarse` /
`lift3d refine` entry points). Checks, written to summary.json and drawn in weights.png:
  * w_2D and w_3D in [0, 1] and summing to 1 at every traced step;
  * the fine stage's first row continues the coarse stage's last one (no larger jump than an
    ordinary step; the clock is one count over both stages);
  * the detector's switch, if any, inside its window (or at its end).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZE = ["models.tiny=true", "device=cpu", "coarse.resolution=32", "coarse.samples_per_ray=24", "coarse.grid.levels=4",
        "coarse.grid.log2_table_size=12", "coarse.grid.max_resolution=64", "coarse.occupancy_resolution=16",
        "coarse.checkpoint_every=40", "fine.resolution=48", "fine.tet_resolution=16", "fine.texture_size=32",
        "fine.checkpoint_every=40", "sd.resolution=64", "zero123.resolution=64", "coarse.iters=80", "fine.iters=20",
        "detector.every=5", "detector.window=3", "detector.earliest=30", "detector.latest=60", "detector.delta=0.01"]


def run(schedule: str, out: Path, image: Path) -> dict:
    import pandas as pd

    from core.params import load_params
    from core.pipeline import coarse_stage, fine_stage

    p = load_params("consistent123", SIZE + [f"guidance.dynamic_schedule={schedule}"]).with_inputs(text="a chair")
    c = coarse_stage(image, out / "coarse", p, progress=False)
    fine_stage(out / "coarse" / "checkpoint.pt", out / "fine", p, progress=False, turntable_frames=4)
    ct, ft = pd.read_csv(out / "coarse" / "trace.csv"), pd.read_csv(out / "fine" / "trace.csv")
    both = pd.concat([ct, ft], ignore_index=True)
    steps = both.w_2d.diff().abs().iloc[1:]
    jump = abs(float(ft.w_2d.iloc[0] - ct.w_2d.iloc[-1]))
    switch = c.get("switch_step")
    d = p.detector
    return {
        "schedule": schedule, "switch_step": switch, "window": [d.earliest, d.latest],
        "switch_inside_window": switch is None or d.earliest <= switch <= d.latest,
        "weights_in_unit_interval": bool(((both.w_2d >= 0) & (both.w_2d <= 1) & (both.w_3d >= 0) & (both.w_3d <= 1)).all()),
        "weights_sum_to_one": float((both.w_2d + both.w_3d - 1).abs().max()),
        "clock_continuous": list(both.clock) == sorted(both.clock) and int(ft.clock.iloc[0]) > int(ct.clock.iloc[-1]),
        "coarse_to_fine_jump": round(jump, 6), "largest_ordinary_step": round(float(steps.max()), 6),
        "continuous": jump <= float(steps.max()) + 1e-12,
        "last_coarse": {"clock": int(ct.clock.iloc[-1]), "w_2d": round(float(ct.w_2d.iloc[-1]), 6)},
        "first_fine": {"clock": int(ft.clock.iloc[0]), "w_2d": round(float(ft.w_2d.iloc[0]), 6)},
        "detector_checks": int(ct.detector_score.notna().sum()) if "detector_score" in ct else 0,
        "_frame": both,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--image", type=Path, default=ROOT.parent / "shared" / "benchmarks" / "nerf4" / "chair" / "rgba.png")
    a = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a.out.mkdir(parents=True, exist_ok=True)
    results = [run(s, a.out / s, a.image) for s in ("exp", "linear", "log")]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.4), sharey=True)
    for r, axis in zip(results, ax):
        f = r.pop("_frame")
        axis.plot(f.clock, f.w_2d, label="w_2D")
        axis.plot(f.clock, f.w_3d, label="w_3D")
        axis.axvline(r["last_coarse"]["clock"] + 0.5, color="grey", ls=":", label="coarse | fine")
        axis.axvspan(*r["window"], color="orange", alpha=0.15, label="detector window")
        if r["switch_step"] is not None:
            axis.axvline(r["switch_step"], color="red", ls="--", label="switch")
        axis.set_title(f"{r['schedule']} (switch {r['switch_step']})")
        axis.set_xlabel("guidance clock (coarse + fine iterations)")
    ax[0].set_ylabel("prior weight")
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out / "weights.png", dpi=110)
    (a.out / "summary.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    ok = all(r["weights_in_unit_interval"] and r["weights_sum_to_one"] < 1e-9 and r["continuous"]
             and r["switch_inside_window"] and r["clock_continuous"] for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
