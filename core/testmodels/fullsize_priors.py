"""The real prior architectures at full size with random weights (configs in fullsize/*.json).

They cost exactly what the real weights cost (DESIGN.md, "How we know it works"), so speed and
memory are measured with them. `build_fullsize_parts` builds them in memory; `write_fullsize_priors`
saves them in the hub layout (save_pretrained, fp16 safetensors) so that a whole run loads them
through core.models.loader as it would load the real ones (`--set sd.model=FOLDER`). The prompt
goes through a small stand-in tokenizer (token ids only; the cost is the text encoder's).
"""
from __future__ import annotations

import itertools
import json
import tempfile
from pathlib import Path
from typing import Callable

import torch

FULLSIZE = Path(__file__).resolve().parent / "fullsize"
# "2": the weights seeded (session 28). Version 1's were drawn from an unseeded RNG, so every folder
# written held other weights: three processes with their own folders grew meshes of 105k, 246k and
# 1.13M faces from one photo and one seed, and their stages' paces differed with them.
VERSION = "2"
# the Stable Diffusion architectures the presets name: SD 1.5 (Magic123) and SD 2.1 base
# (Consistent123: an OpenCLIP ViT-H text tower, 1024-wide cross-attention, linear projections)
SD_ARCHS = ("sd15", "sd21base")


def sd_arch_of(model_id: str) -> str:
    """The architecture of a preset's SD model id: sd21base for the SD 2.x ones, else sd15."""
    return "sd21base" if "stable-diffusion-2" in str(model_id) else "sd15"


def _cfg(name: str) -> dict:
    return json.loads((FULLSIZE / name).read_text())


def seeded_module(fn: Callable[[], torch.nn.Module], seed: int, device: torch.device,
                  dtype: torch.dtype) -> torch.nn.Module:
    """fn()'s module built on `device` (much faster than on the CPU) from the RNG seeded with `seed`,
    in `dtype`, frozen, for inference: the same weights every time on one kind of device and torch
    build, so that runs that write their own copies of the priors load the same ones. The caller's
    RNG state is left as it was."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        with torch.device(device):
            m = fn()
    return m.to(device=device, dtype=dtype).eval().requires_grad_(False)


def build_fullsize_parts(device: torch.device, dtype: torch.dtype, sd_arch: str = "sd15"):
    """(StableDiffusionParts, Zero123Parts) of SD (1.5 or 2.1 base) and Zero-1-to-3 at full size,
    random weights, seeded (seeded_module: each part its own seed, in the order below; Zero-1-to-3 XL
    has Zero-1-to-3's architecture)."""
    if sd_arch not in SD_ARCHS:
        raise ValueError(f"sd_arch must be one of {SD_ARCHS}, not {sd_arch!r}")
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig, \
        CLIPVisionModelWithProjection

    from core.guidance.sd import StableDiffusionParts
    from core.guidance.zero123 import CCProjection, Zero123Parts
    from core.testmodels.priors import SD_SCHEDULER, write_tiny_clip_tokenizer

    tok_dir = Path(tempfile.mkdtemp(prefix="lift3d-tok-"))
    write_tiny_clip_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)

    seeds = itertools.count()

    def make(fn: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        return seeded_module(fn, next(seeds), device, dtype)

    sd = StableDiffusionParts(
        tokenizer=tokenizer,
        text_encoder=make(lambda: CLIPTextModel(CLIPTextConfig(**_cfg(f"{sd_arch}_text_encoder.json")))),
        vae=make(lambda: AutoencoderKL.from_config(_cfg("sd15_vae.json"))),
        unet=make(lambda: UNet2DConditionModel.from_config(_cfg(f"{sd_arch}_unet.json"))),
        scheduler=DDPMScheduler(**SD_SCHEDULER),
    )
    z = Zero123Parts(
        image_encoder=make(lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**_cfg("zero123_image_encoder.json")))),
        feature_extractor=CLIPImageProcessor(),
        vae=make(lambda: AutoencoderKL.from_config(_cfg("sd15_vae.json"))),
        unet=make(lambda: UNet2DConditionModel.from_config(_cfg("zero123_unet.json"))),
        cc_projection=make(lambda: CCProjection(**_cfg("zero123_cc_projection.json"))),
        scheduler=DDPMScheduler(**SD_SCHEDULER),
    )
    return sd, z


def write_fullsize_priors(root: Path | str, device: torch.device | str = "cpu",
                          dtype: torch.dtype = torch.float16, sd_arch: str = "sd15") -> dict[str, str]:
    """Save the full-size random priors once under root in the hub layout; {"sd": folder, "zero123": folder}."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    sd_name = "sd" if sd_arch == "sd15" else sd_arch  # sd15 keeps its earlier folder name
    folders = {"sd": root / f"fullsize-{sd_name}-{VERSION}", "zero123": root / f"fullsize-zero123-{VERSION}"}
    missing = {k for k, f in folders.items() if not (f / "model_index.json").is_file()}
    if not missing:
        return {k: str(v) for k, v in folders.items()}
    sd, z = build_fullsize_parts(torch.device(device), dtype, sd_arch)
    for name, parts, index in (
        ("sd", sd, {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                    "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                    "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDPMScheduler"]}),
        ("zero123", z, {"_class_name": "Zero1to3StableDiffusionPipeline",
                        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
                        "feature_extractor": ["transformers", "CLIPImageProcessor"],
                        "cc_projection": ["core.guidance.zero123", "CCProjection"],
                        "scheduler": ["diffusers", "DDPMScheduler"]}),
    ):
        if name not in missing:  # written before (another SD architecture shares Zero-1-to-3's folder)
            continue
        folder = folders[name]
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=root))
        for sub in index:
            if sub.startswith("_"):
                continue
            getattr(parts, sub).save_pretrained(tmp / sub)
        (tmp / "model_index.json").write_text(json.dumps(
            {**index, "_note": "lift3d full-size random weights (core/testmodels/fullsize)"}, indent=1))
        tmp.rename(folder)
    del sd, z
    return {k: str(v) for k, v in folders.items()}


def write_fullsize_clip(root: Path | str, arch: str, dtype: torch.dtype = torch.float16) -> Path:
    """An open_clip model of architecture `arch` (Consistent123's detector: ViT-B-32) with random
    weights, saved once as a checkpoint file under root: with `detector.clip_pretrained` set to it the
    detector loads through core.evaluation.clip.load_clip as the real one would, and costs what it
    costs, on a machine that cannot download the real weights."""
    import open_clip

    path = Path(root) / f"fullsize-clip-{arch}-{VERSION}.pt"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"state_dict": {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}},
               tmp)
    tmp.replace(path)
    return path


def fullsize_judge_overrides(params, root: Path | str) -> list[str]:
    """`--set` overrides that point the judges a run uses during its stages (the Consistent123 detector's
    CLIP) at full-size random weights under root; none when the run has no detector."""
    if not params.detector.enabled:
        return []
    return [f"detector.clip_pretrained={write_fullsize_clip(root, params.detector.clip_model)}"]
