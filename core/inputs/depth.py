"""Reference-view depth: MiDaS / DPT through transformers, or a given depth map used as is.

The papers use MiDaS DPT-BEiT-Large-512 (`Intel/dpt-beit-large-512`). DPT predicts relative inverse
depth (bigger = nearer); like the authors' preprocessing (and the benchmarks' depth.png files) it is
min–max normalised over the object's mask to [0, 1], 0 outside the mask, stored as 8-bit grey:
brighter is nearer. The model enters through core.models.loader.load_pretrained (hub id or local folder,
cache/offline handling, ModelNotFoundError).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from core.errors import InputError

log = logging.getLogger(__name__)

_LOADED: dict[tuple, tuple] = {}


def load_depth_model(name: str, models_params=None, device: torch.device | str = "cpu"):
    """(DPTForDepthEstimation, DPTImageProcessor) from a hub id or a save_pretrained folder."""
    from transformers import DPTForDepthEstimation, DPTImageProcessor

    from core.models.loader import load_pretrained

    key = (name, str(device), getattr(models_params, "cache_dir", None))
    if key not in _LOADED:
        model = load_pretrained(DPTForDepthEstimation, name, key="depth.model", models_params=models_params)
        processor = load_pretrained(DPTImageProcessor, name, key="depth.model", models_params=models_params)
        _LOADED[key] = (model.to(device).eval(), processor)
    return _LOADED[key]


def depth_model_name(params) -> str:
    from core.models.sources import depth_model

    return depth_model(params)


def normalize_depth(pred: np.ndarray, mask: Optional[np.ndarray]) -> np.ndarray:
    """Min–max over the mask to [0, 1], 0 outside (the authors' preprocessing); bigger = nearer."""
    pred = pred.astype(np.float32)
    m = mask if mask is not None and mask.any() else np.ones_like(pred, dtype=bool)
    lo, hi = float(pred[m].min()), float(pred[m].max())
    out = np.zeros_like(pred)
    if hi > lo:
        out[m] = (pred[m] - lo) / (hi - lo)
    return out


@torch.no_grad()
def estimate_depth(rgba: Image.Image, model, processor, device: torch.device | str = "cpu") -> Image.Image:
    """DPT on the RGBA composited on white → 8-bit depth image of the RGBA's size (brighter = nearer)."""
    rgb = Image.new("RGB", rgba.size, (255, 255, 255))
    rgb.paste(rgba.convert("RGB"), mask=rgba.getchannel("A") if rgba.mode == "RGBA" else None)
    inputs = processor(images=rgb, return_tensors="pt").to(device)
    pred = model(**inputs).predicted_depth  # (1, h, w), relative inverse depth
    pred = F.interpolate(pred[:, None].float(), size=(rgba.size[1], rgba.size[0]), mode="bicubic",
                         align_corners=False)[0, 0].cpu().numpy()
    mask = np.asarray(rgba.getchannel("A")) > 127 if rgba.mode == "RGBA" else None
    d = normalize_depth(pred, mask)
    return Image.fromarray(np.round(d * 255).astype(np.uint8), mode="L")


def depth_for(rgba: Image.Image, params, device: torch.device | str = "cpu") -> Image.Image:
    """Estimate the reference depth of a prepared RGBA with the model params name (tiny in smoke)."""
    model, processor = load_depth_model(depth_model_name(params), params.models, device)
    return estimate_depth(rgba, model, processor, device)


def open_depth(path: Path | str) -> Image.Image:
    """A given depth map, opened as is (its mode and values are kept)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"depth map not found: {path}")
    try:
        im = Image.open(path)
        im.load()
    except Exception as e:
        raise InputError(f"{path} is not a readable depth image ({e})") from e
    return im
