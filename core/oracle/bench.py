"""`lift3d bench oracle`: oracle-guided reconstruction of the procedural objects (DESIGN.md, "How
we know it works without the real weights", 1).

For each object (a procedural one by name, or a textured mesh file by path: core/oracle/meshes.py;
results and folders under its name, a file's stem): the reference image (and its depth, bigger = nearer) is the object rendered at
the reference view; novel views are judged by OracleGuidance. After the stage, PSNR (albedo
renders on white) and mask IoU are measured at EVAL_VIEWS: fixed cameras that are not the
reference view and are never drawn by the loop (its novel cameras are sampled continuously, so
a fixed set is never sampled; the reference camera is left out). Writes DIR/oracle.json:
{"stage", "preset", "device", "objects": {NAME: {"psnr_novel", "mask_iou", "seconds"}}}.
One function per stage: `bench_oracle_coarse` here, `bench_oracle_fine` in core/oracle/bench_fine.py;
`lift3d bench oracle` (flows/bench.py) runs them.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# (polar, azimuth) in degrees: two rings off the equator, none at the reference view (90°, 0°)
EVAL_VIEWS = [(65.0, 22.5 + 90.0 * k) for k in range(4)] + [(115.0, 67.5 + 90.0 * k) for k in range(4)]


def eval_cameras(params, device="cpu"):
    from core.rendering.cameras import Cameras

    pol = [p for p, _ in EVAL_VIEWS]
    az = [((a + 180.0) % 360.0) - 180.0 for _, a in EVAL_VIEWS]
    n = len(EVAL_VIEWS)
    return Cameras.make(pol, az, [params.camera.radius] * n, [params.camera.fovy] * n, device=device)


def oracle_reference(obj, params, device="cpu", resolution=None):
    """The object's render at the reference view as a Reference (depth as 1/z: bigger = nearer), at
    `resolution` (default: the size the coarse stage renders its reference view, coarse.ref_scale ×
    coarse.resolution)."""
    from core.rendering.cameras import reference_cameras
    from core.inputs.images import Reference
    from core.stages.coarse import reference_resolution

    cams = reference_cameras(params.camera, device=device)
    r = obj.render(cams, resolution or reference_resolution(params), shading="albedo")
    z = r["depth"][0]
    disp = torch.where(z > 0, 1.0 / z.clamp_min(1e-6), torch.zeros_like(z))
    return Reference(rgb=r["rgb"][0].cpu(), mask=r["opacity"][0].cpu(), depth=disp.cpu(), image_path=f"oracle:{obj.name}")


def render_eval_views(field, obj, params, occupancy=None, device="cpu"):
    """The field's and the object's albedo renders at EVAL_VIEWS: (RenderBatch, target dict on device)."""
    from core.representations.nerf import render_chunked

    cams = eval_cameras(params, device)
    c = params.coarse
    out = render_chunked(field, cams, c.resolution, samples_per_ray=c.samples_per_ray, occupancy=occupancy,
                         shading="albedo", need_normals=False)
    tgt = {k: v.to(out.rgb.device) for k, v in obj.render(cams, c.resolution, shading="albedo").items()}
    return out, tgt


def evaluate_field(field, obj, params, occupancy=None, device="cpu") -> dict:
    from core.evaluation.metrics import mask_iou, psnr

    out, tgt = render_eval_views(field, obj, params, occupancy, device)
    return {"psnr_novel": round(psnr(out.rgb, tgt["rgb"]), 3),
            "mask_iou": round(mask_iou(out.opacity, tgt["opacity"]), 4)}


def bench_oracle_coarse(params, names, out_dir: Path, device, progress=True) -> dict:
    from core.oracle.guidance import OracleGuidance
    from core.oracle.objects import make_object
    from core.stages.coarse import run_coarse

    results = {}
    for name in names:
        obj = make_object(name)
        t0 = time.perf_counter()
        ref = oracle_reference(obj, params, device)
        guidance = OracleGuidance(obj, params)
        stage = run_coarse(params, ref, out_dir / obj.name, guidance=guidance, device=device, resume=False,
                           progress=progress)
        stage.rep.field.eval()
        m = evaluate_field(stage.rep.field, obj, params, stage.rep.occupancy, device)
        m["seconds"] = round(time.perf_counter() - t0, 2)
        results[obj.name] = m
        print(f"oracle coarse {obj.name:10s} PSNR {m['psnr_novel']:6.2f} dB  mask IoU {m['mask_iou']:.4f}  "
              f"{m['seconds']:7.1f} s", flush=True)
    return results


def write_reference_view(name: str, out: Path | str, size: int = 256, params=None) -> Path:
    """The object's render at the reference camera as an RGBA png (alpha = its mask), with its
    disparity as depth.png beside it (what `lift3d prepare` takes as given): a photo of a known
    object for `lift3d generate`."""
    import numpy as np
    from PIL import Image

    from core.oracle.objects import make_object
    from core.params import load_params

    params = params or load_params()
    ref = oracle_reference(make_object(name), params, resolution=size)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rgba = torch.cat([ref.rgb, ref.mask]).permute(1, 2, 0).clamp(0, 1).numpy()
    Image.fromarray((rgba * 255).round().astype(np.uint8), "RGBA").save(out)
    d = ref.depth[0].numpy()
    Image.fromarray((d / max(float(d.max()), 1e-6) * 255).round().astype(np.uint8), "L").save(out.with_name("depth.png"))
    return out


if __name__ == "__main__":  # python -m core.oracle.bench torus DIR/rgba.png [size]
    import sys

    print(write_reference_view(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 256))
