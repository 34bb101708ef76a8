"""Files that are never half-written: every writer of lift3d goes through these.

Each writes to a temporary name beside the target and renames it (os.replace is atomic on one
file system), so a killed run leaves either the old file or the new one, never a torn one.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


def atomic_write(path: Path | str, write: Callable[[Path], None], suffix: str = "") -> Path:
    """`write(tmp)` writes the file at a temporary path (ending in `suffix`, for writers that go by
    the extension), which then replaces `path`. The temporary name carries the process id, so
    parallel workers writing the same cache file do not collide."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}{suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    return atomic_write(path, lambda t: t.write_bytes(data))


def atomic_write_text(path: Path | str, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: Path | str) -> Path:
    return atomic_write(path, lambda t: torch.save(obj, t))


def atomic_save_image(path: Path | str, arr: np.ndarray) -> Path:
    """An (H, W, C) uint8 array as an image file whose format follows the suffix (PNG, JPEG…)."""
    from PIL import Image

    path = Path(path)
    return atomic_write(path, lambda t: Image.fromarray(arr).save(t, format=Image.registered_extensions()[path.suffix.lower()]),
                        suffix=path.suffix)


def writable_folder(path: Path | str, what: str = "--out") -> Path:
    """`path` as a folder this process can write into (created if missing), or one clear line
    (InputError) saying why not — checked before any work is done."""
    from core.errors import InputError

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".lift3d-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InputError(f"cannot write to {what} {path}: {e.strerror or type(e).__name__}") from None
    return path


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """A (C, H, W) image in [0, 1] → an (H, W, C) uint8 array."""
    return (img.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
