"""Tiny random models of the real classes, saved in the real on-disk format (tests and the smoke
preset). Which params set uses them is decided in core.models.sources alone."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def tiny_root(params: Any = None) -> Path:
    """Where the tiny models live: $LIFT3D_TINY_DIR, else <models.cache_dir>/lift3d-tiny, else
    ~/.cache/lift3d/tiny."""
    env = os.environ.get("LIFT3D_TINY_DIR")
    if env:
        return Path(env).expanduser()
    cache = getattr(getattr(params, "models", None), "cache_dir", None)
    if cache:
        return Path(cache).expanduser() / "lift3d-tiny"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lift3d" / "tiny"
