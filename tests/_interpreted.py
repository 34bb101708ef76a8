"""Shared by the Triton kernel tests: run a script in a child process under Triton's interpreter.

Triton reads TRITON_INTERPRET when it is imported and when it decorates a kernel (its own library
functions, tl.zeros among them, are decorated at `import triton`), so the interpreted run is a child
process with TRITON_INTERPRET=1 from the start; the test process stays as it was. The child saves its
tensors with torch.save to the path it is given last; the tests compare them."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.representations.hashgrid import triton_available


def run_interpreted(script: str, out: Path, *args: str) -> dict:
    """`python -c script *args out` from the repository root with TRITON_INTERPRET=1; what it saved."""
    if not triton_available():
        pytest.skip("triton does not import")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", script, *args, str(out)], cwd=Path(__file__).resolve().parent.parent,
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return torch.load(out)
