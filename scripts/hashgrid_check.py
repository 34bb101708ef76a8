"""GPU check of the hash grid's Triton backend (issue 15) against the PyTorch one, at equal parameters.

  python3 scripts/hashgrid_check.py --out DIR/hashgrid_check.json [--log2-points 22]

magic123's grid (16 levels × 2 features, table 2^19, resolution 16 → 2048) on 2^22 random points:
the largest absolute difference of the encodings and of the table gradients (a random output
gradient), then per backend the forward + backward time (CUDA events after a warm-up, median of
20) and the peak memory above what was allocated before the step. Prints and writes one JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.representations.hashgrid import HashGrid, copy_hashgrid_params  # noqa: E402

CONFIG = dict(levels=16, features_per_level=2, log2_table_size=19, base_resolution=16, max_resolution=2048)


def step(grid: HashGrid, x: torch.Tensor, up: torch.Tensor) -> None:
    grid.table.grad = None
    grid(x).backward(up)


def timed(grid: HashGrid, x: torch.Tensor, up: torch.Tensor, reps: int = 20) -> dict:
    for _ in range(3):
        step(grid, x, up)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step(grid, x, up)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    grid.table.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(grid, x, up)
    torch.cuda.synchronize()
    return {"ms_fwd_bwd_median": round(statistics.median(times), 3), "ms_fwd_bwd_min": round(min(times), 3),
            "peak_mib_above_base": round((torch.cuda.max_memory_allocated() - base) / 2 ** 20, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--log2-points", type=int, default=22)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 1
    import triton

    dev = torch.device("cuda")
    a = HashGrid(**CONFIG, backend="torch", device=dev)
    b = HashGrid(**CONFIG, backend="triton", device=dev)
    with torch.no_grad():
        a.table.uniform_(-1, 1)
    copy_hashgrid_params(a, b)
    g = torch.Generator(device=dev).manual_seed(0)
    n = 1 << args.log2_points
    x = torch.rand(n, 3, device=dev, generator=g) * 2 - 1
    up = torch.randn(n, a.output_dim, device=dev, generator=g)
    ya, yb = a(x), b(x)
    ya.backward(up)
    yb.backward(up)
    ga, gb = a.table.grad, b.table.grad
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "config": CONFIG, "points": n,
           "fwd_max_abs_diff": float((ya - yb).abs().max()), "fwd_max_abs": float(ya.detach().abs().max()),
           "fwd_frac_over_1e-5": float(((ya - yb).abs() > 1e-5).float().mean()),
           "grad_max_abs_diff": float((ga - gb).abs().max()), "grad_max_abs": float(ga.abs().max())}
    del ya, yb, ga, gb
    a.table.grad = b.table.grad = None
    for name, grid in (("torch", a), ("triton", b)):
        res[name] = timed(grid, x, up)
        print(name, res[name], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
