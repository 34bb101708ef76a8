"""Shared by the prior tests: the tiny random priors, built once per machine (atomically)."""
from __future__ import annotations

import getpass
import tempfile
from pathlib import Path

from core.testmodels.priors import TINY_VERSION, ensure_tiny_models


def tiny_models() -> dict[str, str]:
    root = Path(tempfile.gettempdir()) / f"lift3d-test-tiny-{getpass.getuser()}-{TINY_VERSION}"
    return ensure_tiny_models(root)
