"""Peak memory of one coarse reference-view step (render + backward, finite-difference normals) at the
magic123 field settings, with the torch hash grid's memory switches off and on (and the normals' recomputation); each in a fresh
process, its peak resident memory (ru_maxrss) above the process's baseline. CPU: the GPU's
allocations scale the same way (the same tensors), which is what this is for when no GPU is at hand.

    .venv/bin/python scripts/field_memory.py --res 32 --out reports/speed/field_memory.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, sys, time, torch
sys.path.insert(0, {root!r})
from core.params import load_params
from core.representations.nerf import NeRFField, render
from core.rendering.cameras import reference_cameras
torch.set_num_threads(2)
p = load_params("magic123", ["device=cpu", "coarse.grid.recompute_backward={rec}", "coarse.grid.chunk={chunk}",
                            "coarse.normals_recompute={nrec}"])
f = NeRFField.from_params(p)
cams = reference_cameras(p.camera)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
out = render(f, cams, {res}, samples_per_ray=p.coarse.samples_per_ray, shading="lambertian",
             light_dir=torch.tensor([[0., 0., 1.]]), perturb=True, generator=torch.Generator().manual_seed(0))
(out.rgb.mean() + out.normal.mean()).backward()
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"peak_above_baseline_mib": round((peak - base) / 1024, 1), "seconds": round(dt, 1),
                  "samples": int(out.sample_weights.numel()), "grad_sum": float(f.encoding.table.grad.abs().sum())}}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--res", type=int, default=32)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    rows = {}
    for name, rec, chunk, nrec in (("before (rows and weights kept, no chunks)", "false", 0, "false"),
                                   ("recompute_backward", "true", 0, "false"),
                                   ("recompute_backward + chunk 2^20", "true", 1 << 20, "false"),
                                   ("recompute_backward + chunk 2^18", "true", 1 << 18, "false"),
                                   ("recompute_backward + chunk 2^18 + normals_recompute", "true", 1 << 18, "true")):
        code = CHILD.format(root=str(ROOT), rec=rec, chunk=chunk, res=a.res, nrec=nrec)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        rows[name] = json.loads(r.stdout.strip().splitlines()[-1])
        print(name, rows[name], flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"resolution": a.res, "preset": "magic123 field (16 levels, 2^19 table, 128 samples)",
                                 "device": "cpu", "runs": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
