"""`lift3d bench speed` plumbing on the CPU with the tiny priors (the figures come from the GPU)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from flows.bench_speed import FULLSIZE, format_table, run_speed_bench
from core.params import load_params
from _tiny_priors import tiny_models


def test_speed_bench_writes_speed_json(tmp_path, monkeypatch):
    monkeypatch.setenv("LIFT3D_TINY_DIR", str(Path(tiny_models()["sd"]).parent))
    p = load_params("smoke", {"coarse.resolution": 32})
    r = run_speed_bench(p, torch.device("cpu"), iters=2, tiny=True, ti_steps=5, out=tmp_path, scene="image")
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert saved["coarse_iteration"]["eager"]["iters"] == 2 and saved["coarse_iteration"]["eager"]["median_ms"] > 0
    assert saved["render"].startswith("learnable image 32x32")
    assert saved["textual_inversion"]["seconds_per_100_steps"] > 0 and saved["textual_inversion"]["steps_timed"] == 2
    assert set(saved["prior_only"]) == {"eager_sd", "eager_zero123"}
    assert "coarse iteration, both priors (eager)" in format_table(r)


def test_fullsize_configs_are_the_real_architectures():
    """The configs build SD 1.5's 860M-parameter UNet shape (checked on the meta device: no memory)."""
    from diffusers import UNet2DConditionModel

    cfg = json.loads((FULLSIZE / "zero123_unet.json").read_text())
    assert cfg["in_channels"] == 8 and cfg["cross_attention_dim"] == 768
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads((FULLSIZE / "sd15_unet.json").read_text()))
    n = sum(p.numel() for p in unet.parameters())
    assert 855e6 < n < 865e6
