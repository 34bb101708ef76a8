"""`lift3d prepare`: a photo → the reference inputs the stages read (DESIGN.md data flow):
`rgba.png` (object framed, alpha), `mask.png` ({0,255}), `depth.png` (brighter = nearer).

An alpha channel in the input is used as is (no segmentation); a given depth map is used as is —
its values and mode are kept, and it is cropped/scaled/padded with exactly the framing applied to
the image so that it stays aligned. Without one, DPT estimates it on the framed RGBA.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

from PIL import Image

from core.inputs.depth import depth_for, open_depth
from core.errors import InputError
from core.inputs.segment import apply_framing, segment
from core.io import atomic_write

log = logging.getLogger(__name__)


def sibling_depth(image: Path) -> Optional[Path]:
    """A depth.png beside the image (the benchmark folders' layout), unless the image is it."""
    cand = Path(image).with_name("depth.png")
    return cand if cand.is_file() and cand.resolve() != Path(image).resolve() else None


def prepare_inputs(image: Path | str, out: Path | str, params, depth: Optional[Path | str] = None,
                   device="cpu") -> dict:
    """Write out/rgba.png, out/mask.png, out/depth.png (and out/prepare.json, last); returns that record."""
    from core.perf import reset_peak_memory, summary, summary_line

    t0 = time.perf_counter()
    reset_peak_memory(device)
    image, out = Path(image), Path(out)
    if depth is None and params.depth.use_sibling:
        depth = sibling_depth(image)
        if depth is not None:
            log.info("prepare: using the given depth map beside the image: %s", depth)
    log.info("prepare: %s: the object's mask (its alpha, or rembg where it has none) and framing", image.name)
    seg = segment(image, params)
    out.mkdir(parents=True, exist_ok=True)
    if depth is not None:
        d = open_depth(depth)
        if seg.framing is not None:
            if d.size != seg.source_size:
                log.info("prepare: depth map %s is %dx%d, the image %dx%d: resized to match", depth, *d.size,
                         *seg.source_size)
                d = d.resize(seg.source_size, Image.Resampling.BILINEAR)
            d = apply_framing(d, seg.framing, fill=0, resample=Image.Resampling.BILINEAR)
        elif d.size != seg.rgba.size:
            d = d.resize(seg.rgba.size, Image.Resampling.BILINEAR)
        depth_source = str(depth)
    else:
        log.info("prepare: estimating the reference depth (%s)", "tiny DPT" if params.models.tiny else params.depth.model)
        d = depth_for(seg.rgba, params, device)
        depth_source = "tiny DPT" if params.models.tiny else params.depth.model
    if seg.rgba.size != d.size:
        raise InputError(f"internal: depth {d.size} and rgba {seg.rgba.size} differ")
    for name, im in (("rgba.png", seg.rgba), ("mask.png", seg.mask), ("depth.png", d)):
        atomic_write(out / name, im.save, suffix=".png")
    record = {
        "image": str(image),
        "source_size": list(seg.source_size),
        "size": list(seg.rgba.size),
        "alpha": "input" if seg.used_input_alpha else
                 ("tiny rembg" if params.models.tiny and params.segment.model == "u2net" else params.segment.model),
        "depth": depth_source,
        "depth_given": depth is not None,
        "framing": None if seg.framing is None else {
            "box": list(seg.framing.box), "scaled": list(seg.framing.scaled), "offset": list(seg.framing.offset),
            "work_size": list(seg.framing.work_size)},
        "seconds": round(time.perf_counter() - t0, 3),
    }
    record["summary"] = summary(device, record["seconds"])
    (out / "prepare.json").write_text(json.dumps(record, indent=2))
    log.info("%s", summary_line("prepare", record["summary"]))
    return record
