"""Opening an input photo: the one opener of input images (core.inputs.images, core.inputs.segment).

It turns a photo upright by its EXIF orientation, downscales a huge one while decoding, brings a
16-bit / 32-bit / float photo to 8 bits by its value range (`eight_bit`), and counts an alpha
channel that is fully opaque as none (`has_alpha`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from core.errors import InputError

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

WORKING_MAX_SIDE = 2048  # inputs are brought below this long side before any float conversion
_EXIF_ORIENTATION = 0x0112


def open_image(path: Path | str, max_pixels: int, what: str = "image",
               max_side: Optional[int] = None) -> tuple["Image.Image", tuple[int, int]]:
    """The one opener of input images (photos and depth maps): upright (EXIF orientation applied),
    and brought below `max_pixels` (and `max_side`, when given) while decoding (JPEG draft) or
    right after. Returns (image, its original size, upright)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} not found: {path}")
    if not path.is_file():
        raise InputError(f"{what} is not a file: {path}")
    try:
        img = Image.open(path)
        w, h = img.size
        if img.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # turned by 90°: upright is h×w
            w, h = h, w
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise InputError(f"{what} is not an image (cannot be decoded): {path}") from None
    except Image.DecompressionBombError:
        raise InputError(f"{what} is too large to decode safely: {path}") from None
    f = min(1.0, (max_pixels / (w * h)) ** 0.5, max_side / max(w, h) if max_side else 1.0)
    target = (max(1, int(w * f)), max(1, int(h * f)))
    try:
        if f < 1.0 and img.format == "JPEG":
            img.draft(img.mode, target)  # decode at 1/2, 1/4 or 1/8 scale, never below target
        img = ImageOps.exif_transpose(img)
        img.load()
        if f < 1.0:
            # Pillow's reducing step has no 16-bit version
            img.thumbnail(target, Image.Resampling.LANCZOS, reducing_gap=None if img.mode.startswith("I;16") else 2.0)
    except (OSError, ValueError, SyntaxError):
        raise InputError(f"{what} is not a readable image (truncated or corrupt): {path}") from None
    if f < 1.0:
        log.info("%s %s is %dx%d: downscaled to %dx%d", what, path.name, w, h, *img.size)
    return img, (w, h)


def eight_bit(img):
    """A 16-bit ('I;16…'), 32-bit integer ('I') or float ('F') image as 8-bit grey ('L'), its value
    range scaled (16-bit: /257; the others: by their maximum). Other modes are returned as they are."""
    from PIL import Image

    if img.mode.startswith("I;16"):
        arr = np.asarray(img, dtype=np.float32) / 257.0
    elif img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        top = float(arr.max())
        arr = arr * (255.0 / top) if top > 0 else arr * 0
    else:
        return img
    return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L")


def has_alpha(img, name: str = "") -> bool:
    """Whether the image has an alpha channel that cuts something out. A fully opaque alpha (every
    value 255) is no cut-out: such an image is segmented like a photo without alpha (logged)."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode not in ("RGBA", "LA", "PA"):
        return False
    if img.getchannel("A").getextrema()[0] < 255:
        return True
    log.info("image%s has an alpha channel, but it is fully opaque: treated as no alpha", f" {name}" if name else "")
    return False
