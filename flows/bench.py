"""`lift3d bench oracle` and `lift3d bench analytic`: the benchmarks of the machinery against known objects
(core/oracle/) from the command line."""
from __future__ import annotations

import json
from pathlib import Path


def _object_names(given) -> list[str]:
    """The bench's objects: procedural names or textured mesh files (default: the procedural ones)."""
    from core.errors import Lift3DError
    from core.oracle.meshes import is_mesh_path
    from core.oracle.objects import OBJECTS

    names = list(given) if given else list(OBJECTS)
    unknown = [n for n in names if n not in OBJECTS and not is_mesh_path(n)]
    if unknown:
        raise Lift3DError(f"unknown object(s): {', '.join(unknown)} (known: {', '.join(OBJECTS)}, or a mesh file "
                          f"path: .obj, .glb, .gltf, .ply, .off, .stl)")
    missing = [n for n in names if is_mesh_path(n) and not Path(n).expanduser().is_file()]
    if missing:
        raise Lift3DError(f"mesh file(s) not found: {', '.join(missing)}")
    return names


def cli_bench_oracle(args) -> int:
    from core.io import atomic_write_text
    from core.params import load_params, resolve_device

    params = load_params(args.preset, args.overrides, args.params)
    names = _object_names(args.objects)
    device = resolve_device(params)
    out = Path(args.out)
    if args.stage == "coarse":
        from core.oracle.bench import bench_oracle_coarse

        out.mkdir(parents=True, exist_ok=True)
        results = bench_oracle_coarse(params, names, out, device)
    else:
        from core.oracle.bench_fine import bench_oracle_fine

        out.mkdir(parents=True, exist_ok=True)
        results = bench_oracle_fine(params, names, out, device)
    report = {"stage": args.stage, "preset": args.preset, "device": str(device), "objects": results}
    atomic_write_text(out / "oracle.json", json.dumps(report, indent=2))
    print(f"wrote {out / 'oracle.json'}")
    return 0


def cli_bench_analytic(args) -> int:
    """Coarse + fine under the analytic priors (core/oracle/bench_analytic.py); DIR/analytic.json."""
    from core.oracle.bench_analytic import bench_analytic
    from core.params import load_params, resolve_device

    params = load_params(args.preset, args.overrides, args.params)
    names = _object_names(args.objects)
    device = resolve_device(params)
    out = Path(args.out)
    bench_analytic(params, names, out, device, meta={"preset": args.preset, "overrides": list(args.overrides or [])})
    print(f"wrote {out / 'analytic.json'}")
    return 0
