"""`lift3d bench analytic`: the whole score-distillation path measured against a known answer.

Like the oracle bench (core/oracle/bench_fine.py) — the same reference view, the same held-out
cameras (EVAL_VIEWS), the same metrics — but the novel views are guided by the preset's real
guidance (joint or dynamic prior, SDS with CFG and w(t), the VAE encoder's gradient,
Zero-1-to-3's camera condition through cc_projection, the λ's and the SDS balance), with the
analytic priors of core/testmodels/analytic.py in place of the hub models: exact denoisers of the
benchmark's objects. Per object, both priors know every object of the run; the 2D prior is told
which by the prompt (prompt.text = the object's name), the 3D prior by the reference image.

Writes DIR/analytic.json: {"bench": "analytic", "preset", "device", "overrides", "objects":
{NAME: {psnr_novel_coarse, psnr_novel, mask_iou, chamfer_rel, chamfer_rel_coarse, seconds_coarse,
seconds_fine, …}}}, each object's record as soon as it is done.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)


def analytic_model_name(names: list[str]) -> str:
    """The model name of the analytic priors of these objects (core.models.sources)."""
    return "analytic:" + "+".join(str(n) for n in names)


def with_analytic_priors(params, names: list[str], label: str):
    """`params` with both priors the analytic ones of `names` and the prompt naming `label`."""
    from core.params import Params

    tree = params.to_dict()
    spec = analytic_model_name(names)
    tree["sd"]["model"] = spec
    tree["zero123"]["model"] = spec
    tree["prompt"]["text"] = label
    tree["prompt"]["learned_embeds"] = None
    tree["textual_inversion"]["enabled"] = False  # the object's name is the prompt
    return Params.model_validate(tree)


def run_object(params, name: str, names: list[str], out_dir: Path, device, progress: bool = True) -> dict:
    """Coarse then fine on one object under the analytic priors; its metrics."""
    from core.guidance.factory import build_guidance
    from core.oracle.bench import oracle_reference
    from core.oracle.bench_fine import evaluate_fine, fine_reference, mesh_chamfer
    from core.oracle.objects import make_object
    from core.params import step_digest
    from core.representations.dmtet import DMTet
    from core.stages.coarse import run_coarse
    from core.stages.fine import run_fine

    obj = make_object(name)
    p = with_analytic_priors(params, names, obj.name)
    out = Path(out_dir) / obj.name
    t0 = time.perf_counter()
    ref = oracle_reference(obj, p, device)
    guidance = build_guidance(p, ref, "coarse", device)
    coarse = run_coarse(p, ref, out / "coarse", guidance=guidance, device=device,
                        params_digest=step_digest(p, "coarse"), resume=False, progress=progress)
    coarse.rep.field.eval()
    t1 = time.perf_counter()
    fref = fine_reference(obj, p, device)
    fine_guidance = build_guidance(p, fref, "fine", device, token=coarse.state.token)
    fine = run_fine(p, fref, coarse.rep.field, out / "fine", coarse=coarse.snapshot(), guidance=fine_guidance,
                    device=device, params_digest=step_digest(p, "fine"), resume=False, progress=progress,
                    turntable_frames=12)
    t2 = time.perf_counter()
    m = evaluate_fine(fine, coarse, obj, p, device, compare_png=out / "compare.png")
    with torch.no_grad():
        start = DMTet(p.fine.tet_resolution, p.coarse.bound, device=device)
        start.init_from_density(coarse.rep.field.density, p.coarse.mesh_threshold)
        m["chamfer_rel_coarse"] = round(mesh_chamfer(start.extract().detach(), obj), 5)
    m["seconds_coarse"] = round(t1 - t0, 2)
    m["seconds_fine"] = round(t2 - t1, 2)
    m["sd_model"], m["zero123_model"] = p.sd.model, p.zero123.model
    return m


def bench_analytic(params, names: list[str], out_dir: Path | str, device, progress: bool = True,
                   meta: Optional[dict[str, Any]] = None, only: Optional[list[str]] = None) -> dict:
    """Every object of `names` (procedural names or mesh files), or those of `only` (a subset, for
    one process per object), under the analytic priors of them all; DIR/analytic.json is rewritten
    after each object."""
    from core.io import atomic_write_text
    from core.oracle.objects import make_object

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"bench": "analytic", "device": str(device), **(meta or {}), "objects": {}}
    unknown = [n for n in only or [] if n not in names]
    if unknown:
        raise ValueError(f"bench analytic: --only {', '.join(unknown)} is not among the objects {', '.join(names)}")
    for name in only or names:
        label = make_object(name).name
        m = run_object(params, name, names, out, device, progress)
        report["objects"][label] = m
        atomic_write_text(out / "analytic.json", json.dumps(report, indent=2))
        print(f"analytic {label:10s} PSNR coarse {m['psnr_novel_coarse']:6.2f} → fine {m['psnr_novel']:6.2f} dB  "
              f"mask IoU {m['mask_iou']:.3f}  Chamfer/diag {m['chamfer_rel']:.4f}  "
              f"{m['seconds_coarse']:.0f}+{m['seconds_fine']:.0f} s", flush=True)
    return report
