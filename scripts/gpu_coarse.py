"""GPU-machine checks of the coarse stage (no build steps here; tinycudann, if wanted, is built by
the caller beforehand).

  python3 scripts/gpu_coarse.py bench   --out DIR [--preset magic123] [--jobs 3]
      the oracle bench, one `lift3d bench oracle` process per object side by side (one GPU each
      when there are several), merged into DIR/oracle/oracle.json in the bench's own layout
  python3 scripts/gpu_coarse.py compare --out DIR
      tinycudann's hash grid against the PyTorch one at equal parameters (DIR/tcnn_compare.json);
      run it in its own process: a crash inside tinycudann then cannot take the bench with it
  python3 scripts/gpu_coarse.py profile --out DIR [--preset magic123] [--objects torus] [--steps 50]
      where one coarse step's time goes (torch.profiler tables in DIR/profile_PRESET_OBJECT.txt)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def bench(out: Path, preset: str, objects: list[str], extra: list[str]) -> int:
    work = Path("/tmp/lift3d_gpu_bench")
    from scripts.oracle_sweep import gpu_count, launch

    procs = []
    n_gpus = gpu_count()
    for i, name in enumerate(objects):
        cmd = [sys.executable, "-m", "flows.cli", "bench", "oracle", "--stage", "coarse", "--preset", preset,
               "--objects", name, "--out", str(work / name)] + extra
        procs.append((name, launch(cmd, out / f"bench_{name}.log", i, n_gpus)))
    merged = None
    rc = 0
    for name, p in procs:
        rc |= p.wait()
        f = work / name / "oracle.json"
        if f.is_file():
            r = json.loads(f.read_text())
            if merged is None:
                merged = {k: v for k, v in r.items() if k != "objects"} | {"objects": {}}
            merged["objects"].update(r["objects"])
    if merged is not None:
        (out / "oracle").mkdir(parents=True, exist_ok=True)
        (out / "oracle" / "oracle.json").write_text(json.dumps(merged, indent=2))
        print(json.dumps(merged, indent=2))
    return rc


def compare(out: Path) -> int:
    import torch

    from core.representations.hashgrid import HashGrid, copy_hashgrid_params, tcnn_available

    res: dict = {"torch": torch.__version__, "cuda": torch.version.cuda, "tcnn_importable": tcnn_available()}
    if not res["tcnn_importable"]:
        try:
            import tinycudann  # noqa: F401
        except Exception as e:  # noqa: BLE001
            res["import_error"] = f"{type(e).__name__}: {e}"
        (out / "tcnn_compare.json").write_text(json.dumps(res, indent=2))
        print(json.dumps(res, indent=2))
        return 1
    dev = torch.device("cuda")
    for cfg in [dict(levels=16, features_per_level=2, log2_table_size=19, base_resolution=16, max_resolution=2048),
                dict(levels=6, features_per_level=2, log2_table_size=14, base_resolution=16, max_resolution=128)]:
        key = f"L{cfg['levels']}_T{cfg['log2_table_size']}_N{cfg['max_resolution']}"
        a = HashGrid(**cfg, backend="torch", device=dev)
        with torch.no_grad():
            a.table.uniform_(-1, 1)
        print("building tcnn encoding", key, flush=True)
        b = HashGrid(**cfg, backend="tcnn", device=dev)
        copy_hashgrid_params(a, b)
        g = torch.Generator(device=dev).manual_seed(0)
        x = (torch.rand(1 << 18, 3, device=dev, generator=g) * 2 - 1).contiguous()
        print("forward", key, flush=True)
        ya, yb = a(x), b(x)
        torch.cuda.synchronize()
        err = (ya - yb).abs()
        # a float64 evaluation of the same formulas: how far each fp32 implementation is from
        # exact arithmetic (the two round the cell position p = s·u + 0.5 differently: tcnn fuses
        # the multiply-add, so near a cell boundary at the finest levels (s ≈ 2048) they disagree by
        # a few ulps of p, times the feature slope)
        with torch.no_grad():
            ref = HashGrid(**cfg, backend="torch", device=dev).double()
            ref.table.copy_(a.table.double())
            y64 = ref._torch_encode(((x.double() + ref.bound) / (2 * ref.bound)).clamp(0, 1))
            pos_ulp = float(torch.finfo(torch.float32).eps * a.scales.max())
        up = torch.randn_like(ya)
        (ya * up).sum().backward()
        (yb * up).sum().backward()
        ga, gb = a.table.grad.reshape(-1), b.flat_params.grad.reshape(-1)
        gerr = (ga - gb).abs()

        def timed(m):
            for _ in range(3):
                m(x).sum().backward()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(20):
                m(x).sum().backward()
            torch.cuda.synchronize()
            return (time.perf_counter() - t) / 20 * 1e3

        res[key] = {"max_abs_diff": float(err.max()), "mean_abs_diff": float(err.mean()),
                    "torch_fp32_vs_fp64_max": float((ya.detach().double() - y64).abs().max()),
                    "tcnn_vs_fp64_max": float((yb.detach().double() - y64).abs().max()),
                    "torch_fp32_vs_fp64_mean": float((ya.detach().double() - y64).abs().mean()),
                    "tcnn_vs_fp64_mean": float((yb.detach().double() - y64).abs().mean()),
                    "one_ulp_of_finest_cell_position": pos_ulp,
                    "frac_over_1e-4": float((err > 1e-4).float().mean()), "max_abs_output": float(ya.detach().abs().max()),
                    "grad_max_abs_diff": float(gerr.max()), "grad_max_abs": float(ga.abs().max()),
                    "ms_fwd_bwd_262k_torch": round(timed(a), 3), "ms_fwd_bwd_262k_tcnn": round(timed(b), 3)}
        print(key, res[key], flush=True)
    (out / "tcnn_compare.json").write_text(json.dumps(res, indent=2))
    return 0


def profile(out: Path, preset: str, obj_name: str, overrides: list[str], steps: int) -> int:
    """Where a coarse step's time goes: `steps` oracle-guided iterations after as many warm-up ones,
    under torch.profiler; the top operators by device and by host time, and the step rate."""
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from core.stages.coarse import make_coarse_stage
    from core.oracle.guidance import OracleGuidance
    from core.oracle.objects import make_object
    from core.params import load_params, resolve_device
    from core.oracle.bench import oracle_reference

    params = load_params(preset, overrides)
    device = resolve_device(params)
    obj = make_object(obj_name)
    tr = make_coarse_stage(params, oracle_reference(obj, params, device), guidance=OracleGuidance(obj, params),
                           device=device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(steps):
        tr.step()
    sync()
    rates = {}
    setting = tr.rep.field.spread
    for spread in ("never", "always"):  # coarse.grid.spread never and always (core.representations.nerf.NeRFField.spreads)
        tr.rep.field.spread = spread
        t = time.perf_counter()
        for _ in range(steps):
            tr.step()
        sync()
        rates[f"spread_{spread}"] = round((time.perf_counter() - t) / steps * 1e3, 2)
    tr.rep.field.spread = setting  # the params' (auto: off for the Triton grid's 'runs') for the profile
    with torch_profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            tr.step()
        sync()
    ka = prof.key_averages()
    by_dev = ka.table(sort_by="cuda_time_total", row_limit=25) if cuda else ""
    by_host = ka.table(sort_by="self_cpu_time_total", row_limit=25)
    text = f"{preset} {obj_name} {overrides}: ms/step (no profiler) {rates}, steps {steps}\n\n{by_dev}\n\n{by_host}\n"
    (out / f"profile_{preset}_{obj_name}.txt").write_text(text)
    print(text, flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["bench", "compare", "profile"])
    ap.add_argument("--steps", type=int, default=50, help="profile: iterations profiled (after as many warm-up ones)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", default="magic123")
    ap.add_argument("--objects", nargs="*", default=["torus", "blocks", "snowman"])
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.what == "bench":
        extra = [x for o in a.overrides for x in ("--set", o)]
        return bench(a.out, a.preset, a.objects, extra)
    if a.what == "profile":
        return profile(a.out, a.preset, a.objects[0], a.overrides, a.steps)
    return compare(a.out)


if __name__ == "__main__":
    sys.exit(main())
