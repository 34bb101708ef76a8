"""`lift3d generate-many PHOTOS... --out DIR`: many plain photos into assets, resumably, with a manifest.

PHOTOS are photos, folders of photos (searched recursively; a benchmark folder's companion maps
depth.* / normal.* / mask.* are left out), globs (quoted, `**` allowed) or list files (one path per
line, relative to the list file; `#` starts a comment). No alpha channel is needed: the prepare step
segments each photo (an alpha channel that is there is used as is). Each asset is named after its
file (its folder when the file is generically named, e.g. `teddy_bear/rgba.png` → `teddy_bear`; more
parent folders when two names collide) and goes through the steps of `generate` (flows.generate.
submit_asset) into DIR/NAME.

The manifest DIR/manifest.csv (and manifest.parquet where pyarrow imports) has one row per selected
asset: status (ok, failed, pending: not run yet because of --limit), the failed step and its one-line
error, seconds of the steps run now, the metrics, the output paths, the worker that ran it and how
many priors that took (prior_loads; worker_prior_loads: the worker's loads so far). It is rewritten
after every asset, so a killed run leaves the record of what finished. A rerun skips the assets whose
status is ok and whose metrics.json is still there; the rest run again (their finished steps are
cached). `--limit N` runs at most N of the assets still to do; `--shard i/n` takes every n-th asset
(sorted by name) from the i-th on, so n hosts with the same PHOTOS and DIR split the work without
talking to each other (each writes manifest-shard-i-of-n.csv; every manifest in DIR counts as done).

Scale-out is the benchmark's: `--workers N` local Dask worker processes (CPU), `--gpus N` one dask-cuda
worker per GPU (`--per-gpu K`: K worker processes on each), `--scheduler ADDRESS` an existing Dask
cluster; each worker loads the priors once and reuses them for every asset it runs (core.models.cache). One failed photo is recorded while the
others finish; the command then exits 1 with one line per failed asset.
"""
from __future__ import annotations

import glob
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Optional

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from core.errors import InputError
from core.params import Params, load_params
from flows.failures import first_failure
from flows.generate import submit_asset
from tasks.artifacts import Progress, publish_table
from tasks.common import clear_marker, read_step_records
from tasks.tracking import end_parent_run, start_parent_run

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
COMPANION_STEMS = {"depth", "normal", "mask"}  # a benchmark object folder's maps beside rgba.png
GENERIC_STEMS = {"rgba", "rgb", "image", "img", "photo", "input", "source", "original"}
METRICS = ("psnr", "lpips", "clip_similarity")
COLUMNS = ("asset", "status", "step", "error", "seconds", *METRICS, "photo", "run_dir", "mesh_glb", "mesh_obj",
           "metrics_json", "worker", "prior_loads", "prior_reuses", "worker_prior_loads", "flow_run_id", "finished")


# -- which photos, under which names ---------------------------------------------------------------
def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and p.stem.lower() not in COMPANION_STEMS)


