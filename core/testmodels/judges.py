"""Tiny models of the judges' real classes, saved in their real on-disk formats (for tests and the
smoke preset), so that every loader runs its ordinary path:

- DPT: a tiny `DPTConfig` with a BEiT backbone (as DPT-BEiT-Large-512) → `DPTForDepthEstimation.save_pretrained` + `DPTImageProcessor.save_pretrained`
  → a folder loaded by `from_pretrained` (core/inputs/depth.py).
- CLIP: a tiny open_clip model config JSON (registered through `open_clip.add_model_config`) and its
  `state_dict` saved as a checkpoint file → `create_model_and_transforms(name, pretrained=file)`.
- rembg: a tiny torch conv net exported to ONNX with U²-Net's input/output contract (input (1,3,320,320)
  ImageNet-normalised, first output (1,1,320,320) saliency) → rembg's `u2net_custom` session.
  Its weights are set, not random: a 1×1 convolution that scores "not white", so the smoke preset
  cuts an object off a white background and segmentation tests have a known answer.
  The DPT and CLIP weights are random (seeded).

`ensure_tiny_judges(root)` builds them once into `root` (default: `judges/` under the
tiny-model root) and returns their paths.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

TINY_CLIP_NAME = "lift3d-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
_VERSION = "2"  # bump when a tiny model changes
_lock = threading.Lock()


@dataclass(frozen=True)
class TinyJudges:
    root: Path
    dpt: Path  # a save_pretrained folder (model + image processor)
    clip_config: Path  # an open_clip model-config JSON
    clip_checkpoint: Path  # its state_dict
    rembg_onnx: Path  # a U²-Net-contract ONNX model


def default_root(params=None) -> Path:
    """`judges/` under the tiny-model root (core.testmodels.tiny_root)."""
    from core.testmodels import tiny_root

    return tiny_root(params) / "judges"


def _paths(root: Path) -> TinyJudges:
    return TinyJudges(root, root / "dpt", root / "clip" / f"{TINY_CLIP_NAME}.json",
                      root / "clip" / "tiny_clip.pt", root / "rembg" / "u2net_tiny.onnx")


def save_tiny_dpt(folder: Path, seed: int = 0) -> Path:
    """A tiny DPT with a BEiT backbone — the architecture of the default Intel/dpt-beit-large-512
    (DPT head over BEiT features from four stages, relative position bias) — and its image processor
    (aspect kept, sides a multiple of the patch size, like the real one's 512 / multiple of 32)."""
    from transformers import BeitConfig, DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(seed)
    backbone = BeitConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=37, out_features=["stage1", "stage2", "stage3", "stage4"],
        use_relative_position_bias=True, reshape_hidden_states=False, add_fpn=False, use_mask_token=False,
    )
    config = DPTConfig(
        backbone_config=backbone, is_hybrid=False, hidden_size=32, image_size=32, patch_size=8,
        num_hidden_layers=None, num_attention_heads=None, intermediate_size=None,
        neck_hidden_sizes=[8, 8, 16, 16], fusion_hidden_size=16, reassemble_factors=[4, 2, 1, 0.5],
    )
    model = DPTForDepthEstimation(config).eval()
    processor = DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=True, ensure_multiple_of=8,
                                  resample=3)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def save_tiny_clip(config_path: Path, checkpoint: Path, seed: int = 0) -> tuple[Path, Path]:
    import open_clip

    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(TINY_CLIP_CONFIG, indent=2))
    open_clip.add_model_config(config_path)
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_CLIP_NAME, pretrained=None)
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    return config_path, checkpoint


class _WhiteBackgroundCutter(torch.nn.Module):
    """U²-Net's I/O contract; saliency = sigmoid(k·(0.9 − brightness)) on the ImageNet-normalised
    input, i.e. 'anything not near white is the object'."""

    MEAN = (0.485, 0.456, 0.406)
    STD = (0.229, 0.224, 0.225)

    def __init__(self, k: float = 40.0, white: float = 0.9):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 1)
        with torch.no_grad():
            # brightness = Σ_c (x_c·std_c + mean_c)/3
            self.conv.weight.copy_(torch.tensor([-k * s / 3 for s in self.STD]).view(1, 3, 1, 1))
            self.conv.bias.fill_(k * (white - sum(self.MEAN) / 3))

    def forward(self, x):
        d1 = torch.sigmoid(self.conv(x))
        return d1, d1  # U²-Net returns d1 first, then side outputs


def save_tiny_rembg(path: Path) -> Path:
    import warnings

    path.parent.mkdir(parents=True, exist_ok=True)
    net = _WhiteBackgroundCutter().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 3, 320, 320),), str(path), input_names=["input.1"],
                          output_names=["d1", "d2"], dynamo=False)
    return path


def ensure_tiny_judges(root: Optional[Path | str] = None, params=None) -> TinyJudges:
    """Build the tiny judges into `root` unless they are there already (a stamp file marks completion)."""
    root = Path(root) if root else default_root(params)
    p = _paths(root)
    stamp = root / f".complete-v{_VERSION}"
    with _lock:
        if not stamp.exists():
            save_tiny_dpt(p.dpt)
            save_tiny_clip(p.clip_config, p.clip_checkpoint)
            save_tiny_rembg(p.rembg_onnx)
            stamp.write_text("ok\n")
    return p
