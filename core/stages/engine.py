"""What the coarse and fine stages share: atomic writes, resuming, and the iteration driver.

A trainer (core.stages.coarse.CoarseTrainer, core.stages.fine.FineTrainer) has `step_no`, `elapsed`, `step()`
(one iteration → metrics), `state_dict()`/`load_state_dict()` and `save_checkpoint(path)`.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

log = logging.getLogger(__name__)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write through a temporary file and rename, so a killed run never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_save_png(path: Path, arr) -> None:
    """An (H, W, C) uint8 array as a PNG, written atomically."""
    from PIL import Image

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    Image.fromarray(arr).save(tmp)
    os.replace(tmp, path)


def rng_state(generator: torch.Generator) -> dict:
    """Every random stream a stage draws from, for exact resume."""
    import random

    import numpy as np

    return {"generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
            "numpy_rng": np.random.get_state(), "python_rng": random.getstate()}


def set_rng_state(ck: dict, generator: torch.Generator) -> None:
    import random

    import numpy as np

    generator.set_state(ck["generator"])
    torch.set_rng_state(ck["torch_rng"])
    np.random.set_state(ck["numpy_rng"])
    random.setstate(ck["python_rng"])


def resume(trainer, ck_path: Path, stage: str, params) -> bool:
    """Load `ck_path` into the trainer when it exists; True when it did."""
    if not ck_path.is_file():
        return False
    ck = torch.load(ck_path, map_location="cpu", weights_only=False)
    if ck.get("stage") != stage:
        raise ValueError(f"{ck_path} is not a {stage} checkpoint")
    if ck.get("params") != params.to_dict():
        log.warning("resuming %s with parameters different from the checkpoint's", ck_path)
    trainer.load_state_dict(ck)
    log.info("resuming the %s stage from step %d (%s)", stage, trainer.step_no, ck_path)
    return True


def drive(trainer, iters: int, ck_path: Path, checkpoint_every: int, *, desc: str,
          postfix: Callable[[dict], dict], train: torch.nn.Module,
          callback: Optional[Callable[[int, dict], None]] = None,
          stop_after: Optional[int] = None, progress: bool = True) -> bool:
    """Run the trainer to `iters` iterations with a progress bar and checkpoints.

    `train` is put in training mode before each iteration (renders for a detector may switch it
    to eval). `callback(step, metrics)` gets each iteration's float metrics; `postfix(metrics)` the progress
    bar's fields every 25 iterations. `stop_after=k` stops after iteration k as a kill would (the
    checkpoint as of its last save). Returns True when the stage reached `iters`.
    """
    from tqdm import tqdm

    bar = tqdm(total=iters, initial=trainer.step_no, desc=desc, disable=not progress, dynamic_ncols=True)
    t0, base_elapsed = time.perf_counter(), trainer.elapsed
    try:
        while trainer.step_no < iters:
            train.train()
            metrics = trainer.step()
            s = trainer.step_no  # iterations done
            if callback is not None or s % 25 == 0:
                fm = {k: v if isinstance(v, str) else float(torch.as_tensor(v).detach()) for k, v in metrics.items()}
                if callback is not None:
                    callback(s - 1, {k: v for k, v in fm.items() if not isinstance(v, str)})
                if s % 25 == 0:
                    bar.set_postfix(postfix(fm))
            bar.update(1)
            trainer.elapsed = base_elapsed + time.perf_counter() - t0
            if s % checkpoint_every == 0 or s == iters:
                trainer.save_checkpoint(ck_path)
            if stop_after is not None and stop_after <= s < iters:
                return False
    finally:
        bar.close()
    return True
