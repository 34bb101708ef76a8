"""`lift3d bench oracle`: the oracle benchmark of the machinery (core/oracle/) from the command line."""
from __future__ import annotations

import json
from pathlib import Path


def cli_bench_oracle(args) -> int:
    from core.errors import Lift3DError
    from core.io import atomic_write_text
    from core.oracle.objects import OBJECTS
    from core.params import load_params, resolve_device

    params = load_params(args.preset, args.overrides, args.params)
    names = list(args.objects) if args.objects else list(OBJECTS)
    unknown = [n for n in names if n not in OBJECTS]
    if unknown:
        raise Lift3DError(f"unknown procedural object(s): {', '.join(unknown)} (known: {', '.join(OBJECTS)})")
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
