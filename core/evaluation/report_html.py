"""The benchmark report as one HTML page (report.html), beside report.md in the same folder.

What it shows: per dataset, our mean metrics beside the papers' figures (the same table as
report.md); the per-asset table (metrics, and each stage's seconds, iterations per second and peak
memory from its result.json); the metric plots and detector traces; and one card per asset with the
input photo, the render at the reference view, the fine stage's turntable and an interactive 3D view
of its GLB.

The page works offline, opened straight from disk: every picture and mesh it shows is copied into
OUT/assets/<asset>/, and the 3D view is Google's <model-viewer> (npm @google/model-viewer, its
self-contained UMD build, a classic script a file:// page may load) copied next to report.html from
where scripts/install_model_viewer.py put it (core.evaluation.report_html.viewer_source). A browser
will not fetch a file:// mesh from a page, so each GLB up to `embed_limit` bytes is also embedded in
the page as a data: URI; a larger one is linked (serve the folder over HTTP to view it). Without the
viewer's script the page shows the turntable alone and says how to get the 3D view.
"""
from __future__ import annotations

import base64
import html
import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import pandas as pd

log = logging.getLogger(__name__)

VIEWER_PACKAGE = "@google/model-viewer"
VIEWER_VERSION = "4.4.0"
VIEWER_FILE = "model-viewer-umd.min.js"  # the package's dist/ build with three.js inside, no imports
EMBED_LIMIT = 8 * 2**20  # bytes of GLB embedded in the page as a data: URI


def viewer_cache() -> Path:
    """Where scripts/install_model_viewer.py puts the viewer: $LIFT3D_CACHE or ~/.cache/lift3d,
    then model-viewer/<version>/."""
    root = os.environ.get("LIFT3D_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "lift3d") / "model-viewer" / VIEWER_VERSION


def viewer_source() -> Optional[Path]:
    """The model-viewer script to copy beside report.html: $LIFT3D_MODEL_VIEWER_JS when set (an
    empty value: none), else the installed one; None when there is none."""
    env = os.environ.get("LIFT3D_MODEL_VIEWER_JS")
    if env is not None:
        return Path(env) if env and Path(env).is_file() else None
    p = viewer_cache() / VIEWER_FILE
    return p if p.is_file() else None


@dataclass
class AssetView:
    """What the page shows of one evaluated asset; paths relative to report.html."""

    key: str
    asset: str
    dataset: str
    method: str
    priors: str
    metrics: dict
    stage: str = ""
    photo: Optional[str] = None
    render: Optional[str] = None
    turntable: Optional[str] = None
    glb: Optional[str] = None  # the copied file, for the download link
    glb_src: Optional[str] = None  # what <model-viewer src> gets: a data: URI or the copied file
    glb_bytes: int = 0
    stages: list = field(default_factory=list)  # [{stage, steps, seconds, it_per_s, peak_memory_gib, memory_kind}]


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_") or "asset"


def _stage_summary(result_json: Path) -> Optional[dict]:
    try:
        r = json.loads(result_json.read_text())
    except (OSError, ValueError):
        return None
    s = r.get("summary") or {}
    return {"stage": r.get("stage", result_json.parent.name), "steps": r.get("steps"),
            "seconds": s.get("seconds", r.get("seconds")), "it_per_s": s.get("it_per_s"),
            "peak_memory_gib": s.get("peak_memory_gib"), "memory_kind": s.get("memory_kind"),
            "outputs_seconds": s.get("outputs_seconds")}


def collect_assets(ours: pd.DataFrame, out: Path, embed_limit: int = EMBED_LIMIT) -> list[AssetView]:
    """Copy each asset's pictures and mesh into out/assets/<key>/ and describe them for the page.
    `ours` is core.evaluation.report.collect_metrics's table (its `path` is the run's metrics.json)."""
    views, used = [], set()
    for r in ours.to_dict("records"):
        metrics_json = Path(r["path"])
        run = metrics_json.parent
        try:
            m = json.loads(metrics_json.read_text())
        except (OSError, ValueError):
            m = {}
        stage = Path(m["stage_dir"]) if m.get("stage_dir") else None
        if stage is None or not stage.is_dir():
            stage = next((run / s for s in ("fine", "coarse") if (run / s / "result.json").is_file()), run)
        key = _slug(r["asset"])
        if key in used:
            key = _slug(f"{r['asset']}-{r['method']}-{len(used)}")
        used.add(key)
        dest = out / "assets" / key
        v = AssetView(key=key, asset=r["asset"], dataset=r["dataset"], method=r["method"], priors=r["priors"],
                      metrics={k: r[k] for k in ("clip_similarity", "psnr", "lpips")}, stage=stage.name)

        def take(src: Path, name: str) -> Optional[str]:
            if not src.is_file():
                return None
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest / name)
            return f"assets/{key}/{name}"

        v.photo = take(run / "inputs" / "rgba.png", "photo.png") or take(stage / "reference_rgba.png", "photo.png")
        v.render = take(stage / "renders" / "reference.png", "render.png")
        v.turntable = take(stage / "turntable.gif", "turntable.gif") or take(stage / "renders" / "novel_000.png",
                                                                              "novel.png")
        glb = stage / "mesh.glb"
        v.glb = take(glb, "mesh.glb")
        if v.glb:
            v.glb_bytes = glb.stat().st_size
            if v.glb_bytes <= embed_limit:
                v.glb_src = "data:model/gltf-binary;base64," + base64.b64encode(glb.read_bytes()).decode()
            else:
                v.glb_src = v.glb
        for s in ("coarse", "fine"):
            summ = _stage_summary(run / s / "result.json")
            if summ:
                v.stages.append(summ)
        views.append(v)
    return views


