"""The papers' metrics (Magic123 §3.3 "Evaluation metrics", Consistent123 §4.2):

- PSNR and LPIPS of the render at the reference view against the input image (both composited on
  white, the papers' background, over the whole frame), PSNR capped at `psnr_cap` for identical images;
- CLIP similarity: the mean cosine similarity of the CLIP embeddings of N novel-view renders to the
  embedding of the reference image.

LPIPS is the `lpips` package (v0.1 linear heads, which ship inside the package). Its trunk (AlexNet /
VGG / SqueezeNet ImageNet weights) normally comes from torchvision's download; here the class is
built with `pnet_rand=True` (no download) and the trunk weights are loaded from torchvision's hub
cache file (or a given file), so offline machines work and a missing file is one clear error.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from core.evaluation.metrics import psnr
from core.errors import InputError, ModelNotFoundError
from core.io import atomic_write_text

log = logging.getLogger(__name__)

# torchvision's ImageNet weights used by lpips' trunks (lpips/pretrained_networks.py)
TRUNK_WEIGHTS = {
    "alex": ("alexnet", "AlexNet_Weights"),
    "vgg": ("vgg16", "VGG16_Weights"),
    "squeeze": ("squeezenet1_1", "SqueezeNet1_1_Weights"),
}
_LPIPS: dict[tuple, torch.nn.Module] = {}
_LPIPS_MIN_SIDE = 64


# ------------------------------------------------------------------------------------------- images
def load_rgb_on_white(path: Path | str, size: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """An image file → (3,H,W) float in [0,1], alpha composited on white, optionally resized."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image not found: {path}")
    im = Image.open(path)
    im.load()
    return pil_on_white(im, size)


def pil_on_white(im: Image.Image, size: Optional[tuple[int, int]] = None) -> torch.Tensor:
    rgba = im.convert("RGBA")
    if size is not None and rgba.size != tuple(size):
        rgba = rgba.resize(tuple(size), Image.Resampling.LANCZOS)
    a = np.asarray(rgba, dtype=np.float32) / 255.0
    rgb = a[..., :3] * a[..., 3:] + (1.0 - a[..., 3:])
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


# --------------------------------------------------------------------------------------------- PSNR
# -------------------------------------------------------------------------------------------- LPIPS
def lpips_trunk_file(net: str) -> Path:
    """torchvision's hub-cache file of the ImageNet weights lpips' trunk uses."""
    import torchvision

    fn, weights = TRUNK_WEIGHTS[net]
    url = getattr(torchvision.models, weights).IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def build_lpips(net: str = "alex", trunk: Optional[Path | str] = None, random_trunk: bool = False,
                device: torch.device | str = "cpu") -> torch.nn.Module:
    """`lpips.LPIPS(pretrained=True, net=net, pnet_rand=True)` (no download), then the trunk's
    ImageNet weights from `trunk` or torchvision's hub cache. `random_trunk` keeps the random trunk
    (tests and the smoke preset only: the metric's value is then not the published LPIPS)."""
    import lpips

    key = (net, str(trunk), random_trunk, str(device))
    if key in _LPIPS:
        return _LPIPS[key]
    with torch.random.fork_rng(devices=[]):  # the caller's random stream untouched
        torch.manual_seed(0)  # a random trunk is the same in every run, so its LPIPS is reproducible
        model = lpips.LPIPS(pretrained=True, net=net, pnet_rand=True, verbose=False)
    if not random_trunk:
        path = Path(trunk) if trunk else lpips_trunk_file(net)
        if not path.is_file():
            raise ModelNotFoundError(
                f"LPIPS ({net}) needs torchvision's ImageNet {TRUNK_WEIGHTS[net][0]} weights, not found at {path}. "
                f"Copy that file there (TORCH_HOME sets the folder: $TORCH_HOME/hub/checkpoints/) from a machine "
                f"where torchvision downloaded it."
            )
        import torchvision

        tv = getattr(torchvision.models, TRUNK_WEIGHTS[net][0])(weights=None)
        tv.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        feats = tv.features
        # lpips' trunk slices hold the same module objects under the indices of tv.features
        for sl in [getattr(model.net, f"slice{i}") for i in range(1, model.net.N_slices + 1)]:
            for name, mod in sl.named_children():
                mod.load_state_dict(feats[int(name)].state_dict())
    model = model.to(device).eval()
    for p_ in model.parameters():
        p_.requires_grad_(False)
    _LPIPS[key] = model
    return model


