"""Tiny random priors of the real classes, saved in the real on-disk format.

No weights can be downloaded on this project's machines, so tests and the `smoke` preset build
small random models of exactly the classes the real priors use, save them with `save_pretrained`
into folders laid out like the hub repositories, and load them back through `core.models.loader` — the
same code path that loads `runwayml/stable-diffusion-v1-5` or `bennyguo/zero123-diffusers`.

* Stable Diffusion: `unet/` UNet2DConditionModel, `vae/` AutoencoderKL (8× downsampling like the
  real one), `text_encoder/` CLIPTextModel (hidden width 768 like SD 1.5, so the benchmark
  `learned_embeds.bin` tokens load into it; 2 thin layers), `tokenizer/` CLIPTokenizer (a small
  byte-level BPE vocabulary written here: vocab.json + merges.txt), `scheduler/` DDPMScheduler.
* Zero-1-to-3 (the layout of the community `zero1to3` pipeline / bennyguo/zero123-diffusers):
  `unet/` with 8 input channels, `vae/`, `image_encoder/` CLIPVisionModelWithProjection
  (projection 768), `feature_extractor/` CLIPImageProcessor, `cc_projection/` the Linear(768+4 →
  768) that joins the image embedding and the relative camera, `scheduler/`.

`ensure_tiny_models(root)` builds both once per root (atomically, so parallel test workers agree)
and returns their folders.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

TINY_VERSION = "v1"  # bump when the tiny architectures change, so stale caches are rebuilt

# Stable Diffusion 1.x noise schedule (scaled_linear 0.00085 → 0.012, 1000 steps); Zero-1-to-3
# was fine-tuned from SD and keeps it.
SD_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, steps_offset=1, prediction_type="epsilon",
)

_WORDS = (
    "a photo of the an object high resolution dslr image rendering cropped clean dirty dark bright "
    "small large nice weird cool good close up one chair teapot bear toy white background"
).split()


# --------------------------------------------------------------------------------------- tokenizer
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte ↔ printable-unicode table (the standard construction)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_tiny_clip_tokenizer(folder: Path) -> Path:
    """A small CLIP BPE tokenizer: the 256 byte symbols (plain and word-final '</w>'), merges that
    build the words of the prompt templates, and the start/end tokens. Saved as vocab.json +
    merges.txt, then re-saved through CLIPTokenizer.save_pretrained."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    seen = set(vocab_list)
    for word in _WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        cur = parts[0]
        for nxt in parts[1:]:
            merges.append(f"{cur} {nxt}")
            cur = cur + nxt
            if cur not in seen:
                vocab_list.append(cur)
                seen.add(cur)
    merges = list(dict.fromkeys(merges))
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=77)
    tok.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------- builders
def _tiny_vae():
    from diffusers import AutoencoderKL

    # four blocks → 8× downsampling, like SD's VAE (512² image ↔ 64² latent)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=64,
        scaling_factor=0.18215,
    )


def _tiny_unet(in_channels: int, cross_attention_dim: int, sample_size: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4,
    )


def write_tiny_text_encoder(folder: Path, seed: int = 0, text_width: int = 768) -> None:
    """tokenizer/ and text_encoder/ of the tiny Stable Diffusion (the RNG seeded with `seed` first)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    write_tiny_clip_tokenizer(folder / "tokenizer")
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text_cfg = CLIPTextConfig(
        vocab_size=len(tok), hidden_size=text_width, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=text_width,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    CLIPTextModel(text_cfg).save_pretrained(folder / "text_encoder")


def build_tiny_sd(folder: Path, seed: int = 0, text_width: int = 768) -> Path:
    """A tiny random Stable Diffusion in the hub layout, saved with save_pretrained."""
    from diffusers import DDPMScheduler

    folder = Path(folder)
    write_tiny_text_encoder(folder, seed, text_width)
    _tiny_vae().save_pretrained(folder / "vae")
    _tiny_unet(4, text_width, 8).save_pretrained(folder / "unet")
    DDPMScheduler(**SD_SCHEDULER).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_note": "lift3d tiny random model",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }, indent=1))
    return folder


def write_tiny_image_encoder(folder: Path, seed: int = 0) -> None:
    """image_encoder/ and feature_extractor/ of the tiny Zero-1-to-3 (the RNG seeded with seed + 1 first)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = Path(folder)
    torch.manual_seed(seed + 1)
    vis_cfg = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8, projection_dim=768,
    )
    CLIPVisionModelWithProjection(vis_cfg).save_pretrained(folder / "image_encoder")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder / "feature_extractor")


def build_tiny_zero123(folder: Path, seed: int = 0) -> Path:
    """A tiny random Zero-1-to-3 in the diffusers layout of bennyguo/zero123-diffusers."""
    from diffusers import DDPMScheduler

    from core.guidance.zero123 import CCProjection

    folder = Path(folder)
    write_tiny_image_encoder(folder, seed)
    _tiny_vae().save_pretrained(folder / "vae")
    _tiny_unet(8, 768, 4).save_pretrained(folder / "unet")
    CCProjection(in_channel=768 + 4, out_channel=768).save_pretrained(folder / "cc_projection")
    DDPMScheduler(**SD_SCHEDULER).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "Zero1to3StableDiffusionPipeline", "_note": "lift3d tiny random model",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "cc_projection": ["core.guidance.zero123", "CCProjection"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }, indent=1))
    return folder


def _build_once(root: Path, name: str, builder) -> Path:
    final = root / f"{name}-{TINY_VERSION}"
    if (final / "model_index.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        builder(tmp)
        try:
            os.rename(tmp, final)  # atomic; another worker may have won the race
        except OSError:
            if not (final / "model_index.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def ensure_tiny_models(root: Path | str) -> dict[str, str]:
    """Build (once) and return {"sd": folder, "zero123": folder} of the tiny random priors."""
    root = Path(root).expanduser()
    return {
        "sd": str(_build_once(root, "tiny-sd", build_tiny_sd)),
        "zero123": str(_build_once(root, "tiny-zero123", build_tiny_zero123)),
    }
