"""Session 38: why DMTet.crossed_tets (one conv3d) is slower than the max-pool cut voxels + marching's search
on an H200: host and device time of each variant at tet grid 128 with a wrinkled sphere (~480k faces).
Runs against tree 8dab3f0 (DMTet.crossed_tets and marching_tets(crossed=True), reverted in adc117c), from its root
on the GPU machine:
    git archive 8dab3f0 | (mkdir -p .diag/ct && tar x -C .diag/ct)   # here; carry .diag to the GPU machine
    cd .diag/ct && PYTHONPATH=$PWD python3 ../../reports/speed/paper_run/crossed_tets_bench.py
Each variant's tetrahedra are checked equal to crossed_tets' (the cut voxels' are all their tetrahedra, a superset);
host time is to the last launch, wall time to the device's end, device time torch.profiler's kernels (session 38:
h200_crossed_tets_s38.txt).
"""
import sys, time
sys.path.insert(0, ".")
import torch
import torch.nn.functional as F
from core.representations.dmtet import DMTet, marching_tets
dev = torch.device("cuda")
dm = DMTet(128).to(dev)
g = torch.Generator(device=dev).manual_seed(0)
with torch.no_grad():  # a wrinkled sphere: ~1M faces
    x = dm.grid_verts
    dm.sdf.copy_(0.8 - x.norm(dim=-1) + 0.05 * torch.sin(40 * x).prod(-1) + 0.02 * torch.rand(x.shape[0], device=dev, generator=g))
n = 129
def pool_voxels():
    occ = (dm.sdf > 0).float().view(1, 1, n, n, n)
    spread = F.pad(F.max_pool3d(occ, 2, stride=1) + F.max_pool3d(-occ, 2, stride=1), (0, 1, 0, 1, 0, 1))
    base = torch.nonzero(spread.reshape(-1)).squeeze(1)
    return (base[:, None, None] + dm.tet_offsets[None]).reshape(-1, 4)
def conv(dtype):
    k = dm.tet_corners.to(dtype)
    def f():
        one = k.new_ones(())
        sign = torch.where(dm.sdf > 0, one, -one).view(1, 1, n, n, n)
        total = F.pad(F.conv3d(sign, k)[0], (0, 1, 0, 1, 0, 1), value=4.0)
        idx = torch.nonzero((total.abs_() < 3.0).permute(1, 2, 3, 0).reshape(-1)).squeeze(1)
        return torch.div(idx, 6, rounding_mode="floor")[:, None] + dm.tet_offsets[idx % 6]
    return f
def slices():
    o = (dm.sdf > 0).view(n, n, n)
    c = [o[a:a + 128, b:b + 128, cc:cc + 128] for cc in (0, 1) for b in (0, 1) for a in (0, 1)]  # bit = a + 2b + 4cc
    # Kuhn tets share corners 0 and 7: crossed iff not all of (c0, ca, cb, c7) equal
    tets = [(c[t[0]] != c[t[1]]) | (c[t[0]] != c[t[2]]) | (c[t[0]] != c[t[3]]) for t in dm_kuhn]
    cut = F.pad(torch.stack(tets, -1), (0, 0, 0, 1, 0, 1, 0, 1)).reshape(-1)
    idx = torch.nonzero(cut).squeeze(1)
    return torch.div(idx, 6, rounding_mode="floor")[:, None] + dm.tet_offsets[idx % 6]
from core.representations.tets import KUHN_TETS
dm_kuhn = KUHN_TETS.tolist()
def cudnn_off(f):
    def g():
        with torch.backends.cudnn.flags(enabled=False):
            return f()
    return g
ref = dm.crossed_tets()
print("crossed tets", ref.shape[0], "faces", dm.extract().faces.shape[0])
variants = {"pool voxels": pool_voxels, "conv fp32": conv(torch.float32), "conv fp16": conv(torch.float16),
            "conv fp32 no cudnn": cudnn_off(conv(torch.float32)), "slices": slices}
for name, f in variants.items():
    out = f()
    if name != "pool voxels":
        assert torch.equal(out, ref), name
    for _ in range(5): f()
    torch.cuda.synchronize()
    host, wall = [], []
    for _ in range(30):
        t0 = time.perf_counter(); f(); t1 = time.perf_counter(); torch.cuda.synchronize(); t2 = time.perf_counter()
        host.append(t1 - t0); wall.append(t2 - t0)
    host.sort(); wall.sort()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as p:
        for _ in range(10): f()
        torch.cuda.synchronize()
    dev_ms = sum(e.self_device_time_total for e in p.key_averages()) / 10 / 1000
    print(f"{name:20s} host {host[15]*1e3:.3f} ms  wall {wall[15]*1e3:.3f} ms  device {dev_ms:.3f} ms")
    if name in ("conv fp32", "pool voxels"):
        print(p.key_averages().table(sort_by="self_cuda_time_total", row_limit=6))
# the whole extract, new vs marching the pool voxels' tets
for name, f in {"extract (crossed)": dm.extract, "extract (pool + search)": lambda: marching_tets(dm.vertices(), dm.sdf, pool_voxels())}.items():
    for _ in range(5): f()
    torch.cuda.synchronize(); w = []
    for _ in range(30):
        t0 = time.perf_counter(); f(); torch.cuda.synchronize(); w.append(time.perf_counter() - t0)
    w.sort(); print(f"{name:26s} wall {w[15]*1e3:.3f} ms")
