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


# An interpreter that cannot run a kernel whose loop is bounded by a value the kernel loaded: Triton
# 3.6's keeps such a scalar as a one-element array, which numpy 2 refuses to turn into the loop's
# bound (seen on the GPU machine, triton 3.6.0 / numpy 2.5.2; triton 3.8's interpreter runs it). The
# compiled kernel is not affected: tests/test_gpu_backends.py runs it against the tensors' pass.
LOADED_LOOP_BOUND = "only 0-dimensional arrays can be converted to Python scalars"


def run_interpreted(script: str, out: Path, *args: str, loaded_loop_bound: bool = False) -> dict:
    """`python -c script *args out` from the repository root with TRITON_INTERPRET=1; what it saved.
    `loaded_loop_bound`: the script runs a kernel whose loop is bounded by a loaded value, which skips
    the test where this Triton's interpreter cannot run one (LOADED_LOOP_BOUND)."""
    if not triton_available():
        pytest.skip("triton does not import")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", script, *args, str(out)], cwd=Path(__file__).resolve().parent.parent,
                       env=env, capture_output=True, text=True, timeout=900)
    if r.returncode and loaded_loop_bound and LOADED_LOOP_BOUND in r.stderr:
        import numpy
        import triton

        pytest.skip(f"triton {triton.__version__}'s interpreter (numpy {numpy.__version__}) cannot bound a "
                    "loop by a loaded value; the compiled kernel is tested on the GPU")
    assert r.returncode == 0, r.stderr[-4000:]
    return torch.load(out)
