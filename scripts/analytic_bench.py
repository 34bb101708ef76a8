"""The analytic-prior benchmark (issue 11) for several presets, with the oracle beside it.

For each preset: `lift3d bench analytic` (core/oracle/bench_analytic.py) on the objects; and —
unless --no-oracle — `lift3d bench oracle --stage fine` (core/oracle/bench_fine.py) on the same
objects with the first preset (the oracle reads neither prior nor λ, so once is enough). Writes OUT/analytic_<preset>.json and OUT/oracle_<preset>.json (one
file each, rewritten as results come) and OUT/runs/… (the stages' folders). Imports core/ only: runs
on a machine with torch + diffusers + transformers (+ pydantic, pyyaml, scipy; trimesh for mesh
files) and no Prefect or MLflow.

GPU, paper settings (what the coordinator runs):
    python scripts/analytic_bench.py --out DIR --presets magic123 magic123-2d magic123-3d \
        --objects torus blocks snowman house.glb --set device=cuda
CPU smoke settings (reports/analytic/):
    python scripts/analytic_bench.py --out DIR --presets smoke smoke-2d smoke-3d \
        --objects torus blocks snowman house.glb
`house.glb`: `python -m core.oracle.meshes house.glb` writes it (or pass any OBJ/GLB).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--presets", nargs="+", default=["smoke", "smoke-2d", "smoke-3d"])
    ap.add_argument("--objects", nargs="+", default=["torus", "blocks", "snowman"])
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--no-oracle", action="store_true", help="skip the oracle bench")
    ap.add_argument("--tag", default="", help="a suffix of the JSON names (e.g. a variant's name)")
    ap.add_argument("--progress", action="store_true", help="the stages' progress bars (on stderr)")
    ap.add_argument("--only", nargs="+", default=None, metavar="OBJECT",
                    help="run only these of --objects (the priors still know them all): one process per object")
    args = ap.parse_args(argv)

    import logging

    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from core.io import atomic_write_text
    from core.oracle.bench_analytic import bench_analytic
    from core.oracle.bench_fine import bench_oracle_fine
    from core.oracle.meshes import is_mesh_path, write_example_house
    from core.params import load_params, resolve_device

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    objects = []
    for name in args.objects:
        if is_mesh_path(name) and not Path(name).is_file() and Path(name).name == "house.glb":
            name = str(write_example_house(out / "house.glb"))  # the example mesh, written when absent
        objects.append(name)
    rc = 0
    for preset in args.presets:
        params = load_params(preset, args.overrides)
        device = resolve_device(params)
        meta = {"preset": preset, "overrides": args.overrides, "torch": torch.__version__,
                "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None}
        tag = f"{preset}{('_' + args.tag) if args.tag else ''}"
        t0 = time.perf_counter()
        try:
            only = None if args.only is None else [objects[args.objects.index(n)] if n in args.objects else n for n in args.only]
            rep = bench_analytic(params, objects, out / "runs" / f"analytic_{tag}", device, progress=args.progress, meta=meta,
                                 only=only)
            rep["seconds"] = round(time.perf_counter() - t0, 1)
            atomic_write_text(out / f"analytic_{tag}.json", json.dumps(rep, indent=2))
        except Exception:  # noqa: BLE001 - one failed preset must not sink the others
            traceback.print_exc()
            rc = 1
        if args.no_oracle or preset != args.presets[0]:  # the oracle reads no prior or λ: once
            continue
        t0 = time.perf_counter()
        try:
            res = bench_oracle_fine(params, objects, out / "runs" / f"oracle_{tag}", device, progress=False)
            atomic_write_text(out / f"oracle_{tag}.json", json.dumps(
                {"bench": "oracle", "stage": "fine", **meta, "device": str(device), "objects": res,
                 "seconds": round(time.perf_counter() - t0, 1)}, indent=2))
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