def collect_photos(specs: list[str]) -> list[Path]:
    """The photos that PHOTOS name (photos, folders, globs, list files), in the order given, each once."""
    found: list[Path] = []
    for spec in specs:
        p = Path(spec).expanduser()
        if p.is_dir():
            got = _images_in(p)
        elif p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            got = [p]
        elif p.is_file():  # a list file
            got = []
            for line in p.read_text().splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    q = Path(line).expanduser()
                    got.append(q if q.is_absolute() else p.parent / q)
            missing = [str(q) for q in got if not q.is_file()]
            if missing:
                raise InputError(f"{spec} lists {len(missing)} photo(s) that do not exist, e.g. {missing[0]}")
        elif any(c in spec for c in "*?["):
            got = sorted(Path(q) for q in glob.glob(str(p), recursive=True)
                         if Path(q).is_file() and Path(q).suffix.lower() in IMAGE_SUFFIXES)
        else:
            raise InputError(f"not a photo, a folder, a glob or a list file: {spec}")
        if not got:
            raise InputError(f"no photos in {spec}")
        found.extend(got)
    seen, out = set(), []
    for p in found:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def _clean(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("._") or "photo"


def asset_names(photos: list[Path]) -> dict[str, Path]:
    """{name: photo}: the file's stem (its folder's name for a generic stem such as rgba), with parent
    folders prepended ('nerf4-chair') only where names would collide."""
    chains = []
    for p in photos:
        parts = [p.stem] if p.stem.lower() not in GENERIC_STEMS else []
        parts += [a.name for a in p.resolve().parents if a.name]
        chains.append([_clean(x) for x in parts] or ["photo"])
    depth = [1] * len(photos)
    while True:
        names = ["-".join(reversed(c[:d])) for c, d in zip(chains, depth)]
        clash = {n for n in names if names.count(n) > 1}
        if not clash:
            return dict(sorted(zip(names, photos)))
        grew = False
        for i, n in enumerate(names):
            if n in clash and depth[i] < len(chains[i]):
                depth[i] += 1
                grew = True
        if not grew:  # identical folder chains: number them in the order given
            counts: dict[str, int] = {}
            for i, n in enumerate(names):
                counts[n] = counts.get(n, 0) + 1
                if counts[n] > 1:
                    chains[i] = [f"{chains[i][0]}_{counts[n]}", *chains[i][1:]]


def parse_shard(text: Optional[str]) -> tuple[int, int]:
    """'i/n' (1 ≤ i ≤ n) → (i, n); None → (1, 1)."""
    if not text:
        return 1, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not (1 <= int(m.group(1)) <= int(m.group(2))):
        raise InputError(f"--shard wants i/n with 1 ≤ i ≤ n (e.g. 2/4), not {text!r}")
    return int(m.group(1)), int(m.group(2))


def shard_of(names: list[str], i: int, n: int) -> list[str]:
    """The i-th of n shards (1-based): every n-th name of the sorted names from the i-th on."""
    return sorted(names)[i - 1::n]


# -- the manifest ----------------------------------------------------------------------------------
def manifest_stem(i: int, n: int) -> str:
    return "manifest" if n == 1 else f"manifest-shard-{i}-of-{n}"


def read_manifests(out: Path) -> dict[str, dict]:
    """Every manifest row in OUT ({asset: row}); a row with status ok wins over others."""
    import pandas as pd

    rows: dict[str, dict] = {}
    for f in sorted(out.glob("manifest*.csv")):
        try:
            table = pd.read_csv(f, keep_default_na=False, na_values=[""])
        except (OSError, ValueError, pd.errors.EmptyDataError):
            continue
        for r in table.to_dict("records"):
            r = {k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()}
            name = str(r.get("asset"))
            if name not in rows or r.get("status") == "ok":
                rows[name] = r
    return rows


def is_done(out: Path, row: Optional[dict]) -> bool:
    return bool(row) and row.get("status") == "ok" and (out / str(row["asset"]) / "metrics.json").is_file()


def write_manifest(out: Path, stem: str, rows: list[dict], parquet: bool = True) -> dict[str, str]:
    """OUT/STEM.csv (and STEM.parquet where pyarrow imports), written whole and atomically."""
    import pandas as pd

    table = pd.DataFrame(rows, columns=list(COLUMNS)).sort_values("asset", kind="stable")
    written = {}
    tmp = out / f".{stem}.csv.tmp"
    table.to_csv(tmp, index=False)
    tmp.replace(out / f"{stem}.csv")
    written["csv"] = str(out / f"{stem}.csv")
    if parquet:
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            return written
        tmp = out / f".{stem}.parquet.tmp"
        table.astype({c: "string" for c in ("step", "error", "worker", "flow_run_id", "mesh_glb", "mesh_obj",
                                            "metrics_json", "finished")}).to_parquet(tmp, index=False)
        tmp.replace(out / f"{stem}.parquet")
        written["parquet"] = str(out / f"{stem}.parquet")
    return written


def asset_row(name: str, photo: str, run_dir: Path, failure=None, flow_run_id: Optional[str] = None) -> dict:
    """One manifest row from an asset's run folder: its metrics, outputs and step records of this flow run."""
    row = {c: None for c in COLUMNS}
    row.update(asset=name, photo=str(photo), run_dir=str(run_dir), status="failed" if failure else "ok",
               finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), flow_run_id=flow_run_id)
    if failure is not None:
        row.update(step=failure.step, error=failure.reason)
    else:
        metrics_json = run_dir / "metrics.json"
        if metrics_json.is_file():
            m = json.loads(metrics_json.read_text())
            row.update({k: m.get(k) for k in METRICS}, metrics_json=str(metrics_json))
        for col, f in (("mesh_glb", "fine/mesh.glb"), ("mesh_obj", "fine/mesh.obj")):
            if (run_dir / f).is_file():
                row[col] = str(run_dir / f)
    records = [r for r in read_step_records(run_dir).values() if flow_run_id and r.get("flow_run_id") == flow_run_id]
    row["seconds"] = round(sum(r.get("seconds") or 0 for r in records), 2)
    row["prior_loads"] = sum(r.get("prior_loads") or 0 for r in records)
    row["prior_reuses"] = sum(r.get("prior_reuses") or 0 for r in records)
    if records:
        row["worker"] = " ".join(sorted({r["worker"] for r in records if r.get("worker")}))
        row["worker_prior_loads"] = max(r.get("worker_prior_loads") or 0 for r in records)
    return row


