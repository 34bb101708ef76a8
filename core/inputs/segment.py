"""Segmentation and framing of the input photo (the papers' preprocessing).

Magic123 and Consistent123 take an RGBA image whose object is cut out (rembg, U²-Net), recentred,
and scaled so that its bounding box spans a fixed fraction of a square frame (the authors'
`preprocess_image.py`: border ratio 0.2 → `object_scale` 0.8). An input that already has an alpha
channel keeps it (rembg is not called), unless that alpha is fully opaque. Photos are opened by
core.inputs.images.open_image (EXIF orientation applied) and brought to 8 bits (`eight_bit`).

Huge photos stay small in memory: JPEGs are decoded at reduced size (`Image.draft`), anything over
`max_input_pixels` is shrunk right after decoding, rembg sees a copy of at most `_SEG_MAX_SIDE`
pixels (it works at 320×320 anyway), and framing crops the object's box before resizing, all in
8-bit PIL images.
"""
from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from core.errors import InputError, ModelNotFoundError
from core.inputs.photo import eight_bit, has_alpha, open_image

log = logging.getLogger(__name__)

_SEG_MAX_SIDE = 1024
_ALPHA_THRESHOLD = 127  # mask.png = alpha > 127
_env_lock = threading.Lock()
_SESSIONS: dict[str, object] = {}


@dataclass
class Framing:
    """The crop box (in working-image pixels), the scale applied to it and where it is pasted."""

    box: tuple[int, int, int, int]  # left, top, right, bottom
    scaled: tuple[int, int]  # size of the crop after scaling
    offset: tuple[int, int]  # paste position in the output square
    size: int  # output side
    work_size: tuple[int, int]  # the (possibly downscaled) working image size the box refers to


@dataclass
class Segmented:
    rgba: Image.Image  # RGBA, size×size, object framed
    mask: Image.Image  # L, {0,255}
    framing: Optional[Framing]  # None when recentring is off
    used_input_alpha: bool
    source_size: tuple[int, int]  # the photo's original size


# --------------------------------------------------------------------------------------------- rembg
@contextmanager
def _rembg_home(folder: Path):
    """rembg accepts a custom model only from inside its model home (U2NET_HOME); point it at the
    model's own folder while the session is created."""
    with _env_lock:
        prev = os.environ.get("U2NET_HOME")
        os.environ["U2NET_HOME"] = str(folder)
        try:
            yield
        finally:
            if prev is None:
                os.environ.pop("U2NET_HOME", None)
            else:
                os.environ["U2NET_HOME"] = prev


def _missing(model: str, detail: str = "") -> ModelNotFoundError:
    return ModelNotFoundError(
        f"segmentation model '{model}' is not available{(' (' + detail + ')') if detail else ''}. "
        f"Put {model}.onnx into $U2NET_HOME (or rembg's folder ~/.rembg/models/{model}/) — rembg's release "
        "page has it — or set "
        "segment.model to the path of a U²-Net-style .onnx file. Inputs that already have an alpha "
        "channel need no segmentation model."
    )


def rembg_session(model: str, offline: bool = False):
    """A rembg session for a model name (u2net, isnet-general-use, …) or a path to a custom .onnx."""
    if model in _SESSIONS:
        return _SESSIONS[model]
    from rembg import new_session
    from rembg.sessions import sessions_class

    if model.endswith(".onnx") or os.sep in model:
        path = Path(model).expanduser().resolve()
        if not path.is_file():
            raise _missing(model, f"no file {path}")
        with _rembg_home(path.parent):
            session = new_session("u2net_custom", model_path=str(path))
    else:
        cls = next((c for c in sessions_class if c.name() == model), None)
        if cls is None:
            raise ModelNotFoundError(f"segment.model '{model}' is neither a rembg model name nor an .onnx path")
        if cls.resolve_existing(f"{model}.onnx") is None and (offline or os.environ.get("HF_HUB_OFFLINE") == "1"):
            raise _missing(model, "offline and not in the model folder")
        try:
            session = new_session(model)
        except Exception as e:  # rembg downloads a missing model with pooch; offline that fails
            raise _missing(model, f"{type(e).__name__}: {str(e)[:160]}") from e
    _SESSIONS[model] = session
    return session


