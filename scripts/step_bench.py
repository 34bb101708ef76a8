"""Two parts of a guided iteration timed alone on one GPU, by variant: the optimiser's step over each
stage's parameters (foreach Adam against torch's fused Adam, `optimizer.fused`) and the coarse
field's evaluation, forward and backward, at a stage's sample counts (the MLP in fp32, in TF32, or
under bf16 autocast, `coarse.mlp.precision`), and the same with its points spread by the stride
permutation or not (`spread`, coarse.grid.spread), laid out as the renderer's and at random.

    python scripts/step_bench.py --out FILE.json [--preset magic123] [--samples 524288,2097152] \
        [--parts optimizer,field,spread,cameras,coverage,check] [--faces 300000]
    python scripts/step_bench.py --plot FILE.json OUT.png

Three more parts time session 23's changes to the host's share of an iteration, each against what it
replaced: `cameras`, a moved camera's mvp and c2w computed on its host copy against on the GPU;
`coverage`, the fine rasteriser's Triton coverage pass (its boxes inside the kernel) against
raster._boxes alone, the ~60 tensor operations that fed the kernel before; `check`, the stage's
finiteness check with torch's fused Adam (no wait) against the one that waits, each with Adam's step.

Each row: the GPU's ms a call (CUDA events around `--iters` calls back to back, after `--warmup`)
and the host's ms to issue one (each call timed alone on the host, started on an idle device: what
the call costs an iteration where the host is the slower of the two, as in the stages' loops).
Session 23's file timed the host over the calls back to back instead, which CUDA's launch queue
bounds below by the GPU's time (its `host_method`). The parameters are the
preset's (the fine stage's at its tet grid); their values and gradients random, as only their
sizes matter to the time.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _time(fn, iters: int, warmup: int, device) -> dict:
    """GPU ms a call (CUDA events around `iters` calls back to back; None on a CPU) and host ms to
    issue a call: each call timed alone on the host, started on an idle device (back to back, the
    host's time is bounded below by the GPU's once CUDA's launch queue fills, ~1,000 kernels)."""
    import torch

    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    gpu = None
    if cuda:
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        gpu = round(start.elapsed_time(end) / iters, 4)
    host = 0.0
    for _ in range(iters):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        host += time.perf_counter() - t0
    return {"gpu_ms": gpu, "host_ms": round(host * 1e3 / iters, 4)}


def _ms(row: dict) -> str:
    gpu = "–" if row["gpu_ms"] is None else f"{row['gpu_ms']:.3f}"
    return f"GPU {gpu} ms, host {row['host_ms']:.3f} ms"


def optimiser_rows(params, device, iters: int, warmup: int) -> list[dict]:
    import torch

    from core.stages.coarse import NeRFRepresentation
    from core.stages.fine import DMTetRepresentation
    from core.stages.optim import build_optimizer

    rows = []
    for stage in ("coarse", "fine"):
        torch.manual_seed(0)
        rep = NeRFRepresentation(params, device)
        if stage == "fine":
            rep = DMTetRepresentation(params, rep.field, device)
        groups = rep.param_groups()
        every = [q for g in groups for q in g["params"]]
        for q in every:
            q.grad = torch.randn_like(q) * 1e-3
        n = sum(q.numel() for q in every)
        for fused in (False, True):
            opt = build_optimizer(groups, params.optimizer.model_copy(update={"fused": fused}))
            if bool(opt.defaults["fused"]) != fused:  # on a CPU build_optimizer never fuses
                continue
            row = _time(opt.step, iters, warmup, device)
            rows.append({"part": "optimizer", "stage": stage, "variant": "fused" if fused else "foreach",
                         "parameters": n, "tensors": len(every), **row})
            print(f"optimizer {stage:6s} {rows[-1]['variant']:8s} {n:>11,} parameters: {_ms(row)}", flush=True)
            del opt
        del rep, groups, every
    return rows


def field_rows(params, device, samples: list[int], iters: int, warmup: int) -> list[dict]:
    import torch

    from core.representations.nerf import NeRFField

    rows = []
    torch.manual_seed(0)
    field = NeRFField.from_params(params, device=device)
    before = torch.backends.cuda.matmul.allow_tf32
    for n in samples:
        x = (torch.rand(n, 3, device=device) * 2 - 1) * params.coarse.bound * 0.5
        up = torch.randn(n, device=device), torch.randn(n, 3, device=device)
        for variant in ("fp32", "tf32", "bf16"):
            field.mlp_precision = "bf16" if variant == "bf16" else "fp32"
            torch.backends.cuda.matmul.allow_tf32 = variant == "tf32"

            def call():
                raw, logits = field.raw(x)
                torch.autograd.backward((raw, logits), up)

            try:
                row = _time(call, iters, warmup, device)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = before
            field.zero_grad(set_to_none=True)
            rows.append({"part": "field", "samples": n, "variant": variant, **row})
            print(f"field {n:>9,} samples {variant}: {_ms(row)}", flush=True)
    return rows


def spread_rows(params, device, samples: list[int], iters: int, warmup: int) -> list[dict]:
    """The field's forward + backward (`raw`, as the coarse render calls it) with its points spread by
    the stride permutation and not (coarse.grid.spread always / never), on points laid out as the renderer
    hands them over (a ray's samples one after another: scripts/hashgrid_check.py's ray_points) and
    on random ones, with the preset's grid (the Triton backend, 'runs' atomics, where it imports)."""
    import torch

    from core.representations.nerf import NeRFField
    from scripts.hashgrid_check import ray_points

    rows = []
    torch.manual_seed(0)
    field = NeRFField.from_params(params, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    for n in samples:
        layouts = {"renderer's order": ray_points(n, device, g),
                   "random": (torch.rand(n, 3, device=device) * 2 - 1) * params.coarse.bound * 0.5}
        up = torch.randn(n, device=device), torch.randn(n, 3, device=device)
        for layout, x in layouts.items():
            for variant in ("never", "always"):
                field.spread = variant

                def call():
                    raw, logits = field.raw(x)
                    torch.autograd.backward((raw, logits), up)

                row = _time(call, iters, warmup, device)
                field.zero_grad(set_to_none=True)
                rows.append({"part": "spread", "samples": n, "layout": layout, "variant": f"spread {variant}",
                             "grid": f"{field.encoding.backend}, atomics {getattr(field.encoding, 'atomics', '-')}", **row})
                print(f"spread {n:>9,} samples, {layout}, spread {variant}: {_ms(row)}", flush=True)
    field.spread = params.coarse.grid.spread
    return rows


def camera_rows(params, device, iters: int, warmup: int) -> list[dict]:
    import torch

    from core.rendering.cameras import Cameras, sample_cameras

    moved = sample_cameras(params.camera, 1, torch.Generator().manual_seed(0)).to(device)
    bare = Cameras(moved.polar, moved.azimuth, moved.radius, moved.fovy)  # no host copy: as before session 23
    rows = []
    for variant, cams in (("on the device", bare), ("host copy", moved)):
        row = _time(lambda: (cams.mvp(), cams.c2w()), iters, warmup, device)
        rows.append({"part": "cameras", "variant": variant, **row})
        print(f"cameras mvp + c2w, {variant}: {_ms(row)}", flush=True)
    return rows


def coverage_rows(params, device, faces: int, iters: int, warmup: int) -> list[dict]:
    """The coverage pass of an icosphere of ~`faces` triangles at the fine stage's resolution, seen by
    the reference camera."""
    import math

    import torch
    import trimesh

    from core.rendering.cameras import reference_cameras
    from core.rendering.mesh_render import clip_positions
    from core.rendering.raster import _boxes, _coverage

    sub = max(1, round(math.log(max(faces, 80) / 20, 4)))  # an icosphere has 20·4^k faces
    s = trimesh.creation.icosphere(subdivisions=sub, radius=0.5)
    verts = torch.tensor(s.vertices, dtype=torch.float32, device=device)
    tri = torch.tensor(s.faces, dtype=torch.long, device=device)
    pos = clip_positions(verts, reference_cameras(params.camera, device=device))
    H = W = params.fine.resolution
    rows = []
    for variant, fn in (("raster._boxes alone (before)", lambda: _boxes(pos, tri, H, W)),
                        ("Triton pass, boxes inside", lambda: _coverage(pos, tri, H, W, "triton"))):
        row = _time(fn, iters, warmup, device)
        rows.append({"part": "coverage", "variant": variant, "faces": int(tri.shape[0]), **row})
        print(f"coverage {tri.shape[0]:,} faces, {variant}: {_ms(row)}", flush=True)
    return rows


def check_rows(params, device, iters: int, warmup: int) -> list[dict]:
    """Stage._check_finite and Adam's step over the coarse field's parameters: with the fused Adam (the
    flag handed to it, read later) and with foreach Adam (the host waits for the flag)."""
    import torch

    from core.oracle.bench import oracle_reference
    from core.oracle.objects import make_object
    from core.stages.coarse import make_coarse_stage
    from core.stages.optim import build_optimizer

    stage = make_coarse_stage(params, oracle_reference(make_object("torus"), params), device=device)
    every = [q for g in stage.optimizer.param_groups for q in g["params"]]
    loss = torch.ones((), device=device)
    rows = []
    for fused in (False, True):
        stage.optimizer = build_optimizer(stage.rep.param_groups(), params.optimizer.model_copy(update={"fused": fused}))
        if bool(stage.optimizer.defaults["fused"]) != fused:
            continue
        for q in every:
            q.grad = torch.randn_like(q) * 1e-3

        def call():
            stage._check_finite(0, loss, {"rgb": loss}, gradients=True)
            stage.optimizer.step()
            stage._read_checks(wait=False)

        row = _time(call, iters, warmup, device)
        stage._read_checks(wait=True)
        variant = "fused Adam, read later" if fused else "foreach Adam, the host waits"
        rows.append({"part": "check", "variant": variant, **row})
        print(f"finiteness check + Adam, {variant}: {_ms(row)}", flush=True)
    return rows


PARTS = ("optimizer", "field", "spread", "cameras", "coverage", "check")


def plot(src: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(src.read_text())
    labels = {"optimizer": lambda r: f"{r['stage']} step, {r['variant']}",
              "field": lambda r: f"{r['samples'] / 2**20:g}M samples, {r['variant']}",
              "spread": lambda r: f"{r['samples'] / 2**20:g}M, {r['layout']}, {r['variant']}",
              "cameras": lambda r: r["variant"], "coverage": lambda r: f"{r['faces'] / 1e3:.0f}k faces, {r['variant']}",
              "check": lambda r: r["variant"]}
    parts = [(k, labels[k]) for k in PARTS if any(r["part"] == k for r in data["rows"])]
    cols = min(3, len(parts))
    nrows = -(-len(parts) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.5 * cols, 4.2 * nrows), squeeze=False)
    for ax in axes.flat[len(parts):]:
        ax.set_visible(False)
    for ax, (part, label) in zip(axes.flat, parts):
        rows = [r for r in data["rows"] if r["part"] == part]
        ys = range(len(rows))
        ax.barh([y + 0.2 for y in ys], [r["gpu_ms"] for r in rows], 0.4, label="GPU ms a call")
        host = "host ms to issue it" if data.get("host_method", "").startswith("each call") else \
            "host ms, calls back to back (bounded by the GPU's)"
        ax.barh([y - 0.2 for y in ys], [r["host_ms"] for r in rows], 0.4, label=host)
        ax.set_yticks(list(ys), [label(r) for r in rows])
        ax.invert_yaxis()
        ax.set_xlabel("ms")
        ax.set_title({"optimizer": "Adam's step (optimizer.fused)",
                      "field": "coarse field forward + backward (coarse.mlp.precision)",
                      "spread": "coarse field forward + backward (coarse.grid.spread)",
                      "cameras": "a camera's mvp + c2w", "coverage": "the fine coverage pass",
                      "check": "finiteness check + Adam's step"}[part])
        ax.legend(loc="lower right")
    fig.suptitle(f"{data['device']} · {data['preset']} · {data.get('label', '')}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="the JSON to write")
    ap.add_argument("--preset", default="magic123")
    ap.add_argument("--samples", default="524288,2097152", help="field sample counts, comma-separated")
    ap.add_argument("--parts", default=",".join(PARTS), help="which parts to time, comma-separated (default: all)")
    ap.add_argument("--faces", type=int, default=300000, help="the coverage part's triangle count (about)")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--label", default="")
    ap.add_argument("--plot", nargs=2, type=Path, metavar=("JSON", "PNG"), help="draw a JSON written before")
    a = ap.parse_args(argv)
    if a.plot:
        print(f"wrote {plot(*a.plot)}")
        return 0
    if not a.out:
        ap.error("--out is required (or --plot JSON PNG)")
    if a.iters < 1 or a.warmup < 0:
        ap.error("--iters must be ≥ 1 and --warmup ≥ 0")
    try:
        samples = [int(float(s)) for s in a.samples.split(",")]
    except ValueError:
        ap.error(f"--samples: comma-separated counts, got {a.samples!r}")
    parts = [x for x in a.parts.split(",") if x]
    if not parts or set(parts) - set(PARTS):
        ap.error(f"--parts: some of {', '.join(PARTS)}, got {a.parts!r}")
    import torch

    if not torch.cuda.is_available():
        print("step_bench: needs a CUDA device (it times GPU kernels)", file=sys.stderr)
        return 2
    from core.params import load_params

    device = torch.device("cuda")
    params = load_params(a.preset, {"device": "cuda"})
    timed = {"optimizer": lambda: optimiser_rows(params, device, a.iters, a.warmup),
             "field": lambda: field_rows(params, device, samples, a.iters, a.warmup),
             "spread": lambda: spread_rows(params, device, samples, a.iters, a.warmup),
             "cameras": lambda: camera_rows(params, device, a.iters, a.warmup),
             "coverage": lambda: coverage_rows(params, device, a.faces, a.iters, a.warmup),
             "check": lambda: check_rows(params, device, a.iters, a.warmup)}
    rows = [r for part in PARTS if part in parts for r in timed[part]()]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
                                 "preset": a.preset, "label": a.label, "iters": a.iters, "host_method": "each call alone, on an idle device",
                                 "rows": rows}, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
