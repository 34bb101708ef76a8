"""The VAE encoder's forward and backward as SDS runs it (issue 15): batch 1, fp16, the render's
gradient back through the encoder (the ∂z/∂I of Magic123 eq. 5), at Stable Diffusion's 512² and
Zero-1-to-3's 256², with diffusers' kernels and with lift3d's (`sd.vae_kernels` / `zero123.vae_kernels`:
Triton GroupNorm, matmul attention), each part alone and both, and each kernel set replayed as CUDA
graphs (`vae_graphs`), whose capture puts rows of at least group_norm_triton.GRAPH_MIN_ROW on the
Triton GroupNorm (`lift3d+graphs`; `lift3d+graphs@N` with N instead, `--graph-min-rows`). A '+compiled'
variant runs the encode under torch.compile (`vae_compile: default`, core.guidance.sd.compile_vae_moments;
'+compiled-cl' with Inductor's layout forced channels-last), alone or replayed as graphs: under torch.compile
the GroupNorms are torch's, which Inductor fuses with their SiLUs. Prints a table and writes JSON: ms
per encode (CUDA events over `--iters` after `--warmup`), the first call's seconds (a compile or a capture),
and how far each variant's latent mean and image gradient are from diffusers' (max |Δ| / max |reference|).

    python scripts/vae_bench.py --out reports/speed/h200_vae_kernels_s16.json [--iters 50]
    python scripts/vae_bench.py --kinds lift3d+graphs,lift3d+compiled+graphs --out /tmp/vae.json
    python scripts/vae_bench.py --plot reports/speed/h200_vae_kernels_s16_final.json   # → the .png beside it

The full-size SD 1.5 VAE architecture (core.testmodels.fullsize_priors' config) with random weights:
the kernels' cost does not depend on the weights' values.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def variant(vae, kind: str):
    """`vae` with kind's kernels: diffusers | groupnorm | attention | lift3d (both); a '-cl' suffix:
    its weights channels-last as well (`sd.channels_last`), so that cuDNN runs NHWC convolutions
    without converting the layout around each."""
    import torch

    from core.guidance.sd import lift3d_encoder_kernels

    kernels, _, layout = kind.partition("-")
    lift3d_encoder_kernels(vae.encoder, group_norm=kernels in ("groupnorm", "lift3d"),
                           attention=kernels in ("attention", "lift3d"))
    if layout == "cl":
        vae.to(memory_format=torch.channels_last)
    return vae


def plot(path: Path) -> Path:
    """Bars of ms per encode, a group per resolution, a bar per kernels variant: `path` with .png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = json.loads(path.read_text())
    kinds = list(dict.fromkeys(row["kernels"] for row in r["rows"]))
    resolutions = list(dict.fromkeys(row["resolution"] for row in r["rows"]))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / len(kinds)
    for k, kind in enumerate(kinds):
        ms = [next(row["ms"] for row in r["rows"] if row["resolution"] == res and row["kernels"] == kind)
              for res in resolutions]
        bars = ax.bar([i + k * width for i in range(len(resolutions))], ms, width, label=kind)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks([i + width * (len(kinds) - 1) / 2 for i in range(len(resolutions))],
                  [f"{res}² ({'SD' if res == 512 else 'Zero-1-to-3' if res == 256 else 'other'})" for res in resolutions])
    ax.set_ylabel("ms per encode, forward + backward")
    ax.set_title(f"VAE encoder as SDS runs it (batch 1, fp16) — {r['gpu']}", fontsize=10)
    ax.legend(fontsize=8, title="kernels", title_fontsize=8)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="JSON file to write (and its .png)")
    ap.add_argument("--plot", type=Path, help="only draw the .png of a JSON this script wrote")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--resolutions", default="512,256")
    ap.add_argument("--graph-min-rows", default="16384,65536,262144",
                    help="'lift3d+graphs@N' variants: the graphs captured with rows of ≥ N elements on the Triton "
                         "GroupNorm (262144: eager's MIN_ROW, session 17's graphs; default: %(default)s)")
    ap.add_argument("--kinds", default=None,
                    help="comma-separated variants to time (default: all; e.g. lift3d+graphs,lift3d-cl+graphs). "
                         "Variants: diffusers, groupnorm, attention, lift3d, each with '-cl' (channels-last "
                         "weights), '+compiled' or '+compiled-cl' (torch.compile, its layout Inductor's or "
                         "channels-last) and/or '+graphs' (replayed as CUDA graphs)")
    a = ap.parse_args(argv)
    if a.plot:
        print(f"wrote {plot(a.plot)}")
        return 0
    if not a.out:
        ap.error("--out is required (or --plot JSON)")

    import copy

    import torch
    from diffusers import AutoencoderKL

    from core.guidance import group_norm_triton as gnt
    from core.guidance.group_norm_triton import MIN_ROW
    import time

    from core.guidance.sd import compile_vae_moments, graph_vae_moments, vae_moments
    from core.testmodels.fullsize_priors import _cfg

    if not torch.cuda.is_available():
        print("vae_bench: needs a CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    torch.manual_seed(0)
    base = AutoencoderKL.from_config(_cfg("sd15_vae.json")).to(dev, torch.half).eval().requires_grad_(False)
    kinds = ("diffusers", "groupnorm", "attention", "lift3d", "diffusers+graphs", "lift3d+graphs",
             *(f"lift3d+graphs@{int(n)}" for n in a.graph_min_rows.split(",") if n), "lift3d-cl", "lift3d-cl+graphs")
    if a.kinds:
        kinds = tuple(k for k in a.kinds.split(",") if k)
    graph_min_row = {k: int(k.split("@")[1]) if "@" in k else gnt.GRAPH_MIN_ROW for k in kinds}
    vaes = {k: variant(copy.deepcopy(base), k.split("+")[0]) for k in kinds}
    # "+graphs": the encode replayed as CUDA graphs (`vae_graphs`), captured at its first call
    # "+compiled" / "+compiled-cl": under torch.compile (`vae_compile: default`), a compile of its own per
    # variant and resolution (one static shape each, as in the stages)
    def moments_of(kind):
        mods = kind.split("+")[1:]
        if "compiled" in mods or "compiled-cl" in mods:
            return compile_vae_moments("default", dev, channels_last="compiled-cl" in mods)
        return vae_moments

    def fn_of(kind):
        m = moments_of(kind)
        return graph_vae_moments(m, dev) if "graphs" in kind.split("+")[1:] else m

    fns = {k: fn_of(k) for k in kinds}
    for name in ("recompile_limit", "cache_size_limit"):  # a compile per variant and resolution, one code object
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    rows = []
    resolutions = [int(r) for r in a.resolutions.split(",")]
    first = resolutions[0]
    for res in resolutions:
        gen = torch.Generator(device=dev).manual_seed(res)
        img = torch.rand(1, 3, res, res, device=dev, generator=gen)
        up = torch.randn(1, 4, res // 8, res // 8, device=dev, generator=gen)

        def step(vae, fn):
            x = img.clone().requires_grad_(True)
            mean, std = fn(vae, x)
            (mean.float() * up).sum().backward()
            return mean.detach().float(), x.grad.clone()  # a graph's input gradient is its own buffer

        ref_mean, ref_grad = step(base, vae_moments)  # diffusers' kernels, NCHW
        for kind in kinds:
            vae, fn = vaes[kind], (fns[kind] if res == first else fn_of(kind))
            default, gnt.GRAPH_MIN_ROW = gnt.GRAPH_MIN_ROW, graph_min_row[kind]  # read when a graph is captured
            t0 = time.perf_counter()
            try:
                mean, grad = step(vae, fn)  # a "+graphs" variant's capture, a "+compiled" one's compile
            finally:
                gnt.GRAPH_MIN_ROW = default
            torch.cuda.synchronize()
            first_s = time.perf_counter() - t0
            for _ in range(a.warmup):
                step(vae, fn)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(a.iters):
                step(vae, fn)
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end) / a.iters
            rows.append(dict(resolution=res, kernels=kind, ms=round(ms, 3), first_call_s=round(first_s, 2),
                             mean_rel_diff=float((mean - ref_mean).abs().max() / ref_mean.abs().max()),
                             grad_rel_diff=float((grad - ref_grad).abs().max() / ref_grad.abs().max())))
            r = rows[-1]
            print(f"{res:4d}²  {kind:22s} {r['ms']:8.3f} ms  first call {first_s:6.1f} s  Δmean {r['mean_rel_diff']:.2e}  Δgrad {r['grad_rel_diff']:.2e}",
                  flush=True)
    out = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, iters=a.iters, warmup=a.warmup, min_row=MIN_ROW, graph_min_row=gnt.GRAPH_MIN_ROW,
               what="SD 1.5 VAE encoder, batch 1, fp16, forward + backward to the image (vae_moments)", rows=rows)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out} and {plot(a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
