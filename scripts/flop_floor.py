"""The priors' floating-point work in each stage of a magic123 asset, and the time it cannot go below.

    python scripts/flop_floor.py                       # the H200's rate measured in session 18
    python scripts/flop_floor.py --tflops 312 --out reports/speed/flop_floor_a100.json

Counts, with torch.utils.flop_counter on the full-size architectures built on the meta device (no
weights, no GPU, a few seconds), the matmuls, convolutions and attention of:
  * one textual-inversion step at the released recipe (core.guidance.textual_inversion: batch 16 at
    512²): the VAE encoder forward, the text encoder, the UNet forward, the backward to the prompt
    states (the UNet frozen: activation gradients only);
  * one guided iteration (core.guidance.sd / zero123): Stable Diffusion's UNet on the noisy latent
    and its classifier-free twin (batch 2 at 64²), the VAE encoder forward and backward at 512² (SDS
    differentiates the render through it, eq. 5 of Magic123); Zero-1-to-3's the same at 32² / 256²
    with the reference latent concatenated (8 input channels).
On the meta device attention is counted as the math path's matmuls; on a GPU as its fused kernels'
formulas (ti_speed.py --flops): the textual inversion's backward comes out 6% lower here. Each
part's floor is its FLOPs at `--tflops` (the default, 748.6, is a large fp16 matmul on the
H200 of session 18, `scripts/ti_speed.py --flops`); a stage's floor is its steps or guided
iterations (iters − ref_warmup of the preset) times that. The NeRF, the mesh and the elementwise
work are not counted: the floor is the priors' alone.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.perf import gflop_of  # noqa: E402

H200_FP16_MATMUL_TFLOPS = 748.6  # reports/speed/h200_ti_compile_s18.json: an 8192² fp16 matmul


def _encoder_forward_backward(vae, size: int) -> float:
    """GFLOP of one VAE encode of a render at size², forward and backward to the image."""
    img = torch.randn(1, 3, size, size, device="meta", dtype=torch.float16, requires_grad=True)
    box = {}
    fwd = gflop_of(lambda: box.update(m=vae.encode(img).latent_dist.mean))
    return fwd + gflop_of(lambda: box["m"].float().sum().backward())


def count_gflop(sd_arch: str = "sd15", batch: int = 16, ti_resolution: int = 512, sd_resolution: int = 512,
                zero123_resolution: int = 256) -> dict:
    """{"textual_inversion_step": {part: GFLOP}, "guided_iteration": {part: GFLOP}}."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from core.testmodels.fullsize_priors import _cfg

    half = lambda m: m.half().requires_grad_(False)  # noqa: E731
    with torch.device("meta"):
        unet = half(UNet2DConditionModel.from_config(_cfg(f"{sd_arch}_unet.json")))
        vae = half(AutoencoderKL.from_config(_cfg("sd15_vae.json")))
        zunet = half(UNet2DConditionModel.from_config(_cfg("zero123_unet.json")))
        text = CLIPTextModel(CLIPTextConfig(**_cfg(f"{sd_arch}_text_encoder.json"))).requires_grad_(False)
    width = unet.config.cross_attention_dim
    ti = {}
    img = torch.randn(batch, 3, ti_resolution, ti_resolution, device="meta", dtype=torch.float16)
    ti["vae_encode"] = gflop_of(lambda: vae.encode(img).latent_dist.mean)
    ids = torch.zeros(batch, 77, dtype=torch.long, device="meta")
    text.get_input_embeddings().weight.requires_grad_(True)  # the table trains (one row kept), as in learn_token
    box = {}
    ti["text_encoder"] = gflop_of(lambda: box.update(s=text(ids)[0].half()))
    lat = ti_resolution // 8
    x = torch.randn(batch, 4, lat, lat, device="meta", dtype=torch.float16)
    t = torch.zeros(batch, dtype=torch.long, device="meta")
    ti["unet"] = gflop_of(lambda: box.update(p=unet(x, t, encoder_hidden_states=box["s"]).sample))
    ti["backward"] = gflop_of(lambda: box["p"].float().square().mean().backward())

    it = {}
    lat = sd_resolution // 8
    x2, t2 = torch.randn(2, 4, lat, lat, device="meta", dtype=torch.float16), torch.zeros(2, dtype=torch.long, device="meta")
    cond = torch.randn(2, 77, width, device="meta", dtype=torch.float16)
    it["sd_unet_cfg"] = gflop_of(lambda: unet(x2, t2, encoder_hidden_states=cond).sample)
    it["sd_vae_encode_fwd_bwd"] = _encoder_forward_backward(vae, sd_resolution)
    zl = zero123_resolution // 8
    zx = torch.randn(2, zunet.config.in_channels, zl, zl, device="meta", dtype=torch.float16)
    zc = torch.randn(2, 1, zunet.config.cross_attention_dim, device="meta", dtype=torch.float16)
    it["zero123_unet_cfg"] = gflop_of(lambda: zunet(zx, t2, encoder_hidden_states=zc).sample)
    it["zero123_vae_encode_fwd_bwd"] = _encoder_forward_backward(vae, zero123_resolution)
    return {"textual_inversion_step": ti, "guided_iteration": it}


def floors(gflop: dict, tflops: float, params) -> dict:
    """Each part's and each stage's floor in ms / s at `tflops` for the counts of `params`."""
    ms = {k: {p: v / tflops for p, v in parts.items()} for k, parts in gflop.items()}
    step, it = sum(ms["textual_inversion_step"].values()), sum(ms["guided_iteration"].values())
    stages = {"textual_inversion": {"count": params.textual_inversion.steps, "ms_each": step}}
    for name in ("coarse", "fine"):
        st = getattr(params, name)
        stages[name] = {"count": max(0, st.iters - st.ref_warmup), "ms_each": it}
    for v in stages.values():
        v["seconds"] = v["count"] * v["ms_each"] / 1000
    return {"ms": ms, "stages": stages}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tflops", type=float, default=H200_FP16_MATMUL_TFLOPS,
                    help=f"the card's fp16 matmul rate (default {H200_FP16_MATMUL_TFLOPS}: an H200, session 18)")
    ap.add_argument("--preset", default="magic123")
    ap.add_argument("--out", type=Path, help="JSON file to write")
    a = ap.parse_args(argv)
    if a.tflops <= 0:
        print("flop_floor.py: --tflops must be positive", file=sys.stderr)
        return 2
    from core.params import load_params

    p = load_params(a.preset)
    gflop = count_gflop(sd_resolution=p.sd.resolution, zero123_resolution=p.zero123.resolution,
                        batch=p.textual_inversion.batch_size, ti_resolution=p.sd.resolution)
    f = floors(gflop, a.tflops, p)
    print(f"the priors' floor at {a.tflops:g} TFLOP/s ({a.preset})")
    for k, parts in gflop.items():
        print(f"  {k}: " + ", ".join(f"{n} {v:,.0f} GFLOP = {f['ms'][k][n]:.2f} ms" for n, v in parts.items()))
    for name, v in f["stages"].items():
        print(f"  {name}: {v['count']:,} × {v['ms_each']:.2f} ms = {v['seconds']:.0f} s")
    total = sum(v["seconds"] for v in f["stages"].values())
    print(f"  asset: {total:.0f} s ({total / 60:.1f} min) of prior FLOPs, with nothing else")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"preset": a.preset, "tflops": a.tflops, "gflop": gflop, **f,
                                     "asset_seconds": total}, indent=1))
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
