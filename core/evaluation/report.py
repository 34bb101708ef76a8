"""Benchmark reports in the papers' layout: per dataset, rows CLIP-Similarity↑ / PSNR↑ / LPIPS↓,
one column per method — our runs (mean over the dataset's assets) beside the published figures
(core/evaluation/data/published_metrics.csv: Magic123 Table 1, Consistent123 Table 1). Also PNG bar plots of
the metrics, plots of the CLIP detector traces (Consistent123 eqs. 5–6), and a gallery page of the
fine stage's turntables (DIR/turntable.gif).

Inputs are found under RESULTS: every `metrics.json` (core.evaluation.evaluate), every `detector.json`
(core.stages.detector.write_trace) and every `turntable.gif` — or only under the run folders given
(a benchmark's own assets). `summary.json` is the flat digest (counts, means, failures) that DVC
reads as metrics, `per_asset.csv` the table it plots.
"""
from __future__ import annotations

import html
import json
import logging
import os
import textwrap
from pathlib import Path
from typing import Iterable, Optional

import pandas as pd

from core.evaluation.report_html import write_html

log = logging.getLogger(__name__)

PUBLISHED = Path(__file__).resolve().parent / "data" / "published_metrics.csv"
METRICS = [("clip_similarity", "CLIP-Similarity↑"), ("psnr", "PSNR↑"), ("lpips", "LPIPS↓")]
_DATASET_NAMES = {"nerf4": "NeRF4", "realfusion15": "RealFusion15", "c10": "C10"}


def dataset_label(name: str) -> str:
    return _DATASET_NAMES.get(str(name).lower(), str(name))


def load_published(path: Path = PUBLISHED) -> pd.DataFrame:
    return pd.read_csv(path, comment="#")


def _found(roots: Iterable[Path | str], name: str) -> list[Path]:
    return sorted(f for r in roots for f in Path(r).rglob(name))


def suspect_entries(published: pd.DataFrame, dataset: str) -> set[tuple[str, str]]:
    """{(column, metric)} of a dataset's published entries marked suspect (the CSV's `suspect`)."""
    pub = published[published["dataset"] == dataset]
    return {(f"{r['method']} [{r['source']}]", r["suspect"]) for _, r in pub.iterrows()
            if isinstance(r.get("suspect"), str) and r["suspect"]}


def collect_metrics(results: Path | str, runs: Optional[Iterable[Path | str]] = None) -> pd.DataFrame:
    """One row per metrics.json under `results` (or under the run folders `runs`): dataset, method,
    asset, psnr, lpips, clip_similarity."""
    rows = []
    for f in _found([results] if runs is None else runs, "metrics.json"):
        try:
            m = json.loads(f.read_text())
        except ValueError:
            log.warning("report: skipping unreadable %s", f)
            continue
        if not all(k in m for k, _ in METRICS):
            continue
        rows.append({
            "dataset": dataset_label(m.get("dataset") or f.parent.parent.name),
            "method": m.get("method", "?"),
            "priors": m.get("priors", "pretrained"),
            "asset": m.get("asset") or f.parent.name,
            **{k: float(m[k]) for k, _ in METRICS},
            "path": str(f),
        })
    return pd.DataFrame(rows, columns=["dataset", "method", "priors", "asset", *[k for k, _ in METRICS], "path"])


