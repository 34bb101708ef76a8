"""The table of reports/analytic/: analytic-prior runs beside the oracle, as markdown and csv.

    python scripts/analytic_table.py DIR [--out DIR]

reads DIR/analytic_<preset>[_<tag>].json and DIR/oracle_<preset>.json (scripts/analytic_bench.py)
and writes OUT/table.md and OUT/table.csv: one row per run × object with the fine mesh's
novel-view PSNR, mask IoU and Chamfer distance over the bounding-box diagonal, the coarse NeRF's
PSNR, and the oracle's figures for the same object beside them.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def rows(folder: Path) -> list[dict]:
    oracle = {}
    for f in sorted(folder.glob("oracle_*.json")):
        oracle.update(json.loads(f.read_text())["objects"])
    out = []
    def order(f: Path):  # the plain presets first (joint, 2D-only, 3D-only), then each variant
        run = f.stem[len("analytic_"):]
        preset, _, tag = run.partition("_")
        return (tag, preset.replace("-2d", "~2").replace("-3d", "~3"))

    for f in sorted(folder.glob("analytic_*.json"), key=order):
        rep = json.loads(f.read_text())
        run = f.stem[len("analytic_"):]
        for name, m in rep["objects"].items():
            o = oracle.get(name, {})
            out.append({"run": run, "object": name, "psnr_coarse": m["psnr_novel_coarse"], "psnr": m["psnr_novel"],
                        "mask_iou": m["mask_iou"], "chamfer_pct": round(100 * m["chamfer_rel"], 2),
                        "oracle_psnr": o.get("psnr_novel"), "oracle_mask_iou": o.get("mask_iou"),
                        "oracle_chamfer_pct": round(100 * o["chamfer_rel"], 2) if "chamfer_rel" in o else None,
                        "device": rep.get("gpu") or rep.get("device")})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    out = args.out or args.folder
    r = rows(args.folder)
    if not r:
        raise SystemExit(f"no analytic_*.json in {args.folder}")
    with open(out / "table.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(r[0]))
        w.writeheader()
        w.writerows(r)
    lines = ["| run | object | PSNR coarse → fine (dB) | mask IoU | Chamfer/diag | oracle PSNR | oracle IoU | oracle Chamfer |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for x in r:
        lines.append(f"| {x['run']} | {x['object']} | {x['psnr_coarse']:.2f} → {x['psnr']:.2f} | {x['mask_iou']:.3f} | "
                     f"{x['chamfer_pct']:.2f}% | {x['oracle_psnr'] if x['oracle_psnr'] is not None else '–'} | "
                     f"{x['oracle_mask_iou'] if x['oracle_mask_iou'] is not None else '–'} | "
                     f"{str(x['oracle_chamfer_pct']) + '%' if x['oracle_chamfer_pct'] is not None else '–'} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
