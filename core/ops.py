"""Tensor operations whose backward is the same to the bit on every run.

Advanced indexing, `values[index]`, differentiates into index_put with accumulate. On a
multi-threaded CPU that adds a row's many contributions with atomics, in whatever order the threads
reach them, so once an index repeats rows across threads the gradient's last bits change from run
to run; in a training loop they grow into different meshes (two `lift3d refine` runs of one
checkpoint, session 12). index_select differentiates into index_add, which sums in index order.
"""
from __future__ import annotations

import torch


def gather_rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values[index] along dimension 0, index of any shape: (*index.shape, *values.shape[1:]), with a
    backward that sums each row's contributions in a fixed order."""
    return values.index_select(0, index.reshape(-1)).view(*index.shape, *values.shape[1:])