@torch.no_grad()
def lpips_distance(model: torch.nn.Module, pred: torch.Tensor, target: torch.Tensor) -> float:
    """LPIPS of (3,H,W) images in [0,1] (lpips wants [-1,1]). Images under 64 px a side (tiny smoke
    renders) are upsampled to 64 first: the AlexNet/VGG trunks cannot take smaller inputs."""
    dev = next(model.parameters()).device
    a = pred.float().unsqueeze(0).to(dev) * 2 - 1
    b = target.float().unsqueeze(0).to(dev) * 2 - 1
    if min(a.shape[-2:]) < _LPIPS_MIN_SIDE:
        f = _LPIPS_MIN_SIDE / min(a.shape[-2:])
        size = (round(a.shape[-2] * f), round(a.shape[-1] * f))
        a = torch.nn.functional.interpolate(a, size=size, mode="bilinear", align_corners=False)
        b = torch.nn.functional.interpolate(b, size=size, mode="bilinear", align_corners=False)
    return float(model(a, b).mean())


# ------------------------------------------------------------------------------------ CLIP similarity
@torch.no_grad()
def clip_similarity(clip, novel: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean cosine similarity of the CLIP embeddings of N novel views (N,3,H,W) to the reference
    image (3,H,W) (Magic123 §3.3 / Consistent123 §4.2)."""
    e_nov = clip.encode_images(novel)
    e_ref = clip.encode_images(reference.unsqueeze(0))
    return float((e_nov @ e_ref.T).mean())


# ------------------------------------------------------------------------------------------ run dirs
def stage_dir(run_dir: Path) -> Path:
    """The completed stage folder to evaluate: RUN_DIR itself when it is one (result.json), else
    RUN_DIR/fine, else RUN_DIR/coarse (a generate-run folder prefers the fine stage)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"run folder not found: {run_dir}")
    for cand in (run_dir, run_dir / "fine", run_dir / "coarse"):
        if (cand / "result.json").is_file() and (cand / "renders" / "reference.png").is_file():
            return cand
    raise InputError(
        f"{run_dir} holds no completed stage (a folder with result.json and renders/reference.png, "
        f"or fine/ or coarse/ with them)"
    )


def evaluate_stage(stage: Path, clip, lpips_model, psnr_cap: float = 100.0,
                   reference_image: Optional[Path] = None) -> dict:
    """Metrics of one completed stage folder (the contract's layout)."""
    stage = Path(stage)
    render = Image.open(stage / "renders" / "reference.png")
    render.load()
    ref_path = Path(reference_image) if reference_image else stage / "reference_rgba.png"
    if not ref_path.is_file():
        raise InputError(f"reference image not found: {ref_path}")
    pred = pil_on_white(render)
    target = load_rgb_on_white(ref_path, size=render.size)
    novel_paths = sorted((stage / "renders").glob("novel_*.png"))
    if not novel_paths:
        raise InputError(f"{stage}/renders has no novel_*.png views for CLIP similarity")
    novel = torch.stack([load_rgb_on_white(p) for p in novel_paths])
    return {
        "psnr": psnr(pred, target, psnr_cap),
        "lpips": lpips_distance(lpips_model, pred, target),
        "clip_similarity": clip_similarity(clip, novel, target),
        "novel_views": len(novel_paths),
        "resolution": list(render.size),
    }


def evaluate_run(run_dir: Path | str, params, device: torch.device | str = "cpu", *,
                 dataset: Optional[str] = None, asset: Optional[str] = None,
                 method: Optional[str] = None, write: bool = True) -> dict:
    """RUN_DIR → metrics dict (and RUN_DIR/metrics.json). The smoke preset (models.tiny) uses the
    tiny CLIP and LPIPS with a random trunk."""
    from core.evaluation.clip import clip_from_params

    run_dir = Path(run_dir)
    stage = stage_dir(run_dir)
    clip = clip_from_params(params, "evaluate", device)
    lp = build_lpips(params.evaluate.lpips_net, params.evaluate.lpips_trunk,
                     random_trunk=params.models.tiny, device=device)
    metrics = evaluate_stage(stage, clip, lp, params.evaluate.psnr_cap)
    result = {}
    try:
        result = json.loads((stage / "result.json").read_text())
    except (OSError, ValueError):
        pass
    metrics.update({
        "asset": asset or run_dir.resolve().name,
        "dataset": dataset or result.get("dataset") or run_dir.resolve().parent.name,
        "method": method or result.get("method") or params.method,
        "stage": stage.name if stage != run_dir else result.get("stage", stage.name),
        "stage_dir": str(stage),
        "priors": _priors_label(params),
        "clip_model": "tiny" if params.models.tiny else f"{params.evaluate.clip_model}/{params.evaluate.clip_pretrained}",
        "lpips_net": params.evaluate.lpips_net + (" (random trunk)" if params.models.tiny else ""),
    })
    if write:
        atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def _priors_label(params) -> str:
    """What guided the run, for the report: analytic priors (exact denoisers of known objects),
    tiny random ones, or the pretrained weights named in params."""
    from core.models.sources import uses_analytic_prior

    kinds = {w: ("analytic" if uses_analytic_prior(params, w) else "tiny random" if params.models.tiny else "pretrained")
             for w in ("sd", "zero123")}
    return kinds["sd"] if kinds["sd"] == kinds["zero123"] else f"sd {kinds['sd']}, zero123 {kinds['zero123']}"
