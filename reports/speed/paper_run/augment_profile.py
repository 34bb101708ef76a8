"""The textual inversion's augmentation alone on a GPU (session 20, call 5): a batch of 16 views by
ReleasedAugment (host time, wall time), torch.profiler over 5 batches, then each transform of the example's
pipeline alone on the 640² base (CUDA events, 50 calls; the host's launch gaps included).
    PYTHONPATH=$PWD python3 reports/speed/paper_run/augment_profile.py
Run as it stood before the rotation without host syncs (core.guidance.textual_inversion._rotation).
"""
import sys, time, os
sys.path.insert(0, ".")
import torch
from core.guidance.textual_inversion import ReleasedAugment, released_pipeline
from torch.profiler import profile, ProfilerActivity
dev = torch.device("cuda")
g = torch.Generator().manual_seed(0)
rgb = torch.rand(3, 512, 512)
aug = ReleasedAugment(rgb, 512, dev)
for _ in range(3): aug(16, g)
torch.cuda.synchronize()
t = time.perf_counter(); n = 20
for _ in range(n): aug(16, g)
host = (time.perf_counter() - t) / n
torch.cuda.synchronize(); wall = (time.perf_counter() - t) / n
print(f"batch of 16: host {host*1e3:.1f} ms, wall (synced at end) {wall*1e3:.1f} ms")
# GPU time per transform type, one view at a time
fixed, drawn = released_pipeline(512)
base = aug.base
import torchvision.transforms as T
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(5): aug(16, g)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25))
# each transform alone on the base (GPU ms per call, 50 calls)
def timeit(name, f, reps=50):
    for _ in range(3): f()
    torch.cuda.synchronize(); e0, e1 = torch.cuda.Event(True), torch.cuda.Event(True); e0.record()
    for _ in range(reps): f()
    e1.record(); torch.cuda.synchronize(); print(f"{name:40s} {e0.elapsed_time(e1)/reps:.3f} ms")
img = base
timeit("RandomRotation(10, fill=1)", lambda: T.RandomRotation(degrees=10, fill=1.0)(img))
timeit("CenterCrop(533)", lambda: T.CenterCrop(533)(img))
timeit("Resize(512, aa) from 533", lambda: T.Resize(512, antialias=True)(img[:, :533, :533]))
timeit("RandomResizedCrop(512)", lambda: T.RandomResizedCrop(512, scale=(0.85, 1.15), antialias=True)(img))
timeit("ColorJitter(.04)x4", lambda: T.ColorJitter(0.04, 0.04, 0.04, 0.04)(img))
timeit("RandomGrayscale(1)", lambda: T.RandomGrayscale(p=1.0)(img))
timeit("GaussianBlur(5)", lambda: T.GaussianBlur(5, (0.1, 2))(img))
timeit("hflip", lambda: T.RandomHorizontalFlip(1.0)(img))
timeit("drawn pipeline, one view", lambda: drawn(img))
