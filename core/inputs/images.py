"""The reference view: loading and validating the input image (and depth map) — Magic123 §2.1
"Image preprocessing" as far as it concerns an already segmented (RGBA) input.

`load_reference(image, depth=None, size=…)` → `Reference(rgb (3,H,W) on white, mask (1,H,W) in
{0,1}, depth (1,H,W) bigger = nearer | None, image_path)`. The object is recentred in a square
frame, its bounding box scaled to `object_scale` of the frame (the papers' preprocessing), then
resized to the render resolution. Bad inputs raise InputError with one clear line:
missing file, not an image, no foreground, an RGB photo without alpha (run `lift3d prepare`,
unless core.inputs.segment can segment it here); a depth map of another size is resized (logged);
a huge photo is downscaled while decoding (Image.draft / reduce), never loaded at full size in float.

Input photos are opened by core.inputs.photo (EXIF orientation, bit depth, opaque alpha).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from core.errors import InputError
from core.inputs.photo import WORKING_MAX_SIDE, eight_bit, has_alpha, open_image
from core.io import atomic_save_image

log = logging.getLogger(__name__)

MIN_FOREGROUND_PIXELS = 16


@dataclass
class Reference:
    rgb: torch.Tensor  # (3, H, W) in [0, 1], object colour over a white background
    mask: torch.Tensor  # (1, H, W) in {0, 1}
    depth: Optional[torch.Tensor]  # (1, H, W), bigger = nearer (as in depth.png), or None
    image_path: Optional[str] = None

    @property
    def size(self) -> int:
        return int(self.rgb.shape[-1])


def _segment_or_fail(img, path: Path, params=None):
    try:
        from core.inputs.segment import segment_image  # rembg segmentation, when present
    except Exception:  # noqa: BLE001
        raise InputError(f"image has no alpha channel: {path}; run `lift3d prepare {path} --out DIR` "
                         "to segment it, then use DIR/rgba.png") from None
    log.info("image %s has no alpha: segmenting it (core.inputs.segment)", path.name)
    # the whole photo with its alpha, not framed: load_reference frames it itself
    return segment_image(img.convert("RGB"), params, recenter=False)


def _square_crop_box(alpha: np.ndarray, object_scale: float) -> tuple[float, float, float]:
    """Centre (cx, cy) and side of the square frame in which the alpha bbox spans object_scale."""
    ys, xs = np.nonzero(alpha > 0.5)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    side = max(x1 - x0, y1 - y0) / object_scale
    return (x0 + x1) / 2.0, (y0 + y1) / 2.0, float(side)


def _crop_resize(img, cx: float, cy: float, side: float, size: int, fill):
    """The square (cx±side/2, cy±side/2) of img (outside = fill), resized to size×size."""
    from PIL import Image

    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    # an affine transform samples outside the image as `fill`
    scale = side / size
    return img.transform((size, size), Image.Transform.AFFINE, (scale, 0, box[0], 0, scale, box[1]),
                         resample=Image.Resampling.BILINEAR, fillcolor=fill)


def load_reference(image, depth=None, size: int = 128, max_pixels: int = 4096 * 4096,
                   object_scale: float = 0.8, recenter: bool = True, params=None) -> Reference:
    """Load and validate the reference image (and depth map); see the module docstring. `params`
    (the whole Params) chooses the segmentation model for a photo without alpha, as `lift3d prepare`
    does (core.models.sources.segment_model); without it rembg's default model is used."""
    from PIL import Image

    path = Path(image)
    img, orig_size = open_image(path, max_pixels, "image", max_side=WORKING_MAX_SIDE)
    img = eight_bit(img)
    if not has_alpha(img, path.name):
        img = _segment_or_fail(img, path, params)
    img = img.convert("RGBA")
    a = np.asarray(img.getchannel("A"), dtype=np.float32) / 255.0
    if int((a > 0.5).sum()) < MIN_FOREGROUND_PIXELS:
        raise InputError(f"image has no foreground (its alpha channel is empty): {path}")
    dimg = None
    if depth is not None:
        dpath = Path(depth)
        dimg, dsize = open_image(dpath, max_pixels, "depth map", max_side=WORKING_MAX_SIDE)
        if dsize != orig_size:
            log.warning("depth map %s is %dx%d but the image is %dx%d: resized to the image",
                        dpath.name, dsize[0], dsize[1], orig_size[0], orig_size[1])
        dimg = _depth_to_float_image(dimg)
        if dimg.size != img.size:
            dimg = dimg.resize(img.size, Image.Resampling.BILINEAR)
    if recenter:
        cx, cy, side = _square_crop_box(a, object_scale)
    else:
        w, h = img.size
        cx, cy, side = w / 2.0, h / 2.0, float(max(w, h))
    # premultiply on white before resampling so edges blend to white, not to black
    rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    rgb_white = rgb * a[..., None] + (1.0 - a[..., None])
    rgb_img = Image.fromarray((rgb_white * 255).round().astype(np.uint8))
    rgb_c = np.asarray(_crop_resize(rgb_img, cx, cy, side, size, (255, 255, 255)), dtype=np.float32) / 255.0
    a_c = np.asarray(_crop_resize(Image.fromarray((a * 255).round().astype(np.uint8)), cx, cy, side, size, 0),
                     dtype=np.float32) / 255.0
    mask = (a_c > 0.5).astype(np.float32)
    if mask.sum() < 1:
        raise InputError(f"image has no foreground at {size}x{size} after cropping: {path}")
    d_t = None
    if dimg is not None:
        d_c = np.asarray(_crop_resize(dimg, cx, cy, side, size, 0.0), dtype=np.float32)
        d_t = torch.from_numpy(d_c.copy())[None]
    return Reference(rgb=torch.from_numpy(rgb_c.copy()).permute(2, 0, 1).contiguous(),
                     mask=torch.from_numpy(mask.copy())[None], depth=d_t, image_path=str(path))


def _depth_to_float_image(dimg):
    """A depth image (L, I;16, RGB(A) grey, F) → a PIL 'F' image in [0, 1]."""
    from PIL import Image

    if dimg.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(dimg, dtype=np.float32)
        arr = arr / max(1.0, float(arr.max()))
    elif dimg.mode == "F":
        arr = np.asarray(dimg, dtype=np.float32)
        rng = float(arr.max() - arr.min())
        arr = (arr - arr.min()) / rng if rng > 0 else arr * 0
    else:
        arr = np.asarray(dimg.convert("L"), dtype=np.float32) / 255.0
    return Image.fromarray(arr.astype(np.float32))


def save_rgba(ref: Reference, path) -> None:
    """The reference as used (RGBA, PNG), written atomically."""
    path = Path(path)
    rgb = ref.rgb.clamp(0, 1).permute(1, 2, 0).numpy()
    a = ref.mask[0].numpy()
    arr = np.concatenate([rgb, a[..., None]], -1)
    atomic_save_image(path, (arr * 255).round().astype(np.uint8))