def paper_table(ours: pd.DataFrame, published: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """Rows = metrics, columns = methods: published columns '<method> [<source>]', ours (first)
    '<method> (ours, n=N)' as the mean over the dataset's assets."""
    cols = {}
    mine = ours[ours["dataset"] == dataset]
    for (method, priors), g in mine.groupby(["method", "priors"], sort=True):
        # a run with the tiny random test priors says so: its numbers are no reproduction of a paper's
        what = "ours" if priors == "pretrained" else f"ours, {priors} priors: not comparable"
        cols[f"{method} ({what}, n={len(g)})"] = [g[k].mean() for k, _ in METRICS]
    pub = published[published["dataset"] == dataset]
    for _, r in pub.iterrows():
        cols[f"{r['method']} [{r['source']}]"] = [r[k] for k, _ in METRICS]
    return pd.DataFrame(cols, index=[label for _, label in METRICS])


def _fmt(df: pd.DataFrame) -> str:
    return df.to_markdown(floatfmt=".3f")


def plot_metric_bars(tables: dict[str, pd.DataFrame], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for dataset, t in tables.items():
        if t.empty:
            continue
        fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 0.4 * len(t.columns) + 2))
        pub = load_published()
        bad = suspect_entries(pub, dataset)
        for ax, (key, label) in zip(axes, METRICS):
            vals = t.loc[label].copy()
            for col in vals.index:
                if (col, key) in bad:
                    vals[col] = float("nan")  # a suspect transcription (see the CSV): not drawn
            colors = ["tab:orange" if "(ours" in c else "tab:gray" for c in t.columns]
            ax.barh(range(len(vals)), vals.values, color=colors)
            ax.set_yticks(range(len(vals)), [textwrap.fill(c.replace(" Table 1", ""), 26) for c in t.columns],
                          fontsize=7)
            ax.set_title(label)
            ax.invert_yaxis()
        fig.suptitle(f"{dataset}: ours (orange) and published (grey; suspect transcriptions left out)")
        fig.tight_layout()
        p = out / f"metrics_{dataset}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def plot_detector_traces(results: Path, out: Path, runs: Optional[Iterable[Path | str]] = None) -> Optional[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = _found([results] if runs is None else runs, "detector.json")
    if not files:
        return None
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for f in files:
        d = json.loads(f.read_text())
        tr = d.get("trace", [])
        if not tr:
            continue
        label = f.parent.parent.name if f.parent.name in ("coarse", "fine") else f.parent.name
        steps = [t["step"] for t in tr]
        a1.plot(steps, [t["score"] for t in tr], marker=".", label=label)
        rs = [(t["step"], t["rate"]) for t in tr if t.get("rate") is not None]
        if rs:
            a2.plot(*zip(*rs), marker=".", label=label)
        if d.get("switch_step") is not None:
            for ax in (a1, a2):
                ax.axvline(d["switch_step"], ls=":", lw=0.8, color=a1.lines[-1].get_color())
        if d.get("delta") is not None:
            a2.axhline(d["delta"], color="k", lw=0.6)
    a1.set_ylabel("S (eq. 5)")
    a2.set_ylabel("R (eq. 6)")
    a2.set_xlabel("iteration")
    a1.legend(fontsize=6, ncol=3)
    fig.suptitle("CLIP stage detector: score and moving relative change; dotted: switch; line: δ")
    fig.tight_layout()
    p = out / "detector_traces.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def write_gallery(results: Path, out: Path, metrics: pd.DataFrame,
                  runs: Optional[Iterable[Path | str]] = None) -> Optional[Path]:
    gifs = _found([results] if runs is None else runs, "turntable.gif")
    if not gifs:
        return None
    by_path = {Path(p).parent.resolve(): r for p, r in zip(metrics["path"], metrics.to_dict("records"))}
    cells = []
    for g in gifs:
        run = g.parent.parent if g.parent.name in ("fine", "coarse") else g.parent
        r = by_path.get(run.resolve()) or by_path.get(g.parent.resolve())
        cap = html.escape(f"{run.parent.name}/{run.name} ({g.parent.name})")
        if r:
            cap += f"<br>CLIP {r['clip_similarity']:.3f} · PSNR {r['psnr']:.2f} · LPIPS {r['lpips']:.3f}"
        src = html.escape(os.path.relpath(g.resolve(), out.resolve()))
        cells.append(f'<figure><img src="{src}" width="256"><figcaption>{cap}</figcaption></figure>')
    page = ("<!doctype html><meta charset='utf-8'><title>lift3d turntables</title>"
            "<style>body{font-family:sans-serif}figure{display:inline-block;margin:8px;text-align:center;"
            "font-size:12px}</style><h1>Turntables</h1>\n" + "\n".join(cells) + "\n")
    p = out / "gallery.html"
    p.write_text(page)
    return p


def summarize(ours: pd.DataFrame, failures: Iterable[dict] = ()) -> dict:
    """The flat digest of a benchmark: how many assets, evaluated and failed, the mean of each metric
    over the evaluated ones, and each failure as {asset, step, reason}."""
    failures = [dict(f) for f in failures]
    summary: dict = {"assets": len(ours) + len(failures), "evaluated": len(ours), "failed": len(failures)}
    for key, _ in METRICS:
        if len(ours):
            summary[f"mean_{key}"] = float(ours[key].mean())
    summary["failures"] = failures
    return summary


def write_report(results: Path | str, out: Path | str = "reports", runs: Optional[Iterable[Path | str]] = None,
                 failures: Iterable[dict] = ()) -> dict[str, str]:
    """Everything under `out`: report.md (tables), per_asset.csv, summary.json, metrics_*.png,
    detector_traces.png, gallery.html, and report.html with its assets/ (core.evaluation.report_html). `runs`: only these run folders (default: all under `results`);
    `failures`: the assets that failed ({asset, step, reason}), listed in report.md and summary.json.
    Returns what was written."""
    results, out = Path(results), Path(out)
    runs = None if runs is None else [Path(r) for r in runs]
    failures = [dict(f) for f in failures]
    out.mkdir(parents=True, exist_ok=True)
    ours = collect_metrics(results, runs)
    published = load_published()
    datasets = sorted(set(ours["dataset"]) | {"NeRF4", "RealFusion15"})
    tables = {d: paper_table(ours, published, d) for d in datasets}
    lines = ["# lift3d benchmark report", "",
             f"Runs found under `{results}`: {len(ours)} evaluated assets. Published columns are "
             f"transcribed in `core/evaluation/data/published_metrics.csv` (sources cited there). Ours: mean over "
             f"the dataset's assets.", ""]
    for d, t in tables.items():
        lines += [f"## {d}", "", _fmt(t), ""]
    if len(ours):
        lines += ["## Per asset", "", ours.drop(columns=["path"]).to_markdown(index=False, floatfmt=".3f"), ""]
    if failures:
        lines += [f"## Failures ({len(failures)})", "",
                  pd.DataFrame(failures, columns=["asset", "step", "reason"]).to_markdown(index=False), ""]
    written = {}
    (out / "report.md").write_text("\n".join(lines))
    written["report"] = str(out / "report.md")
    ours.to_csv(out / "per_asset.csv", index=False)
    written["per_asset"] = str(out / "per_asset.csv")
    summary = summarize(ours, failures)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    written["summary"] = str(out / "summary.json")
    plots = plot_metric_bars(tables, out)
    for p in plots:
        written[p.stem] = str(p)
    p = plot_detector_traces(results, out, runs)
    if p:
        written["detector_traces"] = str(p)
        plots.append(p)
    p = write_gallery(results, out, ours, runs)
    if p:
        written["gallery"] = str(p)
    suspect = {d: suspect_entries(published, d) for d in tables}
    written["html"] = str(write_html(out, tables, ours, summary, METRICS, suspect, plots, failures, str(results)))
    return written
