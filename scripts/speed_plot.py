"""Where one asset's time goes, before and after each change (issue 15): reports/speed/*.json → a PNG.

  python3 scripts/speed_plot.py [--paper | --steady | --timeline] OUT.png LABEL=SPEED.json [LABEL=SPEED.json ...]

--paper: runs at the paper's counts (textual inversion 3,000 steps, coarse 5,000 + fine 5,000
iterations), with the issue's targets drawn (≤ 2 min of textual inversion + ≤ 5 min for the rest)
and the stages a run lacks named beside its bar.

Left: each run's wall seconds per stage (textual inversion, coarse, fine; the fine stage's time
outside its loop apart: set-up, and the export where the run records it as `outputs_s`). Right: a coarse iteration split into the loop's
scopes (render, backward, guidance, the rest), from runs made with `--profile`; runs without scopes
show their ms per iteration as one bar. With --paper the right panel is instead each run's steady
ms per iteration (the loop's second half, past compiling) of the coarse and fine stages, with the
hash grid and rasteriser each ran on. --steady: that right panel for runs of any length (an A/B of
short runs), the left panel each run's wall seconds at its own counts. --timeline: each stage's ms
per iteration over the run, between its marks (every 25 steps; speed.json from session 26 on), on
a log scale, each run's steady pace dashed: where a loop's first iterations spend their seconds.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SCOPES = ("lift3d.render", "lift3d.backward", "lift3d.guidance")


def coarse_split(run: dict) -> dict[str, float]:
    """A coarse iteration's ms by scope (each scope's seconds over the stage / its iterations) and
    the rest of the iteration; without scopes (no --profile) all of it is the rest."""
    c = run["stages"]["coarse"]
    sc = run.get("scopes", {}).get("coarse") or {}
    iters = max(int(c["iters"]), 1)
    split = {s: 1000 * sc.get(s, {}).get("seconds", 0.0) / iters for s in SCOPES}
    split["rest"] = max(0.0, float(c["ms_per_iter"]) - sum(split.values()))
    return split


STAGES = ("textual_inversion", "coarse", "fine")
TARGET_TI_S, TARGET_REST_S = 120.0, 300.0  # issue 15: one H100/H200, paper settings


def fine_parts(run: dict) -> dict[str, float]:
    """The fine stage's seconds as loop, set-up (model loading, tet grid, compiling) and export (the
    outputs: renders, atlas, texture, OBJ, GLB, turntable). Runs from before `outputs_s` existed
    keep their export inside the set-up."""
    f = run.get("stages", {}).get("fine", {})
    outside, export = float(f.get("outside_loop_s", 0.0)), float(f.get("outputs_s", 0.0))
    return {"loop": float(f.get("loop_s", 0.0)), "set-up": max(0.0, outside - export), "export": export}


def steady(run: dict) -> dict[str, float]:
    """The coarse and fine stages' steady ms per iteration (0 for a stage the run lacks or did not
    time so), and 'backends': 'hash grid / rasteriser' as the run recorded them."""
    st, b = run.get("stages", {}), run.get("backends", {})
    out: dict = {k: float(st.get(k, {}).get("ms_per_iter_steady") or 0.0) for k in ("coarse", "fine")}
    out["backends"] = f"{b.get('hash_grid', '?')} / {b.get('rasteriser', '?')}"
    return out


def missing_stages(run: dict) -> list[str]:
    """The stages of an asset that `run` has no record of (a split run not yet finished)."""
    return [s for s in STAGES if s not in run.get("stages", {})]


def pace(marks: list) -> tuple[list[int], list[float]]:
    """Steps and ms per iteration between consecutive [step, seconds] marks (each at its later mark)."""
    steps, ms = [], []
    for (a, ta), (b, tb) in zip(marks, marks[1:]):
        if b > a:
            steps.append(int(b))
            ms.append(1000 * (float(tb) - float(ta)) / (b - a))
    return steps, ms


def timeline(out: Path, runs: list) -> int:
    """--timeline: a panel per stage that some run marked, each run's pace over its steps."""
    stages = [s for s in STAGES if any(len(r.get("stages", {}).get(s, {}).get("marks") or []) > 1 for _, r in runs)]
    if not stages:
        print("no stage with marks in these runs (speed.json before session 26 kept none)")
        return 1
    fig, axes = plt.subplots(1, len(stages), figsize=(6.5 * len(stages), 4.5), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        for k, (label, r) in enumerate(runs):
            st = r.get("stages", {}).get(stage, {})
            steps, ms = pace(st.get("marks") or [])
            if not steps:
                continue
            above = st.get("above_steady_s")
            ax.plot(steps, ms, color=f"C{k}", lw=1,
                    label=label + (f" ({above:.0f} s above its steady pace)" if above is not None else ""))
            if st.get("ms_per_iter_steady"):
                ax.axhline(st["ms_per_iter_steady"], color=f"C{k}", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(stage.replace("_", " "))
        ax.set_xlabel("step")
        ax.set_ylabel("ms per iteration (between marks 25 steps apart)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(out)
    return 0


def main(argv: list[str]) -> int:
    mode = argv[0] if argv and argv[0] in ("--paper", "--steady", "--timeline") else ""
    paper = mode == "--paper"
    argv = argv[1:] if mode else argv
    if len(argv) < 2:
        print(__doc__)
        return 2
    out, runs = Path(argv[0]), []
    for arg in argv[1:]:
        label, _, path = arg.partition("=")
        runs.append((label, json.loads(Path(path).read_text())))
    if mode == "--timeline":
        return timeline(out, runs)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 0.8 * len(runs) + 2.0), sharey=True)
    y = range(len(runs))
    labels = [label for label, _ in runs]
    left = [0.0] * len(runs)
    parts = [("textual inversion", lambda r: float(r["stages"].get("textual_inversion", {}).get("wall_s", 0.0))),
             ("coarse", lambda r: float(r["stages"].get("coarse", {}).get("wall_s", 0.0))),
             ("fine loop", lambda r: fine_parts(r)["loop"]),
             ("fine set-up (+ export in runs before outputs_s)", lambda r: fine_parts(r)["set-up"]),
             ("fine export", lambda r: fine_parts(r)["export"])]
    for name, value in parts:
        vals = [value(r) for _, r in runs]
        ax1.barh(y, vals, left=left, label=name)
        left = [a + b for a, b in zip(left, vals)]
    for i, (_, r) in enumerate(runs):
        if missing := missing_stages(r):
            ax1.text(left[i], i, "  no " + ", ".join(m.replace("_", " ") for m in missing), va="center", fontsize=8)
    if paper:
        ax1.axvline(TARGET_TI_S + TARGET_REST_S, color="k", ls="--", lw=1)
        ax1.text(TARGET_TI_S + TARGET_REST_S, -0.6, " target: 2 + 5 min", fontsize=8, va="bottom")
    ax1.set_yticks(list(y), labels)
    ax1.invert_yaxis()
    ax1.set_xlabel("seconds at the paper's counts (textual inversion 3,000 steps, coarse 5,000 + fine 5,000)" if paper
                   else "seconds at each run's counts (its speed.json)" if mode
                   else "seconds (200 + 200 iterations, textual inversion 100 steps)")
    legend = ({"loc": "upper center", "bbox_to_anchor": (0.5, -0.18), "ncol": 3} if mode
              else {"loc": "lower right"})  # below the axes: the paper-length bars reach the right edge
    if paper:
        ax1.set_xlim(0, 1.3 * max(left + [TARGET_TI_S + TARGET_REST_S]))
    ax1.legend(fontsize=8, **legend)
    if mode:
        _steady_panel(ax2, runs, legend)
    else:
        _scope_panel(ax2, runs, legend)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(out)
    return 0


def _steady_panel(ax, runs: list, legend: dict) -> None:
    """Coarse and fine steady ms per iteration side by side, each run's backends beside its bars."""
    vals = [steady(r) for _, r in runs]
    h = 0.38
    for k, (stage, dy) in enumerate((("coarse", -h / 2), ("fine", h / 2))):
        ax.barh([i + dy for i in range(len(runs))], [v[stage] for v in vals], height=h, label=stage,
                color=("C1", "C2")[k])
    for i, v in enumerate(vals):
        ax.text(max(v["coarse"], v["fine"]), i, f"  {v['backends']}", va="center", fontsize=8)
    ax.set_xlim(0, 1.35 * max([v[s] for v in vals for s in ("coarse", "fine")] + [1.0]))
    ax.set_xlabel("steady ms per iteration (hash grid / rasteriser)")
    ax.legend(fontsize=8, **legend)


def _scope_panel(ax2, runs: list, legend: dict) -> None:
    """A coarse iteration's ms by the loop's scopes."""
    y = range(len(runs))
    left = [0.0] * len(runs)
    splits = [coarse_split(r) for _, r in runs]
    for scope in SCOPES + ("rest",):
        vals = [sp[scope] for sp in splits]
        ax2.barh(y, vals, left=left, label="rest (or not split)" if scope == "rest" else scope.replace("lift3d.", ""))
        left = [a + b for a, b in zip(left, vals)]
    ax2.set_xlabel("coarse: ms per iteration, by scope (averaged over the stage)")
    ax2.legend(fontsize=8, **legend)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
