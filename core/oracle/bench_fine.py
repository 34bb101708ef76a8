"""`lift3d bench oracle --stage fine`: coarse then fine, oracle-guided, on each procedural object.

Per object (added to the oracle.json layout of core/oracle/bench.py):
  psnr_novel_coarse: the coarse NeRF's albedo renders at the bench's held-out views (EVAL_VIEWS),
  psnr_novel:        the fine mesh's renders at the same views,
      both at the fine stage's resolution (params.fine.resolution) against the object's renders;
  mask_iou:          the fine mesh's silhouettes at those views;
  chamfer_rel:       symmetric Chamfer distance (mean of the two mean nearest-neighbour distances)
                     between points sampled on the final mesh and on the object's true surface,
                     over the diagonal of the true surface's bounding box;
  chamfer_rel_coarse: the same for the DMTet mesh at the start of the fine stage (the NeRF's
                     level set), to show what the refinement changed.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from core.evaluation.metrics import chamfer_relative, sample_mesh_surface

N_SURFACE = 30000


def mesh_chamfer(mesh, obj) -> float:
    if mesh.faces.shape[0] == 0:
        return float("inf")
    return chamfer_relative(sample_mesh_surface(mesh.verts, mesh.faces, N_SURFACE),
                            obj.sample_surface(N_SURFACE))


@torch.no_grad()
def evaluate_fine(fine, coarse, obj, params, device, compare_png=None) -> dict:
    from core.evaluation.metrics import mask_iou, psnr
    from core.representations.nerf import render_chunked
    from core.oracle.bench import eval_cameras

    res = params.fine.resolution
    cams = eval_cameras(params, device)
    tgt = obj.render(cams, res, shading="albedo")
    c = params.coarse
    nerf = render_chunked(coarse.rep.field, cams, res, samples_per_ray=c.samples_per_ray,
                          occupancy=coarse.rep.occupancy, shading="albedo", need_normals=False)
    mesh = fine.rep.dmtet.extract().detach()
    r = fine.rep.render_views(cams, res)
    rgb, op = r.rgb, r.opacity
    t_rgb = tgt["rgb"].to(rgb.device)
    if compare_png is not None:  # truth | coarse NeRF | fine mesh at two of the held-out views
        rows = [torch.cat([t_rgb[i], nerf.rgb[i].to(rgb.device), rgb[i]], -1) for i in (0, len(cams) // 2)]
        img = (torch.cat(rows, -2).clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        from PIL import Image

        Image.fromarray(img).save(compare_png)
    return {"psnr_novel_coarse": round(psnr(nerf.rgb, t_rgb.to(nerf.rgb.device)), 3),
            "psnr_novel": round(psnr(rgb, t_rgb), 3),
            "mask_iou": round(mask_iou(op, tgt["opacity"].to(op.device)), 4),
            "chamfer_rel": round(mesh_chamfer(mesh, obj), 5)}


def fine_reference(obj, params, device="cpu"):
    """The object's reference view at the fine resolution (depth as 1/z: bigger = nearer)."""
    from core.oracle.bench import oracle_reference

    return oracle_reference(obj, params, device, params.fine.resolution)


def completed_coarse_matches(coarse_dir: Path, params) -> bool:
    """A finished coarse stage (result.json there) whose checkpoint was made with these parameters:
    the fine bench then starts from it instead of training it again."""
    from core.errors import InputError
    from core.params import step_digest
    from core.stages.engine import read_state

    ck = Path(coarse_dir) / "checkpoint.pt"
    if not (Path(coarse_dir) / "result.json").is_file() or not ck.is_file():
        return False
    try:
        return read_state(ck, "coarse").params_digest == step_digest(params, "coarse")
    except InputError:  # unreadable or of older code: train again
        return False


def bench_oracle_fine(params, names, out_dir: Path, device, progress=True, reuse_coarse=True) -> dict:
    from core.oracle.bench import evaluate_field, oracle_reference
    from core.oracle.guidance import OracleGuidance
    from core.oracle.objects import make_object
    from core.params import step_digest
    from core.stages.coarse import run_coarse
    from core.stages.fine import run_fine

    digest = step_digest(params, "coarse")

    results = {}
    for name in names:
        obj = make_object(name)
        t0 = time.perf_counter()
        guidance = OracleGuidance(obj, params)
        coarse_dir = Path(out_dir) / obj.name / "coarse"
        reuse = reuse_coarse and completed_coarse_matches(coarse_dir, params)
        if reuse:
            print(f"oracle fine {obj.name}: reusing the completed coarse stage in {coarse_dir}", flush=True)
        ref = oracle_reference(obj, params, device)
        coarse = run_coarse(params, ref, coarse_dir, guidance=guidance, device=device, params_digest=digest,
                            resume=reuse, progress=progress)
        coarse.rep.field.eval()
        # the coarse bench's own figures (its held-out views at the coarse resolution), so one fine run
        # also answers the coarse bar (PSNR at 128² for magic123)
        coarse_m = evaluate_field(coarse.rep.field, obj, params, coarse.rep.occupancy, device)
        t1 = time.perf_counter()
        fine = run_fine(params, fine_reference(obj, params, device), coarse.rep.field, Path(out_dir) / obj.name / "fine",
                        coarse=coarse.snapshot(), guidance=guidance, device=device, resume=False, progress=progress,
                        turntable_frames=12)
        t2 = time.perf_counter()
        m = evaluate_fine(fine, coarse, obj, params, device, compare_png=Path(out_dir) / obj.name / "compare.png")
        with torch.no_grad():  # the NeRF's own level set, as the fine stage started from it
            from core.representations.dmtet import DMTet

            start = DMTet(params.fine.tet_resolution, params.coarse.bound, device=device)
            start.init_from_density(coarse.rep.field.density, params.coarse.mesh_threshold)
            m["chamfer_rel_coarse"] = round(mesh_chamfer(start.extract().detach(), obj), 5)
        m["coarse_psnr_novel"], m["coarse_mask_iou"] = coarse_m["psnr_novel"], coarse_m["mask_iou"]
        m["seconds_coarse"] = round(t1 - t0, 2)
        m["seconds_fine"] = round(t2 - t1, 2)
        m["ms_per_fine_iter"] = round(1000 * fine.state.elapsed / max(1, fine.state.step), 2)
        m["rasterizer"] = fine.rep.backend
        results[obj.name] = m
        print(f"oracle fine {obj.name:10s} PSNR coarse {m['psnr_novel_coarse']:6.2f} → fine {m['psnr_novel']:6.2f} dB  "
              f"Chamfer/diag {m['chamfer_rel']:.4f} (NeRF level set {m['chamfer_rel_coarse']:.4f})  "
              f"{m['seconds_coarse']:.1f}+{m['seconds_fine']:.1f} s", flush=True)
    return results
