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

N_SURFACE = 30000


def sample_mesh_surface(verts: torch.Tensor, faces: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """n points uniformly on a triangle mesh (area-weighted faces, uniform barycentrics)."""
    g = torch.Generator().manual_seed(seed)
    v = verts.detach().cpu().double()[faces.cpu()]
    area = torch.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0], dim=-1).norm(dim=-1)
    idx = torch.multinomial(area / area.sum(), n, replacement=True, generator=g)
    r1, r2 = torch.rand(n, generator=g).double(), torch.rand(n, generator=g).double()
    s = r1.sqrt()
    b0, b1, b2 = 1 - s, s * (1 - r2), s * r2
    t = v[idx]
    return (b0[:, None] * t[:, 0] + b1[:, None] * t[:, 1] + b2[:, None] * t[:, 2]).float()


def chamfer_relative(mesh_pts: torch.Tensor, true_pts: torch.Tensor) -> float:
    from scipy.spatial import cKDTree

    a, b = mesh_pts.numpy().astype(np.float64), true_pts.cpu().numpy().astype(np.float64)
    d_ab = cKDTree(b).query(a)[0].mean()
    d_ba = cKDTree(a).query(b)[0].mean()
    diag = float(np.linalg.norm(b.max(0) - b.min(0)))
    return float(0.5 * (d_ab + d_ba) / diag)


def mesh_chamfer(mesh, obj) -> float:
    if mesh.faces.shape[0] == 0:
        return float("inf")
    return chamfer_relative(sample_mesh_surface(mesh.verts, mesh.faces, N_SURFACE),
                            obj.sample_surface(N_SURFACE))


@torch.no_grad()
def evaluate_fine(trainer, coarse_trainer, obj, params, device, compare_png=None) -> dict:
    from core.stages.losses import mask_iou, psnr
    from core.representations.nerf import render_chunked
    from core.oracle.bench import eval_cameras

    res = params.fine.resolution
    cams = eval_cameras(params, device)
    tgt = obj.render(cams, res, shading="albedo")
    c = params.coarse
    nerf = render_chunked(coarse_trainer.field, cams, res, samples_per_ray=c.samples_per_ray,
                          occupancy=coarse_trainer.occupancy, shading="albedo", need_normals=False)
    mesh = trainer.mesh().detach()
    rgbs, ops = [], []
    for i in range(len(cams)):
        r = trainer.render(mesh, cams[i], res)
        rgbs.append(r.rgb)
        ops.append(r.opacity)
    rgb, op = torch.cat(rgbs), torch.cat(ops)
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
    from core.rendering.cameras import reference_cameras
    from core.inputs.images import Reference

    cams = reference_cameras(params.camera, device=device)
    r = obj.render(cams, params.fine.resolution, shading="albedo")
    z = r["depth"][0]
    disp = torch.where(z > 0, 1.0 / z.clamp_min(1e-6), torch.zeros_like(z))
    return Reference(rgb=r["rgb"][0].cpu(), mask=r["opacity"][0].cpu(), depth=disp.cpu(), image_path=f"oracle:{obj.name}")


COARSE_SECTIONS = ("seed", "camera", "coarse")  # what the oracle-guided coarse stage depends on


def completed_coarse_matches(coarse_dir: Path, params) -> bool:
    """A finished coarse stage (result.json there) whose checkpoint has the same seed, camera and
    coarse parameters: the fine bench then starts from it instead of training it again."""
    ck = Path(coarse_dir) / "checkpoint.pt"
    if not (Path(coarse_dir) / "result.json").is_file() or not ck.is_file():
        return False
    try:
        saved = torch.load(ck, map_location="cpu", weights_only=False)["params"]
    except Exception:  # noqa: BLE001 - unreadable: train again
        return False
    now = params.to_dict()
    return all(saved.get(k) == now.get(k) for k in COARSE_SECTIONS) and saved.get("coarse", {}).get("iters") is not None


def bench_oracle_fine(params, names, out_dir: Path, device, progress=True, reuse_coarse=True) -> dict:
    from core.stages.coarse import run_coarse
    from core.stages.fine import run_fine
    from core.oracle.guidance import OracleGuidance
    from core.oracle.objects import make_object
    from core.oracle.bench import oracle_reference

    results = {}
    for name in names:
        obj = make_object(name)
        t0 = time.perf_counter()
        guidance = OracleGuidance(obj, params)
        coarse_dir = Path(out_dir) / name / "coarse"
        reuse = reuse_coarse and completed_coarse_matches(coarse_dir, params)
        if reuse:
            print(f"oracle fine {name}: reusing the completed coarse stage in {coarse_dir}", flush=True)
        ref = oracle_reference(obj, params, device)
        try:
            coarse = run_coarse(params, ref, coarse_dir, guidance=guidance, device=device, resume=reuse,
                                progress=progress)
        except (RuntimeError, KeyError) as e:  # a checkpoint of older code: train the coarse stage again
            if not reuse:
                raise
            print(f"oracle fine {name}: cannot reuse {coarse_dir} ({type(e).__name__}); training it again", flush=True)
            coarse = run_coarse(params, ref, coarse_dir, guidance=guidance, device=device, resume=False,
                                progress=progress)
        coarse.field.eval()
        t1 = time.perf_counter()
        fine = run_fine(params, fine_reference(obj, params, device), coarse.field, Path(out_dir) / name / "fine",
                        guidance=guidance, device=device, resume=False, progress=progress,
                        coarse_checkpoint=str(Path(out_dir) / name / "coarse" / "checkpoint.pt"), turntable_frames=12)
        t2 = time.perf_counter()
        m = evaluate_fine(fine, coarse, obj, params, device, compare_png=Path(out_dir) / name / "compare.png")
        with torch.no_grad():  # the NeRF's own level set, as the fine stage started from it
            from core.representations.dmtet import DMTet

            start = DMTet(params.fine.tet_resolution, params.coarse.bound, device=device)
            start.init_from_density(coarse.field.density, params.coarse.mesh_threshold)
            m["chamfer_rel_coarse"] = round(mesh_chamfer(start.extract().detach(), obj), 5)
        m["seconds_coarse"] = round(t1 - t0, 2)
        m["seconds_fine"] = round(t2 - t1, 2)
        m["ms_per_fine_iter"] = round(1000 * fine.elapsed / max(1, fine.step_no), 2)
        m["rasterizer"] = fine.rasterizer.backend
        results[name] = m
        print(f"oracle fine {name:10s} PSNR coarse {m['psnr_novel_coarse']:6.2f} → fine {m['psnr_novel']:6.2f} dB  "
              f"Chamfer/diag {m['chamfer_rel']:.4f} (NeRF level set {m['chamfer_rel_coarse']:.4f})  "
              f"{m['seconds_coarse']:.1f}+{m['seconds_fine']:.1f} s", flush=True)
    return results
