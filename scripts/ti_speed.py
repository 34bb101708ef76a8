"""Textual inversion's step at the released recipe (batch 16, 512²) by variant, on one GPU: ms a
step once warm, where a step goes (augmentation, VAE encoder, text encoder, UNet, backward,
optimiser; timed with the device synchronised around each part), and peak memory.

    python scripts/ti_speed.py --models-dir DIR --out FILE.json [--steps 40] \
        [--variant NAME=KEY=VALUE,KEY=VALUE ...]
    python scripts/ti_speed.py --plot FILE.json OUT.png   # the parts of a step by variant, as bars
    python scripts/ti_speed.py --models-dir DIR --out FILE.json --flops --variant …   # + the floor
    python scripts/ti_speed.py --models-dir DIR --out FILE.json --clocks --variant …  # + the clocks' log
    python scripts/ti_speed.py --plot-clocks CLOCKS.csv OUT.png   # a --clocks log over time

Each variant's record has the card's clocks while its steps ran (core.perf.GpuClocks: nvidia-smi's SM
clock, power draw, utilisation and clock-event reasons every 250 ms; while the GPU was busy, the
median clock and power and the share of samples the driver held the clocks down for the power cap);
`--clocks` keeps the samples, OUT_clocks_NAME.csv. A step that no host-side change moves is the card's (session 30: 93–100% busy at
its 700 W cap, the SM clock 1770–1965 of 1980 MHz).

`--flops` also counts the step's floating-point work part by part (torch.utils.flop_counter: the
matmuls, convolutions and attention; not the elementwise work), times a large fp16 matmul on the
same GPU, and writes each part's floor: its FLOPs at that matmul rate. What a step cannot go below
on this card at this recipe, however it is scheduled.

The priors are core.testmodels.fullsize_priors' full-size random ones (written to DIR once), loaded
through core.models. Without --variant: the plain loop, the overlapped loop (the default since
session 13), channels-last with compile, and all three (session 11: channels-last alone is
slower, 318 against 272 ms).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEFAULT_VARIANTS = {  # each names its switches, whatever params.yaml's defaults are now
    "plain": ["textual_inversion.overlap=false"],
    "overlap": ["textual_inversion.overlap=true"],
    "channels_last+compile": ["textual_inversion.overlap=false", "sd.channels_last=true",
                              "textual_inversion.compile=default"],
    "overlap+channels_last+compile": ["textual_inversion.overlap=true", "sd.channels_last=true",
                                      "textual_inversion.compile=default"],
}


@contextlib.contextmanager
def fixed_views(on: bool):
    """While on: ReleasedAugment gives each batch size's first views again (its seed is drawn as
    usual, so the rest of the random stream is too). For measuring what the augmentation costs a step."""
    from core.guidance.textual_inversion import ReleasedAugment

    if not on:
        yield
        return
    original, cache = ReleasedAugment.views, {}

    def views(self, n, seed):
        if n not in cache:
            cache[n] = original(self, n, seed)
        return cache[n]

    ReleasedAugment.views = views
    try:
        yield
    finally:
        ReleasedAugment.views = original


def plot_clocks(csv_path: Path, png: Path) -> Path:
    """The SM clock, power draw and utilisation over a --clocks log, the power cap's samples marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from core.perf import SW_POWER_CAP, clock_summary, read_smi

    rows = read_smi(csv_path)
    t = [r["t"] for r in rows]
    capped = [r["t"] for r in rows if r["reasons"] & SW_POWER_CAP]
    fig, axes = plt.subplots(3, 1, figsize=(8, 5.6), sharex=True)
    for ax, key, label in zip(axes, ("sm_mhz", "power_w", "util"), ("SM clock, MHz", "power draw, W", "utilisation, %")):
        ax.plot(t, [r[key] for r in rows], lw=1, color="C0")
        lo, hi = ax.get_ylim()
        ax.scatter(capped, [hi] * len(capped), s=6, color="C3", label="power cap holding the clocks" if key == "sm_mhz" else None)
        ax.set_ylabel(label, fontsize=8)
    axes[0].legend(fontsize=7, loc="lower left")
    axes[-1].set_xlabel("seconds")
    s = clock_summary(rows)
    fig.suptitle(f"{csv_path.name}: while busy, SM {s.get('sm_mhz_median', '-')} MHz, {s.get('power_w_median', '-')} W, "
                 f"power-capped {100 * s.get('power_capped_share', 0):.0f}% of samples", fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def time_variant(sets: list[str], folder: str, steps: int, scoped_steps: int, device: torch.device,
                 profile: int = 0, profile_path: Path | None = None, clocks_path: Path | None = None) -> dict:
    from core import perf
    from core.guidance.factory import stable_diffusion_parts
    from core.guidance.textual_inversion import learn_token_from_params
    from core.models.cache import PRIORS
    from core.params import apply_overrides, configure_cudnn, load_params

    torch._dynamo.reset()
    PRIORS.clear()
    # a diagnostic, not a setting: `ti_speed.fixed_views=true` reuses each batch size's first views (the
    # random stream drawn as usual), so a step costs what it would if the augmentation were free
    fixed = "ti_speed.fixed_views=true" in sets
    sets = [s for s in sets if not s.startswith("ti_speed.")]
    rgb = torch.ones(3, 512, 512)
    rgb[:, 128:384, 160:352] = torch.tensor([0.7, 0.3, 0.2])[:, None, None]
    mask = torch.zeros(1, 512, 512)
    mask[:, 128:384, 160:352] = 1
    p = load_params("magic123", [f"device={device.type}", f"sd.model={folder}", f"textual_inversion.steps={steps}", *sets])
    configure_cudnn(p)  # as `generate` does (resolve_device): --variant …=cudnn_benchmark=true
    parts = stable_diffusion_parts(p, device)
    stamps: list[float] = []
    if device.type == "cuda":
        gc.collect()  # the variant before's graphs and cached blocks, out of this one's reserved peak
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    stats: dict = {}
    with fixed_views(fixed), perf.GpuClocks(device, clocks_path) as clocks:
        learn_token_from_params(parts, rgb, mask, p, progress=False, stats=stats,
                                callback=lambda s, loss: stamps.append(time.perf_counter()))
    first_s = time.perf_counter() - t0
    per_step = [1000 * (b - a) for a, b in zip(stamps[steps // 2:], stamps[steps // 2 + 1:])]
    diag = ["ti_speed.fixed_views=true"] * fixed
    rec = {"sets": sets + diag, "steps": steps, "seconds": round(first_s, 1),
           "ms_per_step_steady": round(statistics.median(per_step), 1),
           "ms_per_step_mean_2nd_half": round(statistics.fmean(per_step), 1),
           "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2) if device.type == "cuda" else None,
           # what the allocator held at most: CUDA graphs keep their pools reserved between replays
           "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2 ** 30, 2)
           if device.type == "cuda" else None}
    if clocks.summary is not None:  # the card's clocks while it ran (the CSV kept with --clocks)
        rec["clocks"] = {**({"csv": str(clocks_path)} if clocks_path is not None else {}), **clocks.summary}
    if "views_seconds" in stats:  # prefetch: the views' thread per batch made, the loop's wait for them per step
        rec["views_ms_per_batch"] = round(1000 * stats["views_seconds"] / max(1, steps - 1), 1)
        rec["views_wait_ms_per_step"] = round(1000 * stats["views_wait_seconds"] / max(1, steps - 1), 1)
    perf.SCOPE_TIMES = {}
    try:
        short = apply_overrides(p, [f"textual_inversion.steps={scoped_steps}"])
        with fixed_views(fixed):
            learn_token_from_params(stable_diffusion_parts(short, device), rgb, mask, short, progress=False)
        rec["scopes_ms_per_step"] = {k.removeprefix("lift3d.ti."): round(1000 * t / n, 1)
                                     for k, (n, t) in perf.SCOPE_TIMES.items()}
    finally:
        perf.SCOPE_TIMES = None
    if "textual_inversion.compile=graphs" in sets and profile > 0:  # a fresh run's few steps are its captures
        rec["profile"] = "skipped: a graphs run's first steps are its warm-ups and captures, not replays"
    elif profile > 0 and profile_path is not None:  # after the runs above: compiled code is warm
        short = apply_overrides(p, [f"textual_inversion.steps={profile}"])
        events: list = []
        with fixed_views(fixed):
            table = perf.profile_table(lambda: learn_token_from_params(stable_diffusion_parts(short, device), rgb, mask,
                                                                       short, progress=False), device, rows=50,
                                       events=events)
        by_scope = perf.kernel_ms_by_scope(events, profile)
        profile_path.parent.mkdir(parents=True, exist_ok=True)
        profile_path.write_text(f"ti_speed: {profile} steps, {' '.join(sets) or 'defaults'}\n{table}\n\n"
                                f"kernel ms a step by scope (every stream): {json.dumps(by_scope)}\n\n"
                                f"{perf.gpu_idle(events, profile)}\n\n{perf.ops_by_scope(events, profile)}\n")
        rec["profile"] = str(profile_path)
        rec["kernel_ms_by_scope"] = {k.removeprefix("lift3d.ti."): v for k, v in by_scope.items()}
    return rec


def step_flops(folder: str, device: torch.device, batch: int = 16, resolution: int = 512, matmul: int = 8192) -> dict:
    """FLOPs of one released-recipe step's parts at `batch` × `resolution`², counted by
    torch.utils.flop_counter.FlopCounterMode on the step's own calls (the VAE's moments, the text
    encoder, the UNet forward, the backward to the new embedding row), and the fp16 matmul rate
    measured here: {"gflop": {part: …}, "matmul_tflops": …, "floor_ms": {part: …, "step": …}}."""
    from core.guidance.factory import stable_diffusion_parts
    from core.guidance.sd import vae_moments
    from core.models.cache import PRIORS
    from core.params import load_params
    from core.perf import gflop_of as count, matmul_tflops

    PRIORS.clear()
    p = load_params("magic123", [f"device={device.type}", f"sd.model={folder}"])
    parts = stable_diffusion_parts(p, device)
    tok, te, vae, unet = parts.tokenizer, parts.text_encoder, parts.vae, parts.unet
    udtype = next(unet.parameters()).dtype
    g = torch.Generator(device).manual_seed(0)
    images = torch.rand(batch, 3, resolution, resolution, device=device, generator=g)
    ids = tok(["a photo of a object"] * batch, padding="max_length", max_length=tok.model_max_length,
              return_tensors="pt").input_ids.to(device)
    te.get_input_embeddings().weight.requires_grad_(True)  # as learn_token: the table trains, one row kept
    t = torch.randint(0, 1000, (batch,), device=device, generator=g)

    out = {}
    with torch.no_grad():
        out["vae_encode"] = count(lambda: vae_moments(vae, images))
        latents = vae_moments(vae, images)[0].float() * vae.config.scaling_factor
    box = {}
    out["text_encoder"] = count(lambda: box.update(states=te(ids)[0].to(udtype)))
    noisy = latents.to(udtype)
    out["unet"] = count(lambda: box.update(pred=unet(noisy, t, encoder_hidden_states=box["states"]).sample))
    loss = box["pred"].float().square().mean()
    out["backward"] = count(loss.backward)
    te.get_input_embeddings().weight.requires_grad_(False)
    tflops = matmul_tflops(device, matmul)
    floor = {k: float(f"{v / tflops:.4g}") for k, v in out.items()}  # GFLOP / (TFLOP/s) = ms
    floor["step"] = float(f"{sum(floor.values()):.4g}")
    del parts
    PRIORS.clear()
    return {"batch": batch, "resolution": resolution, "gflop": {k: float(f"{v:.6g}") for k, v in out.items()},
            "matmul_tflops": tflops, "floor_ms": floor}


# "graph": textual_inversion.compile=graphs's replays (encoder to backward in one CUDA graph)
PARTS = ("augment", "vae_encode", "text_encoder", "unet", "backward", "graph", "optimizer")


def plot(result: dict, png: Path) -> Path:
    """Stacked bars: each variant's step split into its parts, with the free-running steady step as a
    black tick. Left: each part timed with the device synchronised around it (the host's and the
    device's time together; parts made on a thread of their own overlap the others there). Right,
    where the variant was profiled: the device's kernel time a step by part (perf.kernel_ms_by_scope)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {k: v for k, v in result["variants"].items() if "scopes_ms_per_step" in v}
    panels = [("scopes_ms_per_step", "device synchronised around each part")]
    if any("kernel_ms_by_scope" in v for v in runs.values()):
        panels.append(("kernel_ms_by_scope", "the device's kernel time by part (profiled)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(1.6 + (1.9 * len(runs) + 1.2) * len(panels), 4.4),
                             sharey=True, squeeze=False)
    floor = result.get("flops", {}).get("floor_ms", {}).get("step")
    for ax, (key, title) in zip(axes[0], panels):
        for i, (name, v) in enumerate(runs.items()):
            bottom = 0.0
            for j, part in enumerate(PARTS):
                ms = float(v.get(key, {}).get(part, 0.0))
                ax.bar(i, ms, bottom=bottom, color=f"C{j}", label=part if i == 0 else None, width=0.6)
                bottom += ms
            ax.plot([i - 0.35, i + 0.35], [v["ms_per_step_steady"]] * 2, color="black", lw=2,
                    label="step, free-running (median)" if i == 0 else None)
        if floor:
            ax.axhline(floor, color="grey", ls="--", lw=1,
                       label=f"floor: the step's FLOPs at {result['flops']['matmul_tflops']:.0f} TFLOP/s")
        ax.set_xticks(range(len(runs)), [n.replace("+", "+\n") for n in runs], fontsize=8)
        ax.set_title(title, fontsize=8)
    axes[0][0].set_ylabel("ms per step (batch 16, 512²)")
    fig.suptitle(f"textual inversion's step by variant — {result.get('gpu', '')}", fontsize=9)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plot", nargs=2, type=Path, metavar=("FILE.json", "OUT.png"),
                    help="only draw FILE.json's variants into OUT.png")
    ap.add_argument("--plot-clocks", nargs=2, type=Path, metavar=("CLOCKS.csv", "OUT.png"),
                    help="only draw a --clocks log (nvidia-smi's CSV) into OUT.png")
    ap.add_argument("--clocks", action="store_true",
                    help="keep nvidia-smi's samples of each variant's run, to OUT_clocks_NAME.csv")
    ap.add_argument("--models-dir", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--scoped-steps", type=int, default=8)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE,…")
    ap.add_argument("--flops", action="store_true", help="also count the step's FLOPs and write its floor")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also torch.profiler's table of N steps of each variant, to OUT_profile_NAME.txt")
    a = ap.parse_args(argv)
    drawn = ((a.plot, lambda src, png: plot(json.loads(src.read_text()), png)) if a.plot
             else (a.plot_clocks, plot_clocks) if a.plot_clocks else None)
    if drawn is not None:  # only a drawing of a saved result or clock log
        (src, png), draw = drawn
        if not src.is_file():
            print(f"ti_speed.py: {src} not found", file=sys.stderr)
            return 2
        print(f"wrote {draw(src, png)}")
        return 0
    if a.models_dir is None or a.out is None:
        print("ti_speed.py: --models-dir and --out are needed (or --plot FILE.json OUT.png, --plot-clocks CSV OUT.png)",
              file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("ti_speed.py: needs a CUDA device", file=sys.stderr)
        return 2
    if a.steps < 6:
        print("ti_speed.py: --steps must be at least 6", file=sys.stderr)
        return 2
    variants = dict(DEFAULT_VARIANTS)
    if a.variant:
        variants = {v.split("=", 1)[0]: [s for s in v.split("=", 1)[1].split(",") if s] if "=" in v else []
                    for v in a.variant}
    from core.testmodels.fullsize_priors import write_fullsize_priors

    device = torch.device("cuda")
    folder = write_fullsize_priors(a.models_dir, device)["sd"]
    result = {"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__, "variants": {}}
    if a.flops:
        result["flops"] = step_flops(folder, device)
        print("flops", json.dumps(result["flops"]), flush=True)
    for name, sets in variants.items():
        try:
            tag = name.replace('+', '_')
            result["variants"][name] = time_variant(sets, folder, a.steps, a.scoped_steps, device, a.profile,
                                                    a.out.with_name(f"{a.out.stem}_profile_{tag}.txt"),
                                                    a.out.with_name(f"{a.out.stem}_clocks_{tag}.csv") if a.clocks else None)
        except Exception as e:  # noqa: BLE001 - a variant that fails is a finding; the others still run
            result["variants"][name] = {"sets": sets, "failed": f"{type(e).__name__}: {str(e)[:400]}"}
        print(name, json.dumps(result["variants"][name]), flush=True)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {plot(result, a.out.with_suffix('.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