def rembg_mask(im: Image.Image, session) -> Image.Image:
    """rembg's own `remove(..., only_mask=True)` on a copy of at most _SEG_MAX_SIDE pixels; the mask
    comes back at the image's size."""
    from rembg import remove

    small = im.convert("RGB")
    if max(small.size) > _SEG_MAX_SIDE:
        small = small.copy()
        small.thumbnail((_SEG_MAX_SIDE, _SEG_MAX_SIDE), Image.Resampling.LANCZOS)
    mask = remove(small, session=session, only_mask=True)
    if not isinstance(mask, Image.Image):
        mask = Image.fromarray(np.asarray(mask))
    return mask.convert("L").resize(im.size, Image.Resampling.BILINEAR)


# ------------------------------------------------------------------------------------------ framing
def _binary(alpha: Image.Image) -> Image.Image:
    return alpha.point(lambda v: 255 if v > _ALPHA_THRESHOLD else 0)


def object_framing(alpha: Image.Image, size: int, object_scale: float) -> Framing:
    """The object's bounding box (alpha > 127) → scaled so its longer side is object_scale·size,
    centred in a size×size frame (Magic123's preprocessing, border ratio 1 − object_scale)."""
    box = _binary(alpha).getbbox()  # PIL, no big arrays
    if box is None:
        raise InputError("no foreground: the alpha/mask is empty (nothing to reconstruct)")
    l, t, r, b = box
    bw, bh = r - l, b - t
    s = object_scale * size / max(bw, bh)
    sw, sh = max(1, round(bw * s)), max(1, round(bh * s))
    return Framing((l, t, r, b), (sw, sh), ((size - sw) // 2, (size - sh) // 2), size, alpha.size)


def apply_framing(im: Image.Image, fr: Framing, fill=0, resample=Image.Resampling.LANCZOS) -> Image.Image:
    """Crop, scale and paste any image of the working image's geometry (the RGBA, a given depth map
    in its own mode, …) the way `fr` says; image of another size is first resized to the working size."""
    if im.size != fr.work_size:
        im = im.resize(fr.work_size, resample)
    crop = im.crop(fr.box).resize(fr.scaled, resample)
    out = Image.new(im.mode, (fr.size, fr.size), fill)
    out.paste(crop, fr.offset)
    return out


# ------------------------------------------------------------------------------------------ segment
def segment_image(image: Path | str | Image.Image, params=None, **kwargs) -> Image.Image:
    """Photo → the framed RGBA image only (what core.inputs.images.load_reference asks for); see `segment`."""
    return segment(image, params, **kwargs).rgba


def segment(
    image: Path | str | Image.Image,
    params=None,
    *,
    model: Optional[str] = None,
    size: Optional[int] = None,
    object_scale: Optional[float] = None,
    recenter: Optional[bool] = None,
    max_input_pixels: Optional[int] = None,
    offline: bool = False,
) -> Segmented:
    """Photo → framed RGBA + mask. `params` is the whole Params (segment section and models.tiny used);
    keyword arguments override it."""
    seg = params.segment if params is not None else None
    model = model or (seg.model if seg else "u2net")
    if params is not None:
        from core.models.sources import segment_model

        model = segment_model(params, model)
    size = size or (seg.size if seg else 512)
    object_scale = object_scale or (seg.object_scale if seg else 0.8)
    recenter = recenter if recenter is not None else (seg.recenter if seg else True)
    max_input_pixels = max_input_pixels or (seg.max_input_pixels if seg else 4096 * 4096)
    offline = offline or (params.models.offline if params is not None else False)

    if isinstance(image, Image.Image):
        im, orig, name = image, image.size, ""
    else:
        im, orig = open_image(image, max_input_pixels)
        name = Path(image).name
    im = eight_bit(im)

    used_alpha = has_alpha(im, name)
    if used_alpha:
        rgba = im if im.mode == "RGBA" else im.convert("RGBA")
    else:
        rgb = im.convert("RGB")
        alpha = rembg_mask(rgb, rembg_session(model, offline))
        rgba = rgb.convert("RGBA")
        rgba.putalpha(alpha)
        del rgb
    del im
    alpha = rgba.getchannel("A")
    if recenter:
        fr = object_framing(alpha, size, object_scale)
        out = apply_framing(rgba, fr)
    else:
        if _binary(alpha).getbbox() is None:
            raise InputError("no foreground: the alpha/mask is empty (nothing to reconstruct)")
        fr = None
        out = rgba
    mask = _binary(out.getchannel("A"))
    return Segmented(out, mask, fr, used_alpha, orig)
