"""CUDA index_select against the same rows taken element by element (core.ops.gather_flat) and advanced
indexing, forward + backward and forward alone, at a fine iteration's sizes (reports/speed session 35):
rows of 4 fp32 (clip-space corners, 16 bytes), 3 and 6. Prints one line a size.

    python3 scripts/gather_bench.py   # on a GPU; session 35 ran it as written here
"""
import torch, time
dev = torch.device("cuda")
print(torch.__version__)
for V, N, C in ((500_000, 3_000_000, 4), (500_000, 3_000_000, 3), (500_000, 3_000_000, 6), (500_000, 600_000, 4)):
    vals = torch.randn(V, C, device=dev, requires_grad=True)
    idx = torch.randint(0, V, (N,), device=dev)
    up = torch.randn(N, C, device=dev)
    ar = torch.arange(C, device=dev)
    def a():
        y = vals.index_select(0, idx); y.backward(up)
    def b():
        y = vals.view(-1).index_select(0, (idx[:, None] * C + ar).reshape(-1)).view(N, C); y.backward(up)
    def c():
        y = vals[idx]; y.backward(up)
    res = {}
    for name, f in (("index_select", a), ("flat", b), ("index", c)):
        for _ in range(3): f()
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(10): f()
        e1.record(); e1.synchronize()
        res[name] = round(e0.elapsed_time(e1) / 10, 3)
        # forward alone
        with torch.no_grad():
            e0.record()
            for _ in range(10):
                (vals.index_select(0, idx) if name == "index_select" else vals.view(-1).index_select(0, (idx[:, None] * C + ar).reshape(-1)) if name == "flat" else vals[idx])
            e1.record(); e1.synchronize()
        res[name + "_fwd"] = round(e0.elapsed_time(e1) / 10, 3)
    print(V, N, C, res, flush=True)