def summarize(rows: list[dict], skipped: int, wall_seconds: float, ran_now: set[str]) -> dict:
    """Counts, mean metrics, and per worker of this run (`ran_now`: the assets it ran; the rows kept
    from earlier runs still name their workers): the assets with a step on it (an asset's steps are
    separate Dask tasks and may run on several workers), prior loads (the worker's total)."""
    ok = [r for r in rows if r["status"] == "ok"]
    workers: dict[str, dict] = {}
    ran = [r for r in rows if r["asset"] in ran_now]
    for r in ran:
        for w in str(r.get("worker") or "").split():
            d = workers.setdefault(w, {"assets_with_steps": 0, "prior_loads": 0})
            d["assets_with_steps"] += 1
            d["prior_loads"] = max(d["prior_loads"], int(r.get("worker_prior_loads") or 0))
    means = {}
    for k in METRICS:
        vals = [float(r[k]) for r in ok if r.get(k) is not None]
        if vals:
            means[f"mean_{k}"] = sum(vals) / len(vals)
    return {"assets": len(rows), "ok": len(ok), "failed": sum(r["status"] == "failed" for r in rows),
            "pending": sum(r["status"] == "pending" for r in rows), "skipped_done": skipped,
            "ran_now": len(ran), "wall_seconds": round(wall_seconds, 1),
            "prior_loads": sum(int(r.get("prior_loads") or 0) for r in ran),
            "prior_reuses": sum(int(r.get("prior_reuses") or 0) for r in ran),
            "workers": workers, **means,
            "failures": [{"asset": r["asset"], "step": r["step"], "reason": r["error"]}
                         for r in rows if r["status"] == "failed"]}


