"""The README's main job, measured: does `lift3d generate … --preset smoke --out RUN` end in one
coherent object that matches the photo from the front?

    python scripts/main_job_check.py RUN [--out reports/main_job] [--name teddy_bear]

Bars (issue 14): the final mesh's largest connected component holds ≥ 90 % of its faces, and the
render at the reference view reaches ≥ 20 dB PSNR against the photo (RUN/metrics.json, written by
the evaluate step: the fine stage's renders/reference.png against its reference_rgba.png, both on
white). The same numbers are given for the coarse stage (its marching-cubes mesh and its reference
render) to tell which stage a miss comes from. Components: trimesh's split of the mesh with its
vertices merged by position (the OBJ's texture seams do not cut it).

Writes OUT/NAME.json (the numbers, the bars, pass/fail, the run's package versions) and OUT/NAME.png (the photo, both stages'
reference renders, the fine mesh from four sides); exit 0 when both bars are met, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MIN_SHARE = 0.90
MIN_PSNR = 20.0


def components(mesh_path: Path) -> dict:
    """Faces, number of connected components and the largest one's share of the faces."""
    import trimesh

    loaded = trimesh.load(mesh_path, force="mesh", process=False)
    m = trimesh.Trimesh(vertices=np.asarray(loaded.vertices), faces=np.asarray(loaded.faces), process=True)
    if len(m.faces) == 0:
        return {"mesh": str(mesh_path), "faces": 0, "components": 0, "largest_share": 0.0}
    parts = m.split(only_watertight=False)
    sizes = sorted((len(p.faces) for p in parts), reverse=True)
    return {"mesh": str(mesh_path), "faces": int(len(m.faces)), "components": len(parts),
            "largest_faces": int(sizes[0]), "largest_share": sizes[0] / len(m.faces),
            "largest_five": [int(s) for s in sizes[:5]]}


def stage_psnr(stage: Path) -> float | None:
    """PSNR of a stage's reference render against its reference image, as evaluate computes it."""
    from core.evaluation.evaluate import load_rgb_on_white, pil_on_white
    from core.evaluation.metrics import psnr

    render, ref = stage / "renders" / "reference.png", stage / "reference_rgba.png"
    if not (render.is_file() and ref.is_file()):
        return None
    img = Image.open(render)
    img.load()
    return psnr(pil_on_white(img), load_rgb_on_white(ref, size=img.size))


def on_white(path: Path, size: int) -> Image.Image:
    im = Image.open(path).convert("RGBA").resize((size, size), Image.Resampling.LANCZOS)
    bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
    return Image.alpha_composite(bg, im).convert("RGB")


def picture(run: Path, out: Path, size: int = 256) -> Path:
    """Photo | coarse reference render | fine reference render | fine mesh at 4 azimuths (turntable)."""
    from PIL import ImageDraw, ImageSequence

    tiles, labels = [], []
    for path, label in ((run / "inputs" / "rgba.png", "photo"),
                        (run / "coarse" / "renders" / "reference.png", "coarse, reference view"),
                        (run / "fine" / "renders" / "reference.png", "fine, reference view")):
        if path.is_file():
            tiles.append(on_white(path, size))
            labels.append(label)
    gif = run / "fine" / "turntable.gif"
    if gif.is_file():
        frames = [f.convert("RGB") for f in ImageSequence.Iterator(Image.open(gif))]
        for k in range(4):
            i = k * len(frames) // 4
            tiles.append(frames[i].resize((size, size), Image.Resampling.LANCZOS))
            labels.append(f"fine mesh, {360 * i // len(frames)}°")
    sheet = Image.new("RGB", (size * len(tiles), size + 22), "white")
    d = ImageDraw.Draw(sheet)
    for i, (t, lab) in enumerate(zip(tiles, labels)):
        sheet.paste(t, (i * size, 22))
        d.text((i * size + 6, 5), lab, fill=(0, 0, 0))
    sheet.save(out)
    return out


def check(run: Path) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    fine_mesh = next((p for p in (run / "fine" / "mesh.obj", run / "fine" / "mesh.glb") if p.is_file()), None)
    rec: dict = {"run": str(run), "evaluated_stage": metrics.get("stage"), "psnr": metrics["psnr"],
                 "lpips": metrics.get("lpips"), "clip_similarity": metrics.get("clip_similarity")}
    rec["fine"] = {"mesh": components(fine_mesh) if fine_mesh else None, "psnr": stage_psnr(run / "fine")}
    coarse_mesh = run / "coarse" / "mesh.obj"
    rec["coarse"] = {"mesh": components(coarse_mesh) if coarse_mesh.is_file() else None,
                     "psnr": stage_psnr(run / "coarse")}
    for s in ("coarse", "fine"):
        try:
            r = json.loads((run / s / "result.json").read_text())
            rec[s]["steps"], rec[s]["seconds"], rec[s]["summary"] = r.get("steps"), r.get("seconds"), r.get("summary")
        except (OSError, ValueError):
            pass
    share = rec["fine"]["mesh"]["largest_share"] if rec["fine"]["mesh"] else 0.0
    rec["bars"] = {"largest_share": {"value": share, "min": MIN_SHARE, "met": share >= MIN_SHARE},
                   "psnr": {"value": metrics["psnr"], "min": MIN_PSNR, "met": metrics["psnr"] >= MIN_PSNR}}
    rec["pass"] = all(b["met"] for b in rec["bars"].values())
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="the generate run's --out folder")
    ap.add_argument("--out", type=Path, default=Path("reports/main_job"))
    ap.add_argument("--name", default="teddy_bear")
    a = ap.parse_args()
    if not (a.run / "metrics.json").is_file():
        print(f"main_job_check: {a.run}/metrics.json not found (has the run finished?)", file=sys.stderr)
        return 2
    rec = check(a.run)
    a.out.mkdir(parents=True, exist_ok=True)
    rec["picture"] = str(picture(a.run, a.out / f"{a.name}.png"))
    from tasks.common import read_step_records  # the packages the run's worker had (its fine step's record)

    rec["versions"] = (read_step_records(a.run).get("fine") or {}).get("versions")
    (a.out / f"{a.name}.json").write_text(json.dumps(rec, indent=2) + "\n")
    f, c = rec["fine"], rec["coarse"]
    for s, part in (("coarse", c), ("fine", f)):
        m = part["mesh"] or {}
        print(f"{s}: PSNR {part['psnr'] if part['psnr'] is None else round(part['psnr'], 2)} dB at the reference view; "
              f"mesh {m.get('faces', 0)} faces in {m.get('components', 0)} components, "
              f"largest {100 * m.get('largest_share', 0):.1f} %")
    b = rec["bars"]
    print(f"bars: largest component {100 * b['largest_share']['value']:.1f} % (≥ 90: "
          f"{'met' if b['largest_share']['met'] else 'MISSED'}), PSNR {b['psnr']['value']:.2f} dB (≥ 20: "
          f"{'met' if b['psnr']['met'] else 'MISSED'}) → {'PASS' if rec['pass'] else 'FAIL'}")
    print(f"wrote {a.out / (a.name + '.json')}, {rec['picture']}")
    return 0 if rec["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