# ------------------------------------------------------------------------------------------ page

TEMPLATE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
{% if viewer %}<script src="{{ viewer }}"></script>{% endif %}
<style>
:root { --ours: #e8762b; --ink: #1f2328; --mute: #656d76; --line: #d0d7de; --bg: #f6f8fa; }
* { box-sizing: border-box; }
body { font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: var(--ink);
       margin: 0; background: #fff; }
main { max-width: 1240px; margin: 0 auto; padding: 20px 24px 40px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 28px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 0 0 8px; }
.sub { color: var(--mute); margin: 0 0 14px; }
.chips { display: flex; gap: 10px; flex-wrap: wrap; margin: 10px 0 4px; }
.chip { background: var(--bg); border: 1px solid var(--line); border-radius: 8px; padding: 8px 14px; min-width: 120px; }
.chip b { display: block; font-size: 20px; }
.chip span { color: var(--mute); font-size: 12px; }
.chip.bad b { color: #cf222e; }
.note { background: #fff8c5; border: 1px solid #d4a72c66; border-radius: 6px; padding: 8px 12px; margin: 10px 0; }
.top { display: flex; flex-wrap: wrap; gap: 0 28px; align-items: flex-start; }
.top > section { flex: 1 1 100%; min-width: 0; }
.small { font-size: 12px; max-width: 640px; }
h3.fail { color: #cf222e; margin-top: 16px; }
td.wrap { white-space: normal; max-width: 420px; }
table { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: right; white-space: nowrap; }
th { background: var(--bg); font-weight: 600; }
td.l, th.l { text-align: left; }
tbody tr:nth-child(even) td { background: #fbfcfd; }
.papers th.ours, .papers td.ours { background: #fdf0e6 !important; border-left: 2px solid var(--ours);
       border-right: 2px solid var(--ours); }
.papers th { white-space: normal; min-width: 64px; max-width: 96px; font-size: 12px; vertical-align: bottom; }
td.suspect { color: #8c959f; text-decoration: line-through; }
.scroll { overflow-x: auto; }
.plots img { max-width: 100%; border: 1px solid var(--line); border-radius: 6px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(580px, 1fr)); gap: 16px; }
.card { border: 1px solid var(--line); border-radius: 10px; padding: 12px; background: #fff; }
.card .m { color: var(--mute); font-size: 12px; margin-bottom: 8px; }
.views { display: grid; grid-template-columns: repeat(4, minmax(0, 1fr)); gap: 8px; }
model-viewer { --progress-bar-color: var(--ours); --progress-bar-height: 2px; --poster-color: #fff; }
.views figure { margin: 0; text-align: center; }
.views img, .views model-viewer, .views .empty { width: 100%; aspect-ratio: 1; object-fit: contain;
       background: #fff; border: 1px solid var(--line); border-radius: 6px; display: block; }
.views .checker { background: repeating-conic-gradient(#eee 0% 25%, #fff 0% 50%) 50% / 16px 16px; }
.views .empty { display: flex; align-items: center; justify-content: center; color: var(--mute); font-size: 12px; }
figcaption { font-size: 12px; color: var(--mute); margin-top: 3px; }
a { color: #0969da; }
footer { color: var(--mute); font-size: 12px; margin-top: 30px; }
</style></head>
<body><main>
<h1>{{ title }}</h1>
<p class="sub">{{ subtitle }}</p>
<div class="chips">
  <div class="chip"><b>{{ summary.assets }}</b><span>assets</span></div>
  <div class="chip"><b>{{ summary.evaluated }}</b><span>evaluated</span></div>
  <div class="chip {{ 'bad' if summary.failed else '' }}"><b>{{ summary.failed }}</b><span>failed</span></div>
  {% for key, label in means %}<div class="chip"><b>{{ key }}</b><span>{{ label }}</span></div>{% endfor %}
</div>
{% if tiny %}<p class="note">These runs use the tiny random test priors (<code>models.tiny</code>): they check the
machinery end to end; their numbers are no reproduction of a paper and are not comparable with its columns.</p>{% endif %}

<div class="top">
<section class="papers-col">
<h2>Ours beside the papers</h2>
{% for t in tables %}<h3>{{ t.dataset }}</h3><div class="scroll">{{ t.html }}</div>
{% endfor %}
<p class="sub small">Ours (orange): the mean over the dataset's evaluated assets. Published: transcribed in
<code>core/evaluation/data/published_metrics.csv</code> with their sources; a struck-out value is a suspect
transcription (kept as printed, left out of the plots).</p>
</section>
<section class="assets-col">
<h2>Per asset</h2>
<div class="scroll">{{ per_asset }}</div>
{% if failures %}<h3 class="fail">Failures ({{ failures|length }})</h3>
<table><thead><tr><th class="l">asset</th><th class="l">step</th><th class="l">reason</th></tr></thead><tbody>
{% for f in failures %}<tr><td class="l">{{ f.asset }}</td><td class="l">{{ f.step }}</td><td class="l wrap">{{ f.reason }}</td></tr>
{% endfor %}</tbody></table>{% endif %}
</section>
</div>

<h2>Assets</h2>
{% if not viewer %}<p class="note">No interactive 3D view: the viewer script was not found when this report was
written (<code>python scripts/install_model_viewer.py</code> installs it from npm; then write the report again).
The turntables show each mesh.</p>{% endif %}
<div class="cards">
{% for a in assets %}<section class="card" id="{{ a.key }}">
  <h3>{{ a.asset }} <span class="m">· {{ a.dataset }} · {{ a.method }}{% if a.priors != 'pretrained' %} ({{ a.priors }} priors){% endif %} · {{ a.stage }} stage</span></h3>
  <div class="m">CLIP {{ '%.3f' % a.metrics.clip_similarity }} · PSNR {{ '%.2f' % a.metrics.psnr }} dB · LPIPS {{ '%.3f' % a.metrics.lpips }}
  {% for s in a.stages %} · {{ s.stage }} {{ fmt_s(s.seconds) }}{% if s.it_per_s %} ({{ '%.2f' % s.it_per_s }} it/s){% endif %}{% endfor %}</div>
  <div class="views">
    <figure>{% if a.photo %}<img class="checker" src="{{ a.photo }}" alt="input photo of {{ a.asset }}">{% else %}<div class="empty">no photo</div>{% endif %}<figcaption>input</figcaption></figure>
    <figure>{% if a.render %}<img class="checker" src="{{ a.render }}" alt="render at the reference view">{% else %}<div class="empty">no render</div>{% endif %}<figcaption>render, reference view</figcaption></figure>
    <figure>{% if a.turntable %}<img src="{{ a.turntable }}" alt="turntable of {{ a.asset }}">{% else %}<div class="empty">no turntable</div>{% endif %}<figcaption>turntable</figcaption></figure>
    <figure>{% if viewer and a.glb_src %}<model-viewer src="{{ a.glb_src }}" {% if a.turntable %}poster="{{ a.turntable }}" {% endif %}alt="3D view of {{ a.asset }}" camera-controls auto-rotate touch-action="pan-y" shadow-intensity="0.6" exposure="1.1" interaction-prompt="none" loading="eager" reveal="auto"></model-viewer>{% elif a.turntable %}<img src="{{ a.turntable }}" alt="turntable of {{ a.asset }} (no 3D viewer)">{% else %}<div class="empty">no mesh</div>{% endif %}
      <figcaption>{% if viewer and a.glb_src %}3D: drag to turn{% else %}3D view unavailable{% endif %}{% if a.glb %} · <a href="{{ a.glb }}" download>mesh.glb</a> ({{ kib(a.glb_bytes) }}){% endif %}</figcaption></figure>
  </div>
</section>
{% endfor %}</div>

{% if plots %}<h2>Plots</h2>
<div class="plots">{% for p in plots %}<p><img src="{{ p }}" alt="{{ p }}"></p>{% endfor %}</div>{% endif %}
<footer>Written by lift3d's report (core/evaluation/report_html.py){% if viewer %}; 3D view: {{ viewer_name }} {{ viewer_version }} (BSD-3-Clause, see {{ viewer_license }}){% endif %}.
Tables also in report.md, per_asset.csv and summary.json beside this page.</footer>
</main></body></html>
"""


def _fmt_seconds(s) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "–"
    s = float(s)
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def _kib(n: int) -> str:
    return f"{n / 2**10:.0f} KiB" if n < 2**20 else f"{n / 2**20:.1f} MiB"


def paper_table_html(t: pd.DataFrame, suspect: set[tuple[str, str]], metrics: list[tuple[str, str]]) -> str:
    """The ours-beside-published table (rows: metrics; columns: methods) as HTML; ours highlighted;
    `suspect`: the {(column, metric key)} to strike out; `metrics`: [(key, row label)]."""
    label_key = {label: key for key, label in metrics}
    ours = [("(ours" in c) for c in t.columns]
    head = "".join(f'<th class="{"ours" if o else ""}">{html.escape(c.replace(" Table 1", ""))}</th>'
                   for c, o in zip(t.columns, ours))
    rows = []
    for label, r in t.iterrows():
        cells = []
        for c, o in zip(t.columns, ours):
            v = r[c]
            cls = ["ours"] if o else []
            if (c, label_key.get(label)) in suspect:
                cls.append("suspect")
            txt = "–" if pd.isna(v) else f"{v:.3f}"
            cells.append(f'<td class="{" ".join(cls)}">{txt}</td>')
        rows.append(f'<tr><th class="l">{html.escape(str(label))}</th>{"".join(cells)}</tr>')
    return f'<table class="papers"><thead><tr><th></th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


_MEMORY = {"process max RSS": "RSS", "GPU max allocated": "GPU"}  # core.perf's memory kinds, short


def per_asset_html(views: list[AssetView]) -> str:
    """One row per asset: metrics, then each stage's seconds, it/s and peak memory."""
    head = ("<tr><th class='l'>asset</th><th class='l'>dataset</th><th class='l'>method</th><th class='l'>priors</th>"
            "<th>CLIP↑</th><th>PSNR↑</th><th>LPIPS↓</th><th class='l'>stages: loop time, it/s, outputs' time, peak memory</th></tr>")
    rows = []
    for v in views:
        st = "; ".join(
            f"{s['stage']} {_fmt_seconds(s['seconds'])}"
            + (f", {s['it_per_s']:.2f} it/s" if s.get("it_per_s") else "")
            + (f", outputs {_fmt_seconds(s['outputs_seconds'])}" if s.get("outputs_seconds") is not None else "")
            + (f", peak {s['peak_memory_gib']:.2f} GiB {_MEMORY.get(s.get('memory_kind'), '')}".rstrip()
               if s.get("peak_memory_gib") is not None else "")
            for s in v.stages) or "–"
        rows.append(f"<tr><td class='l'><a href='#{html.escape(v.key)}'>{html.escape(v.asset)}</a></td>"
                    f"<td class='l'>{html.escape(v.dataset)}</td><td class='l'>{html.escape(v.method)}</td>"
                    f"<td class='l'>{html.escape(v.priors)}</td><td>{v.metrics['clip_similarity']:.3f}</td>"
                    f"<td>{v.metrics['psnr']:.2f}</td><td>{v.metrics['lpips']:.3f}</td>"
                    f"<td class='l'>{html.escape(st)}</td></tr>")
    return f"<table class='assets'><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"


def write_html(out: Path, tables: dict[str, pd.DataFrame], ours: pd.DataFrame, summary: dict,
               metrics: list[tuple[str, str]], suspect: dict[str, set[tuple[str, str]]],
               plots: Iterable[Path | str] = (), failures: Iterable[dict] = (), results: str = "",
               embed_limit: int = EMBED_LIMIT) -> Path:
    """out/report.html (and out/assets/, and the viewer's script beside it when installed).
    core.evaluation.report.write_report gives it what it made: the tables by dataset, the per-asset
    metrics, summary.json's content, the metrics [(key, label)], each dataset's suspect published
    entries, the plots and the failures."""
    import jinja2
    from markupsafe import Markup

    out = Path(out)
    with_runs = set(ours["dataset"]) if len(ours) else set(tables)
    shown = [{"dataset": d, "html": paper_table_html(t, suspect.get(d, set()), metrics)} for d, t in tables.items()
             if d in with_runs]
    views = collect_assets(ours, out, embed_limit)
    plots = [Path(p) for p in plots if not (Path(p).stem.startswith("metrics_") and Path(p).stem[8:] not in with_runs)]
    viewer = viewer_source()
    viewer_name = None
    if viewer is not None:
        shutil.copyfile(viewer, out / VIEWER_FILE)
        lic = viewer.parent / "LICENSE"
        if lic.is_file():
            shutil.copyfile(lic, out / "model-viewer.LICENSE.txt")
        viewer_name = VIEWER_FILE
    elif (out / VIEWER_FILE).exists():
        (out / VIEWER_FILE).unlink()  # an earlier report's copy: this page does not use it
    means = [(f"{summary[f'mean_{k}']:.3f}" if k != "psnr" else f"{summary[f'mean_{k}']:.2f}", f"mean {label}")
             for k, label in metrics if f"mean_{k}" in summary]
    methods = sorted(set(ours["method"])) if len(ours) else []
    subtitle = (f"{', '.join(sorted(with_runs))} · method {', '.join(methods) or '–'} · runs under {results}")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    env.globals.update(fmt_s=_fmt_seconds, kib=_kib)
    page = env.from_string(TEMPLATE).render(
        title="lift3d benchmark report", subtitle=subtitle, summary=summary, means=means,
        tiny=bool(len(ours)) and any(p != "pretrained" for p in ours["priors"]),
        tables=[{**t, "html": Markup(t["html"])} for t in shown],
        per_asset=Markup(per_asset_html(views)), failures=[dict(f) for f in failures], assets=views,
        plots=[os.path.relpath(Path(p).resolve(), out.resolve()) for p in plots], viewer=viewer_name,
        viewer_name=VIEWER_PACKAGE, viewer_version=VIEWER_VERSION, viewer_license="model-viewer.LICENSE.txt")
    p = out / "report.html"
    p.write_text(page)
    return p

