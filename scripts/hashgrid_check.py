"""GPU check of the hash grid's Triton backend (issue 15) against the PyTorch one, at equal parameters.

  python3 scripts/hashgrid_check.py --out DIR/hashgrid_check.json [--log2-points 22]   # and its .png
  python3 scripts/hashgrid_check.py --plot DIR/hashgrid_check.json   # only draw the .png of a saved result

magic123's grid (16 levels × 2 features, table 2^19, resolution 16 → 2048) on 2^22 random points:
the largest absolute difference of the encodings and of the table gradients (a random output
gradient), then per backend the forward + backward time (CUDA events after a warm-up, median of
20) and the peak memory above what was allocated before the step. Then the triton backward's
atomic adds (coarse.grid.atomics) scalar against runs, the table gradient alone (`table_grad`),
on those random points and on as many points laid out as the renderer lays them out (rays of a
128² view, each ray's samples inside a ball one after another): each one's median time and its
gradient's difference from scalar's. Prints and writes one JSON.
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


def ray_points(n: int, dev: torch.device, g: torch.Generator) -> torch.Tensor:
    """~n points as the volume renderer hands them to the field: 128² rays from a camera at distance
    1.8, 128 samples each between t = 0.8 and 2.8, kept where they fall in a ball of radius 0.6 (an
    object); each ray's samples one after another, rays in pixel order, then repeated to n."""
    side, s = 128, 128
    ij = torch.stack(torch.meshgrid(torch.linspace(-0.35, 0.35, side, device=dev),
                                    torch.linspace(-0.35, 0.35, side, device=dev), indexing="ij"), -1).reshape(-1, 2)
    d = torch.nn.functional.normalize(torch.cat([ij, -torch.ones(len(ij), 1, device=dev)], 1), dim=1)
    o = torch.tensor([0.0, 0.0, 1.8], device=dev)
    t = 0.8 + 2.0 * (torch.arange(s, device=dev) + torch.rand(len(d), s, device=dev, generator=g)) / s
    pts = o + d[:, None, :] * t[..., None]
    pts = pts[pts.norm(dim=-1) < 0.6]
    return pts.repeat(-(-n // len(pts)), 1)[:n].contiguous()


def backward_times(grid: HashGrid, x: torch.Tensor, up: torch.Tensor, reps: int = 20) -> dict:
    """The triton table gradient alone under each atomics setting: median ms, the largest |difference|
    from 'scalar' and the speed-up over it."""
    from core.representations import hashgrid_triton as ht

    u = grid.normalize(x).contiguous()
    out, grads = {}, {}
    for setting in ("scalar", "runs"):
        grid.atomics = setting
        for _ in range(3):
            grads[setting] = ht.table_grad(u, up, grid)
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            ht.table_grad(u, up, grid)
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        out[setting] = {"ms_median": round(statistics.median(times), 3), "ms_min": round(min(times), 3)}
    grid.atomics = "runs"
    out["max_abs"] = float(grads["scalar"].abs().max())
    out["runs"]["max_abs_diff"] = float((grads["scalar"] - grads["runs"]).abs().max())
    out["runs"]["speedup"] = round(out["scalar"]["ms_median"] / out["runs"]["ms_median"], 3)
    return out


def plot(path: Path) -> Path:
    """The table gradient's median ms under each atomics setting the JSON at `path` holds, on random
    points and on points laid out as the renderer's: a PNG beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.loads(path.read_text())
    groups = [("random points", res["atomics_random_points"]), ("points laid out as the renderer's", res["atomics_ray_points"])]
    settings = [k for k in ("scalar", "pairs", "runs") if k in groups[0][1]]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.45 * len(groups) * len(settings)))
    y, labels = 0, []
    for gi, (name, r) in enumerate(groups):
        for si, k in enumerate(settings):
            ms = r[k]["ms_median"]
            ax.barh(y, ms, color=f"C{si}")
            ax.text(ms, y, f" {ms:.2f} ms", va="center", fontsize=8)
            labels.append((y, f"{name}: {k}"))
            y += 1
        y += 0.6
    ax.set_yticks([t for t, _ in labels], [lab for _, lab in labels], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"the table gradient of {res['points']:,} points, median ms ({res['device']})")
    ax.set_xlim(0, 1.2 * max(r[k]["ms_median"] for _, r in groups for k in settings))
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="JSON file to write (and its .png)")
    ap.add_argument("--plot", type=Path, help="only draw the .png of a JSON this script wrote")
    ap.add_argument("--log2-points", type=int, default=22)
    args = ap.parse_args()
    if args.plot:
        print(f"wrote {plot(args.plot)}")
        return 0
    if args.out is None:
        ap.error("--out is required (or --plot JSON)")
    if not torch.cuda.is_available():
        print("hashgrid_check: needs a CUDA device", file=sys.stderr)
        return 2
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
    res["atomics_random_points"] = backward_times(b, x, up)
    print("atomics, random points", res["atomics_random_points"], flush=True)
    xr = ray_points(n, dev, g)
    res["atomics_ray_points"] = backward_times(b, xr, up)
    print("atomics, points along rays", res["atomics_ray_points"], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    print(f"wrote {args.out} and {plot(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
