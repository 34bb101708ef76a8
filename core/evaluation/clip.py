"""CLIP through open_clip: one loader for the stage detector (Consistent123 eq. 5) and the
CLIP-similarity metric (Magic123 / Consistent123 evaluation).

A model is named the way open_clip names it: an architecture (`ViT-L-14`) plus `pretrained`, which is
either a hub tag (`laion2b_s32b_b82k`, fetched into the hub cache) or a local checkpoint file. The
architecture may also be a path to a model-config JSON (registered with `open_clip.add_model_config`,
its file stem becomes the name) or an `hf-hub:` / `local-dir:` identifier. Loading is always
`open_clip.create_model_and_transforms`; a model that cannot be found gives one ModelNotFoundError.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from core.errors import ModelNotFoundError

log = logging.getLogger(__name__)

_LOADED: dict[tuple, "ClipModel"] = {}


@dataclass
class ClipModel:
    model: torch.nn.Module
    tokenizer: object
    image_size: int
    mean: torch.Tensor  # (3,)
    std: torch.Tensor  # (3,)
    name: str
    pretrained: Optional[str]
    device: torch.device

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images (B,3,H,W) in [0,1] → unit-norm embeddings (B,D)."""
        x = images.to(self.device, torch.float32)
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic",
                          align_corners=False, antialias=True).clamp(0.0, 1.0)
        x = (x - self.mean.view(1, 3, 1, 1)) / self.std.view(1, 3, 1, 1)
        return F.normalize(self.model.encode_image(x).float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """texts → unit-norm embeddings (B,D)."""
        tokens = self.tokenizer(texts).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)


def _normalize_from_transforms(preprocess) -> tuple[torch.Tensor, torch.Tensor]:
    for t in getattr(preprocess, "transforms", []):
        if t.__class__.__name__ == "Normalize":
            return torch.tensor(t.mean, dtype=torch.float32), torch.tensor(t.std, dtype=torch.float32)
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return torch.tensor(OPENAI_DATASET_MEAN), torch.tensor(OPENAI_DATASET_STD)


def _help(name: str, pretrained: Optional[str]) -> str:
    return (
        f"CLIP model '{name}' with weights '{pretrained}' could not be loaded: it is not in the model cache "
        "and cannot be downloaded. Provide it by pointing HF_HOME (or models.cache_dir) at a cache that holds "
        "it, or set the '*.clip_pretrained' parameter to a local open_clip checkpoint file "
        "(and '*.clip_model' to its architecture name or config JSON)."
    )


def _cached_weights(cfg: dict, cache_dir: Optional[str]) -> Optional[str]:
    """The file open_clip would download for a pretrained tag, if it is already cached."""
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo, fname = os.path.split(cfg["hf_hub"].rstrip("/")) if cfg["hf_hub"].count("/") > 1 else (cfg["hf_hub"].rstrip("/"), "")
        names = [fname] if fname else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if fname.endswith((".bin", ".pth")):
            names.insert(0, fname[:-4] + ".safetensors")
        for n in names:
            hit = try_to_load_from_cache(repo, n, cache_dir=cache_dir)
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit
    if cfg.get("url"):
        root = cache_dir or os.path.expanduser("~/.cache/clip")
        f = os.path.join(root, os.path.basename(cfg["url"]))
        if os.path.isfile(f):
            return f
    return None


def load_clip(
    name: str,
    pretrained: Optional[str],
    device: torch.device | str = "cpu",
    cache_dir: Optional[str] = None,
    offline: bool = False,
) -> ClipModel:
    """open_clip's `create_model_and_transforms(name, pretrained=tag or file)`; cached per process."""
    import open_clip

    device = torch.device(device)
    key = (name, pretrained, str(device), cache_dir)
    if key in _LOADED:
        return _LOADED[key]
    arch = name
    if name.endswith(".json"):
        cfg = Path(name)
        if not cfg.is_file():
            raise ModelNotFoundError(f"CLIP model config '{name}' does not exist")
        open_clip.add_model_config(cfg)
        arch = cfg.stem
    tag_cfg = None
    if pretrained and not Path(pretrained).is_file():
        if os.sep in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors", ".pth")):
            raise ModelNotFoundError(f"CLIP checkpoint file '{pretrained}' does not exist. {_help(name, pretrained)}")
        tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained) or None
        if offline and tag_cfg:
            # huggingface_hub reads HF_HUB_OFFLINE at import, so look in the cache ourselves and hand
            # open_clip the cached file (the tag's preprocessing is applied below)
            cached = _cached_weights(tag_cfg, cache_dir)
            if cached is None:
                raise ModelNotFoundError(f"{_help(name, pretrained)} (offline: not in the cache)")
            load_from = cached
        else:
            load_from = pretrained
    else:
        load_from = pretrained
    prev = os.environ.get("HF_HUB_OFFLINE")
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=load_from, device=device, cache_dir=cache_dir
        )
        tokenizer = open_clip.get_tokenizer(arch, cache_dir=cache_dir)
    except ModelNotFoundError:
        raise
    except Exception as e:  # download failures, unknown tags, missing cache entries
        raise ModelNotFoundError(f"{_help(name, pretrained)} ({type(e).__name__}: {str(e)[:200]})") from e
    finally:
        if offline:
            if prev is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
            else:
                os.environ["HF_HUB_OFFLINE"] = prev
    model.eval()
    size = model.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    mean, std = _normalize_from_transforms(preprocess)
    if tag_cfg and "mean" in tag_cfg:
        mean, std = torch.tensor(tag_cfg["mean"], dtype=torch.float32), torch.tensor(tag_cfg["std"], dtype=torch.float32)
    clip = ClipModel(model, tokenizer, size, mean.to(device), std.to(device), name, pretrained, device)
    log.info("CLIP: loaded %s (%s) via open_clip", name, pretrained)
    _LOADED[key] = clip
    return clip


def clip_from_params(params, which: str, device: torch.device | str = "cpu") -> ClipModel:
    """The CLIP named in params.<which> ('detector' or 'evaluate'), as core.models.sources resolves it."""
    from core.models.sources import clip_model

    name, pretrained = clip_model(params, which)
    models = params.models
    return load_clip(name, pretrained, device, models.cache_dir,
                     models.offline or os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"})
