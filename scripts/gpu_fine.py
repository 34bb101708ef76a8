"""Fine-stage figures on a CUDA machine (issue 4), written to OUT/gpu_fine.json as they come:

1. nvdiffrast vs the PyTorch rasteriser on a test mesh (a DMTet mesh of a procedural object, several
   cameras, 512²): share of pixels with the same triangle id, max |Δ| of (u, v, z/w) where they agree,
   and of the antialiased mask.
2. ms per fine iteration at 1024² (and 512²) and peak GPU memory: the fine stage's own work
   (marching tets on the 128³ grid, rasterisation, colour field, losses, backward) with the
   reference-view / novel-view schedule and guidance 'none', then with the oracle guidance.
3. `bench oracle --stage fine` on each procedural object with the preset/overrides given.

Usage: python scripts/gpu_fine.py --out DIR [--objects ...] [--set key=value ...] [--budget-s S]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

RESULTS: dict = {}


JSON_NAME = "gpu_fine.json"


def save(out: Path) -> None:
    tmp = out / (JSON_NAME + ".tmp")
    tmp.write_text(json.dumps(RESULTS, indent=2))
    tmp.replace(out / JSON_NAME)


def env() -> dict:
    from core.rendering.raster import nvdiffrast_available

    d = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "nvdiffrast": nvdiffrast_available()}
    if torch.cuda.is_available():
        d["gpu"] = torch.cuda.get_device_name(0)
    try:
        import nvdiffrast

        d["nvdiffrast_version"] = getattr(nvdiffrast, "__version__", "?")
    except Exception:  # noqa: BLE001
        pass
    return d


@torch.no_grad()
def compare_rasterisers(device) -> dict:
    from core.rendering.cameras import Cameras
    from core.representations.dmtet import DMTet
    from core.rendering.mesh_render import clip_positions
    from core.oracle.objects import make_object
    from core.rendering.raster import make_rasterizer

    obj = make_object("snowman")
    dm = DMTet(64, 1.0, device=device)
    dm.init_from_sdf(lambda x: -obj.sdf(x))
    mesh = dm.extract().detach()
    cams = Cameras.make([90.0, 60.0, 120.0, 75.0], [0.0, 45.0, -120.0, 170.0], 1.8, 40.0, device=device)
    pos = clip_positions(mesh.verts, cams).contiguous()
    H = W = 512
    rt, rn = make_rasterizer("torch", device), make_rasterizer("nvdiffrast", device)
    a = rt.rasterize(pos, mesh.faces, (H, W))
    b = rn.rasterize(pos, mesh.faces.int(), (H, W))
    ida, idb = a[..., 3], b[..., 3]
    same = ida == idb
    both = same & (ida > 0)
    cov_a, cov_b = ida > 0, idb > 0
    ma = rt.antialias((a[..., 3:] > 0).float(), a, pos, mesh.faces)
    mb = rn.antialias((b[..., 3:] > 0).float().contiguous(), b, pos, mesh.faces.int())
    # interpolated attributes (positions) where both agree
    xa = rt.interpolate(mesh.verts, a, mesh.faces)
    xb = rn.interpolate(mesh.verts, b, mesh.faces.int())
    return {
        "mesh_faces": int(mesh.faces.shape[0]), "views": len(cams), "resolution": H,
        "covered_pixels_torch": int(cov_a.sum()), "covered_pixels_nvdiffrast": int(cov_b.sum()),
        "same_triangle_id_fraction": float(same.float().mean()),
        "same_triangle_id_fraction_of_covered": float((same & (cov_a | cov_b)).sum() / (cov_a | cov_b).sum()),
        "max_abs_diff_u": float((a[..., 0] - b[..., 0])[both].abs().max()),
        "max_abs_diff_v": float((a[..., 1] - b[..., 1])[both].abs().max()),
        "max_abs_diff_zw": float((a[..., 2] - b[..., 2])[both].abs().max()),
        "max_abs_diff_interpolated_xyz": float((xa - xb)[both].abs().max()),
        "mean_abs_diff_antialiased_mask": float((ma - mb).abs().mean()),
        "max_abs_diff_antialiased_mask": float((ma - mb).abs().max()),
        "sum_antialiased_mask_torch": float(ma.sum()), "sum_antialiased_mask_nvdiffrast": float(mb.sum()),
    }


def time_fine(device, resolution: int, guidance_kind: str, iters: int = 40, warmup: int = 8) -> dict:
    from torch import nn

    from core.stages.fine import make_fine_stage
    from core.oracle.guidance import OracleGuidance
    from core.representations.nerf import NeRFField
    from core.oracle.objects import make_object
    from core.params import load_params
    from core.oracle.bench_fine import fine_reference

    p = load_params("magic123", {"fine.resolution": resolution, "fine.tet_resolution": 128, "device": "cuda"})
    obj = make_object("snowman")

    class Field(nn.Module):  # the object's density level set + a full-size (untrained) NeRF colour branch
        def __init__(self):
            super().__init__()
            self.nerf = NeRFField.from_params(p, device=device)

        def density(self, x):
            return 20.0 * torch.sigmoid(-obj.sdf(x) / 0.01)

        def albedo(self, x):
            return self.nerf.albedo(x)

    guidance = OracleGuidance(obj, p) if guidance_kind == "oracle" else None
    tr = make_fine_stage(p, fine_reference(obj, p, device), Field(), guidance=guidance, device=device)
    for _ in range(warmup):
        tr.step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    faces = []
    for _ in range(iters):
        m = tr.step()
        faces.append(float(m["faces"]))
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / iters
    return {"resolution": resolution, "tet_resolution": p.fine.tet_resolution, "tets": tr.rep.dmtet.num_tets,
            "guidance": guidance_kind, "rasterizer": tr.rep.backend, "iters_timed": iters,
            "ms_per_iter": round(1000 * dt, 2), "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 3),
            "mesh_faces": int(sum(faces) / len(faces))}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--objects", nargs="*", default=None)
    ap.add_argument("--preset", default="smoke")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--skip", nargs="*", default=[])
    ap.add_argument("--bench-dir", type=Path, default=Path("/tmp/gpu_fine_bench"))
    ap.add_argument("--json", default="gpu_fine.json", help="file name of the results in --out")
    ap.add_argument("--merge", nargs="*", default=None,
                    help="only merge these result files into --out/--json and collect images from --bench-dir")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    global JSON_NAME
    JSON_NAME = args.json
    if args.merge is not None:
        for f in args.merge:
            part = json.loads(Path(f).read_text())
            for k, v in part.items():
                if isinstance(v, dict) and isinstance(RESULTS.get(k), dict):
                    RESULTS[k].update(v)
                else:
                    RESULTS[k] = v
        save(args.out)
        collect(args)
        return 0
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = torch.device("cuda")
    RESULTS["env"] = env()
    print(json.dumps(RESULTS["env"]), flush=True)
    save(args.out)
    first = [
        ("raster_compare", lambda: compare_rasterisers(device)),
        ("timing_1024_none", lambda: time_fine(device, 1024, "none")),
    ]
    later = [
        ("timing_1024_oracle", lambda: time_fine(device, 1024, "oracle", iters=20, warmup=4)),
        ("timing_512_none", lambda: time_fine(device, 512, "none")),
    ]
    run_steps(first, args)
    if "bench" not in args.skip:
        run_bench(args, device)
    run_steps(later, args)
    return 0


def run_steps(steps, args) -> None:
    for name, fn in steps:
        if name in args.skip:
            continue
        t0 = time.perf_counter()
        try:
            RESULTS[name] = fn()
        except Exception as e:  # noqa: BLE001 - record and go on to the next figure
            RESULTS[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        RESULTS[name + "_seconds"] = round(time.perf_counter() - t0, 2)
        print(name, json.dumps(RESULTS[name])[:1500], flush=True)
        save(args.out)
        torch.cuda.empty_cache()


def run_bench(args, device) -> None:
    if True:
        from core.oracle.objects import OBJECTS
        from core.params import load_params
        from core.oracle.bench_fine import bench_oracle_fine

        params = load_params(args.preset, args.overrides + ["device=cuda"])
        RESULTS["bench_params"] = {"preset": args.preset, "overrides": args.overrides}
        RESULTS["bench"] = {}
        for name in args.objects or list(OBJECTS):
            t0 = time.perf_counter()
            try:
                RESULTS["bench"].update(bench_oracle_fine(params, [name], args.bench_dir, device, progress=False))
            except Exception as e:  # noqa: BLE001
                RESULTS["bench"][name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
            print(name, "bench", round(time.perf_counter() - t0, 1), "s", flush=True)
            save(args.out)
            torch.cuda.empty_cache()


def collect(args) -> None:
    """A few files back in OUT (the tool returns at most 8): the compare images stacked, one GLB, one turntable."""
    import shutil

    import numpy as np
    from PIL import Image

    imgs = [np.asarray(Image.open(p)) for p in sorted(args.bench_dir.glob("*/compare.png"))]
    if imgs:
        Image.fromarray(np.concatenate(imgs, 0)).save(args.out / "compare_truth_coarse_fine.png")
    for name, ext in (("mesh.glb", "glb"), ("turntable.gif", "gif")):
        found = sorted(args.bench_dir.glob(f"*/fine/{name}"))
        if found:
            shutil.copy(found[0], args.out / f"{found[0].parent.parent.name}_{name}")


if __name__ == "__main__":
    sys.exit(main())
