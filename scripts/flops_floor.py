"""The arithmetic floor of the speed targets (issue 15): FLOPs of one textual-inversion step at the
released recipe and of one guided SDS step, counted on the full-size architectures (random weights,
on the meta device: no memory, no GPU) with torch.utils.flop_counter (matmuls and convolutions),
and the time they take at a given fraction of a card's dense fp16 peak.

    python scripts/flops_floor.py --out reports/speed/flops_floor.json [--peak-tflops 989 --batch 16]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def count_tflops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops() / 1e12


def step_tflops(batch: int = 16, ti_resolution: int = 512, sd_resolution: int = 512, zero123_resolution: int = 256,
                sd_arch: str = "sd15") -> dict[str, float]:
    """TFLOPs per part: textual inversion's step (VAE encode of `batch` augmented views, the UNet's
    forward and input-gradient backward) and a guided coarse step's priors (SD UNet with CFG, the VAE
    encoder's forward and backward through the render, Zero-1-to-3's UNet with CFG)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from core.testmodels.fullsize_priors import _cfg

    h = torch.half
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(_cfg("sd15_vae.json")).to(h).requires_grad_(False)
        unet = UNet2DConditionModel.from_config(_cfg(f"{sd_arch}_unet.json")).to(h).requires_grad_(False)
        zunet = UNet2DConditionModel.from_config(_cfg("zero123_unet.json")).to(h).requires_grad_(False)
        ctx = unet.config.cross_attention_dim
        s_ti, s_sd, s_z = ti_resolution // 8, sd_resolution // 8, zero123_resolution // 8
        out: dict[str, float] = {}
        views = torch.randn(batch, 3, ti_resolution, ti_resolution, dtype=h)
        out["ti_vae_encode"] = count_tflops(lambda: vae.encode(views).latent_dist.mean)
        lat = torch.randn(batch, 4, s_ti, s_ti, dtype=h)
        text = torch.randn(batch, 77, ctx, dtype=h, requires_grad=True)  # the trained row reaches the UNet here

        def ti_unet():
            unet(lat, torch.randint(0, 1000, (batch,)), encoder_hidden_states=text).sample.float().pow(2).mean().backward()

        out["ti_unet_forward_backward"] = count_tflops(ti_unet)
        out["sds_sd_unet_cfg"] = count_tflops(lambda: unet(
            torch.randn(2, 4, s_sd, s_sd, dtype=h), torch.tensor([500, 500]),
            encoder_hidden_states=torch.randn(2, 77, ctx, dtype=h)).sample)
        render = torch.randn(1, 3, sd_resolution, sd_resolution, dtype=h, requires_grad=True)
        out["sds_vae_encode_forward_backward"] = count_tflops(
            lambda: vae.encode(render).latent_dist.mean.float().sum().backward())
        out["sds_zero123_unet_cfg"] = count_tflops(lambda: zunet(
            torch.randn(2, 8, s_z, s_z, dtype=h), torch.tensor([500, 500]),
            encoder_hidden_states=torch.randn(2, 1, 768, dtype=h)).sample)
    out["ti_step"] = out["ti_vae_encode"] + out["ti_unet_forward_backward"]
    out["sds_step_both_priors"] = out["sds_sd_unet_cfg"] + out["sds_vae_encode_forward_backward"] + out["sds_zero123_unet_cfg"]
    return out


def floors(tf: dict[str, float], peak_tflops: float, ti_steps: int, guided_steps: int,
           fractions=(1.0, 0.5, 0.25)) -> dict[str, dict[str, float]]:
    """Seconds for the whole textual inversion and for the priors' share of the guided steps, at
    each fraction of the peak."""
    return {f"{int(f * 100)}%_of_peak": {
        "ti_ms_per_step": round(1000 * tf["ti_step"] / (peak_tflops * f), 1),
        "ti_total_s": round(ti_steps * tf["ti_step"] / (peak_tflops * f), 1),
        "sds_ms_per_step": round(1000 * tf["sds_step_both_priors"] / (peak_tflops * f), 2),
        "sds_total_s": round(guided_steps * tf["sds_step_both_priors"] / (peak_tflops * f), 1)} for f in fractions}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense fp16 peak (H100/H200 SXM: 989)")
    ap.add_argument("--batch", type=int, default=16, help="textual inversion's batch (released: 16)")
    ap.add_argument("--ti-steps", type=int, default=3000)
    ap.add_argument("--guided-steps", type=int, default=7500,
                    help="guided steps of an asset (magic123: 3/4 of 5,000 coarse + 5,000 fine)")
    args = ap.parse_args(argv)
    tf = step_tflops(args.batch)
    result = {"tflops": {k: round(v, 3) for k, v in tf.items()}, "peak_tflops": args.peak_tflops,
              "batch": args.batch, "ti_steps": args.ti_steps, "guided_steps": args.guided_steps,
              "floors": floors(tf, args.peak_tflops, args.ti_steps, args.guided_steps)}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