# -- the flow ----------------------------------------------------------------------------------------
@flow(name="generate-many", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def generate_many_flow(assets: dict[str, str], out: str, params: Params, kept: Optional[list[dict]] = None,
                       manifest: str = "manifest", preset: Optional[str] = None,
                       step_timeout: Optional[float] = None) -> dict:
    """Generate `assets` ({name: photo}) into OUT/NAME; `kept`: manifest rows carried over as they are
    (done before, or pending). Writes OUT/MANIFEST.csv (+ .parquet) after every asset and
    OUT/MANIFEST.summary.json at the end; returns {rows, summary, manifest}."""
    from prefect.runtime import flow_run

    t0 = time.perf_counter()
    out_p = Path(out)
    out_p.mkdir(parents=True, exist_ok=True)
    this_run = str(flow_run.id) if flow_run.id else None
    kept = list(kept or [])
    rows_by_name = {r["asset"]: r for r in kept}
    parent = start_parent_run(params.to_dict(), f"generate-many/{out_p.name}/{preset}",
                              tags={"kind": "generate-many", "preset": str(preset)})
    rows: list[dict] = []
    summary: dict = {}
    written: dict = {}
    try:
        chains = {}
        for name, photo in assets.items():
            p = params
            if params.prompt.text is None and params.method == "consistent123":
                from flows.benchmark import describe

                p = params.with_inputs(text=describe(name))
            chains[name] = submit_asset(Path(photo), out_p / name, p, asset=name, dataset=None,
                                        parent_run_id=parent, step_timeout=step_timeout)
        progress = Progress(len(chains), f"generate-many {out_p.name}: assets finished")
        for done, (name, chain) in enumerate(chains.items(), 1):
            failed = first_failure(name, chain)
            if failed is not None:
                log.error("generate-many: %s failed at %s: %s", name, failed.step, failed.reason)
                clear_marker(out_p / name, "metrics.json")  # an earlier run's metrics are not this run's
            rows_by_name[name] = asset_row(name, assets[name], out_p / name, failed, this_run)
            written = write_manifest(out_p, manifest, list(rows_by_name.values()), parquet=done == len(chains))
            progress.update(done)
        rows = sorted(rows_by_name.values(), key=lambda r: r["asset"])
        written = write_manifest(out_p, manifest, rows)
        summary = summarize(rows, sum(1 for r in kept if r.get("status") == "ok"), time.perf_counter() - t0,
                            set(assets))
        (out_p / f"{manifest}.summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        written["summary"] = str(out_p / f"{manifest}.summary.json")
        publish_table(f"generate-many-{out_p.name}-{manifest}", rows, f"generate-many into {out_p}: one row per asset")
        return {"rows": rows, "summary": summary, "manifest": written}
    finally:
        means = {k: v for k, v in summary.items() if k.startswith("mean_")} if summary else None
        end_parent_run(params.to_dict(), parent, {**(means or {}), **{k: summary[k] for k in (
            "ok", "failed", "prior_loads") if k in summary}} if summary else None,
                       "FINISHED" if summary and not summary["failed"] else "FAILED", table=rows or None)


def plan(specs: list[str], out: Path, shard: Optional[str] = None, limit: int = 0):
    """(to run {name: photo}, kept rows, manifest stem): the shard's assets less those done, at most
    `limit` of them (0: all); kept rows are the done ones and those left pending by the limit."""
    i, n = parse_shard(shard)
    named = asset_names(collect_photos(specs))
    mine = shard_of(list(named), i, n)
    before = read_manifests(out) if out.is_dir() else {}
    kept, todo = [], {}
    for name in mine:
        if is_done(out, before.get(name)):
            kept.append({c: before[name].get(c) for c in COLUMNS})
        elif limit and len(todo) >= limit:
            row = {c: None for c in COLUMNS}
            row.update(asset=name, photo=str(named[name]), status="pending", run_dir=str(out / name))
            kept.append(row)
        else:
            todo[name] = str(named[name])
    return todo, kept, manifest_stem(i, n), len(named)


def cli_generate_many(args) -> int:
    from flows.benchmark import task_runner

    out = Path(args.out)
    runner = task_runner(args.gpus, args.scheduler, args.workers, args.per_gpu)  # bad options fail here, at once
    todo, kept, stem, total = plan([str(p) for p in args.photos], out, args.shard, args.limit)
    done = sum(1 for r in kept if r["status"] == "ok")
    print(f"generate-many: {total} photo(s); this shard {len(todo) + len(kept)}: {done} done before (skipped), "
          f"{len(todo)} to run" + (f", {len(kept) - done} left pending (--limit {args.limit})" if len(kept) > done else ""))
    if not todo:
        out.mkdir(parents=True, exist_ok=True)
        written = write_manifest(out, stem, kept)
        print(f"nothing to run; manifest: {written['csv']}")
        return 0
    from flows.server import start_reaped_ephemeral_server

    start_reaped_ephemeral_server()  # a killed run leaves no Prefect server behind
    params = load_params(args.preset, args.overrides, args.params)
    result = generate_many_flow.with_options(task_runner=runner)(
        todo, str(out), params, kept, stem, args.preset, args.step_timeout or None)
    s = result["summary"]
    print(json.dumps({k: s[k] for k in ("assets", "ok", "failed", "pending", "skipped_done", "ran_now",
                                        "wall_seconds", "prior_loads", "prior_reuses", "workers")}, indent=2))
    print(f"manifest: {result['manifest'].get('csv')}" + (f"  parquet: {result['manifest']['parquet']}"
                                                          if "parquet" in result["manifest"] else ""))
    for f in s["failures"]:
        print(f"lift3d: error: {f['asset']}: {f['step']} failed: {f['reason']}", file=sys.stderr)
    return 1 if s["failures"] else 0
