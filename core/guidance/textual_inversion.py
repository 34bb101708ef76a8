"""Textual inversion (Gal et al.): a token <e> for the reference image (Magic123 §2.2, RealFusion).

The recipe of diffusers' `textual_inversion` example as Magic123's
scripts/textual_inversion/textual_inversion.sh runs it (params.textual_inversion; docs/fidelity.md,
item 8): augmented views of the object (the example's `--use_augmentations` pipeline, or lift3d's
crop-and-flip), the small set of ImageNet-style templates ("a photo of a {}", …), a new token
whose embedding row — and only that row — trains with AdamW, initialised from an existing word's
embedding, with the MSE between the UNet's noise prediction and the added noise (t ~ U[0, T)).
Batch 16 at lr 1e-4 (no scale_lr), 3,000 steps, constant lr; the one image is repeated 100 times
per epoch, so every 7th batch holds 4 images. Two effects of the released script are kept as
parameters: its images are the rgba.png converted to RGB (black where transparent) and reach the
VAE in [0, 1] rather than [-1, 1].

Files are the benchmark folders' format: a `torch.save`d dict `{token: float32 tensor[D]}` named
`learned_embeds.bin`; D is 768 for SD 1.5 (the benchmark files), 1024 for SD 2.x.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from core.errors import InputError
from core.io import atomic_torch_save
from core.perf import GraphedCall, scope, tf32_matmuls, to_device

log = logging.getLogger(__name__)

# diffusers' examples/textual_inversion `imagenet_templates_small` (object mode)
IMAGENET_TEMPLATES_SMALL = [
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
]


# ------------------------------------------------------------------------------------- file format
def read_learned_embeds(path: Path | str) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"learned embeddings not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input problem
        raise InputError(f"{path} is not a learned_embeds.bin (torch.save of {{token: tensor}}): {e}") from None
    if not isinstance(data, dict) or not data or not all(
            isinstance(k, str) and torch.is_tensor(v) for k, v in data.items()):
        raise InputError(f"{path} is not a learned_embeds.bin: expected a dict {{token: tensor}}")
    return {k: v.detach().float().reshape(-1) for k, v in data.items()}


def save_learned_embeds(path: Path | str, embeds: dict[str, torch.Tensor]) -> Path:
    """Write {token: float32 tensor[D]} with torch.save (the benchmark folders' format)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_torch_save({k: v.detach().float().cpu().reshape(-1).clone() for k, v in embeds.items()}, path)


def add_token(tokenizer: Any, text_encoder: Any, token: str, embedding: Optional[torch.Tensor] = None,
              initializer: Optional[str] = None) -> int:
    """Add `token` to the tokenizer, grow the text encoder's embedding table, set its row.

    The row is `embedding` when given (loading), else the embedding of the `initializer` word's
    first token (training). Returns the token id."""
    emb_layer = text_encoder.get_input_embeddings()
    width = emb_layer.weight.shape[1]
    if embedding is not None and embedding.numel() != width:
        raise InputError(
            f"token '{token}' has an embedding of size {embedding.numel()} but the text encoder is {width} wide: "
            f"this learned_embeds.bin was made for another Stable Diffusion (768 = SD 1.x, 1024 = SD 2.x); "
            f"use the matching --set sd.model=… or learn a new token"
        )
    tokenizer.add_tokens([token])
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id >= emb_layer.weight.shape[0]:
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        if embedding is not None:
            weight[token_id] = embedding.to(weight)
        elif initializer:
            init_ids = tokenizer.encode(initializer, add_special_tokens=False)
            if not init_ids:
                raise InputError(f"textual inversion: initializer word '{initializer}' gives no token")
            weight[token_id] = weight[init_ids[0]].clone()
    return token_id


def load_learned_embeds(path: Path | str, tokenizer: Any, text_encoder: Any) -> list[str]:
    """Load a learned_embeds.bin into tokenizer + text encoder; returns its tokens."""
    embeds = read_learned_embeds(path)
    for token, vec in embeds.items():
        add_token(tokenizer, text_encoder, token, embedding=vec)
    log.info("loaded token(s) %s from %s", ", ".join(embeds), path)
    return list(embeds)


# ------------------------------------------------------------------------------------------ training
def textual_inversion_lr(lr: float, batch_size: int, gradient_accumulation: int = 1, scale_lr: bool = False,
                         processes: int = 1) -> float:
    """The learning rate the example trains with: `lr`, or with --scale_lr
    lr × gradient_accumulation × batch_size × processes (Magic123's script: off, so 1e-4)."""
    return float(lr) * (gradient_accumulation * batch_size * processes if scale_lr else 1)


def batch_size_at(index: int, batch_size: int, repeats: Optional[int] = None) -> int:
    """The size of the `index`-th (0-based) batch the example's DataLoader yields: the dataset is
    one image repeated `repeats` times per epoch, batched without drop_last, so each epoch is
    ⌈repeats / batch_size⌉ batches and its last one holds the remainder (100, 16: six of 16, one of 4).
    `repeats` None: every batch is full."""
    if repeats is None:
        return int(batch_size)
    per_epoch = -(-int(repeats) // int(batch_size))
    pos = int(index) % per_epoch
    return int(batch_size) if pos < per_epoch - 1 else int(repeats) - (per_epoch - 1) * int(batch_size)


def on_background(rgb: torch.Tensor, mask: Optional[torch.Tensor], background: str) -> torch.Tensor:
    """The object (3, H, W) composited on white, recomposited on `background` ('white' | 'black':
    what converting the rgba.png to RGB gives where it is transparent)."""
    if background == "white" or mask is None:
        return rgb
    if background == "black":
        return (rgb - (1.0 - mask.to(rgb))).clamp(0, 1)
    raise ValueError(f"textual inversion: unknown background {background!r} (black, white)")


_BASE_GRIDS: dict = {}  # (h, w, dtype, device) → torchvision's base grid for an h×w image


def _base_grid(h: int, w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torchvision's `_gen_affine_grid` base grid (1, h·w, 3) for an unexpanded h×w output: pixel
    centres from the image centre and a column of ones, made the way it makes them (linspace,
    copy, fill), once per size and device instead of once a view."""
    key = (h, w, dtype, str(device))
    if key not in _BASE_GRIDS:
        base = torch.empty(1, h, w, 3, dtype=dtype, device=device)
        base[..., 0].copy_(torch.linspace(-w * 0.5 + 0.5, w * 0.5 + 0.5 - 1, steps=w, device=device))
        base[..., 1].copy_(torch.linspace(-h * 0.5 + 0.5, h * 0.5 + 0.5 - 1, steps=h, device=device).unsqueeze_(-1))
        base[..., 2].fill_(1)
        _BASE_GRIDS[key] = base.view(1, h * w, 3)
    return _BASE_GRIDS[key]


def _grid_fp64(base: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """`base.bmm(theta)` for the base grid (1, h·w, 3) and a (1, 3, 2) matrix, both fp64, as two
    multiply-adds over the pixels: x·θ₀ + y·θ₁ + θ₂. cuBLAS runs the fp64 product (inner size 3,
    outer 2) as a general matrix product, ~1 ms of a 16-view step in session 29's profiles; this is
    two element-wise passes. The same numbers: each product of a half-integer pixel centre (≤ 11
    bits) and an fp32 entry (24 bits) is exact in fp64, and so is their sum unless the two products'
    magnitudes lie ~2¹⁸ apart (angles near 0), where the sum's last fp64 bit may differ, and then
    the grid rounded to fp32 almost never does (tests/test_fidelity_textual_inversion.py: equal to
    the product after that rounding, tiny angles included)."""
    t = theta[0]
    return torch.addcmul(t[2], base[0, :, :1], t[0]).addcmul_(base[0, :, 1:2], t[1])[None]


def _rotation(degrees: float, fill: float):
    """torchvision's RandomRotation(degrees, fill=fill) for image tensors: the same draw of the angle
    and the same pixels, without its host syncs. torchvision makes the rotation's 2×3 matrix and the
    grid's scale as tensors on the image's device from Python lists (a copy that waits for the GPU's
    queue, two a view), rotates the image with a channel of ones beside it and, with nearest
    sampling, puts the fill where that channel came out 0 by boolean indexing (`img[mask] =
    fill[mask]`: two `nonzero`s a view, each a wait for the GPU). Session 21's audit: 24 syncs a
    step of 16 views. Here the matrix is scaled on the host (the same IEEE division) and sent without
    waiting (core.perf.to_device), the base grid is made once, the fill is `torch.where`; the grid's
    matmul never runs in TF32 (a TF32 grid moves nearest samples by up to ~0.2 px at 640²; the
    example's augmentation is PIL's, on the CPU, exact): on the CPU it is torchvision's fp32 matmul,
    on a GPU the same product in fp64 as multiply-adds (`_grid_fp64`) rounded to fp32 once, which
    flips no process-wide TF32 switch, so the views can
    be made on a thread of their own while the step's text encoder runs in TF32
    (textual_inversion.prefetch)."""
    import torchvision.transforms.functional as TF
    from torchvision import transforms as T

    class RandomRotation(T.RandomRotation):
        def forward(self, img):
            if (not isinstance(img, torch.Tensor) or self.interpolation != TF.InterpolationMode.NEAREST
                    or self.expand or self.center is not None or not img.is_floating_point()):
                return super().forward(img)
            angle = self.get_params(self.degrees)  # the draw RandomRotation.forward makes
            # TF.rotate's matrix (its angle negated) and _gen_affine_grid's scaling, on the host
            matrix = TF._get_inverse_affine_matrix([0.0, 0.0], -angle, [0.0, 0.0], 1.0, [0.0, 0.0])
            h, w = img.shape[-2:]
            theta = torch.tensor(matrix, dtype=img.dtype).reshape(1, 2, 3)
            theta = theta.transpose(1, 2) / torch.tensor([0.5 * w, 0.5 * h], dtype=img.dtype)
            if img.is_cuda:  # in fp64, rounded to fp32 once: no TF32 setting (the step's, read by the
                # prefetch thread too) reaches it, and no process-wide switch is flipped here
                grid = _grid_fp64(_base_grid(h, w, torch.float64, img.device),
                                  to_device(theta, img.device, torch.float64)).to(img.dtype).view(1, h, w, 2)
            else:  # torchvision's fp32 matmul (no TF32 setting reaches a CPU's)
                grid = _base_grid(h, w, img.dtype, img.device).bmm(theta).view(1, h, w, 2)
            batch = img if img.dim() == 4 else img[None]
            with_ones = torch.cat([batch, torch.ones_like(batch[:, :1])], 1)
            out = F.grid_sample(with_ones, grid.expand(batch.shape[0], h, w, 2), mode="nearest",
                                padding_mode="zeros", align_corners=False)
            outside = out[:, -1:] < 0.5  # no source pixel: the fill
            f = self.fill
            f = float(f) if isinstance(f, (int, float)) else to_device(
                torch.tensor([float(v) for v in f], dtype=out.dtype).view(-1, 1, 1), out.device)
            out = torch.where(outside, f, out[:, :-1])
            return out if img.dim() == 4 else out[0]

    return RandomRotation(degrees=degrees, fill=fill)


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """torchvision's `_hsv2rgb` (its `adjust_hue`'s way back to RGB) to the bit, but for its last step:
    each pixel's sextant i picks its (r, g, b) from six candidates, which torchvision writes as an
    einsum of the one-hot sextant mask with the candidates. On a GPU that einsum is a batched
    matrix-vector product, a 1 × 6 by 6 × 3 product a pixel (cuBLAS's `gemv2N`; most likely the ~45
    launches and 3.5–4.7 ms of the card a batch of 16 views at 512² in session 29's profiles:
    reports/speed, session 30). Here it is the gather it amounts to. The einsum's sum adds ±0s to
    the picked value, which is exact, and leaves a picked −0 as +0, as the `+ 0.0` does here: the
    same bits."""
    h, s, v = hsv.unbind(dim=-3)
    sector = torch.floor(h * 6.0)
    frac = (h * 6.0) - sector
    p = torch.clamp(v * (1.0 - s), 0.0, 1.0)
    q = torch.clamp(v * (1.0 - s * frac), 0.0, 1.0)
    t = torch.clamp(v * (1.0 - s * (1.0 - frac)), 0.0, 1.0)
    sector = sector.to(torch.int32) % 6
    candidates = torch.stack([torch.stack(c, dim=-3) for c in ((v, q, p, p, t, v), (t, v, v, q, p, p),
                                                                (p, p, t, v, v, q))], dim=-4)  # (…, 3, 6, H, W)
    pick = sector.long()[..., None, None, :, :].expand(*candidates.shape[:-3], 1, *candidates.shape[-2:])
    return candidates.gather(-3, pick).squeeze(-3) + 0.0


def _adjust_hue(img: torch.Tensor, hue_factor: float) -> torch.Tensor:
    """torchvision's adjust_hue for a float RGB image tensor, with `_hsv_to_rgb` (anything else: its own)."""
    import torchvision.transforms._functional_tensor as F_t
    import torchvision.transforms.functional as TF

    if not (isinstance(img, torch.Tensor) and img.dtype == torch.float32 and img.dim() >= 3 and img.shape[-3] == 3
            and -0.5 <= hue_factor <= 0.5):
        return TF.adjust_hue(img, hue_factor)
    h, s, v = F_t._rgb2hsv(img).unbind(dim=-3)
    return _hsv_to_rgb(torch.stack(((h + hue_factor) % 1.0, s, v), dim=-3))


def _color_jitter(brightness: float, contrast: float, saturation: float, hue: float):
    """torchvision's ColorJitter (the same draws, the same order of adjustments) with its hue on
    `_adjust_hue`."""
    import torchvision.transforms.functional as TF
    from torchvision import transforms as T

    class ColorJitter(T.ColorJitter):
        def forward(self, img):
            order, b, c, s, h = self.get_params(self.brightness, self.contrast, self.saturation, self.hue)
            for k in order:  # torchvision's ColorJitter.forward, the hue's function aside
                if k == 0 and b is not None:
                    img = TF.adjust_brightness(img, b)
                elif k == 1 and c is not None:
                    img = TF.adjust_contrast(img, c)
                elif k == 2 and s is not None:
                    img = TF.adjust_saturation(img, s)
                elif k == 3 and h is not None:
                    img = _adjust_hue(img, h)
            return img

    return ColorJitter(brightness, contrast, saturation, hue)


def released_pipeline(size: int):
    """The example's `--use_augmentations` pipeline as torchvision transforms, in two parts: what
    draws nothing (resize to 5/4·size and centre-crop it square: the same for every view) and what
    draws (the rest, per view). Its rotation is torchvision's without the host syncs (`_rotation`), its
    colour jitter torchvision's with the hue's last step a gather (`_hsv_to_rgb`): the same views."""
    from torchvision import transforms as T

    big, small = int(size * 5 / 4), int(size * 5 / 6)
    fixed = T.Compose([T.Resize(big, antialias=True), T.CenterCrop(big)])
    drawn = T.Compose([
        T.RandomApply([_rotation(10, 1.0), T.CenterCrop(small), T.Resize(size, antialias=True)], p=0.75),
        T.RandomResizedCrop(size, scale=(0.85, 1.15), antialias=True),
        T.RandomApply([_color_jitter(0.04, 0.04, 0.04, 0.04)], p=0.75),
        T.RandomGrayscale(p=0.10),
        T.RandomApply([T.GaussianBlur(5, (0.1, 2))], p=0.10),
        T.RandomHorizontalFlip(),
    ])
    return fixed, drawn


class ReleasedAugment:
    """n views (n, 3, size, size) in [0, 1] of `rgb` by the example's `--use_augmentations` pipeline,
    with torchvision's transforms on the image tensor: resize to 5/4·size (and centre-crop it square);
    with p = 0.75 rotate by up to ±10° (white fill), centre-crop 5/6·size and resize to size; a
    random resized crop to size of 85–115% of the area; with p = 0.75 colour jitter 0.04; grey with
    p = 0.1; with p = 0.1 a 5×5 Gaussian blur, σ ∈ [0.1, 2]; a horizontal flip with p = 0.5.
    torchvision draws from the global generator: it is forked and seeded from `generator`. The
    transforms run on `device` (default: rgb's) — on a GPU they cost milliseconds where the CPU took
    ~1.5 s a batch of 16 at 512² (2 cores), most of a step; their random parameters come from the
    CPU stream either way, so a device changes only the interpolation's rounding.

    The first resize and crop draw nothing, so they are made once, here, not once a view: the same
    views (tests/test_fidelity_textual_inversion.py), one antialiased resize of three fewer a view."""

    def __init__(self, rgb: torch.Tensor, size: int, device: Optional[torch.device | str] = None):
        fixed, self.drawn = released_pipeline(size)
        self.base = fixed(rgb.float().to(device if device is not None else rgb.device))

    @staticmethod
    def draw_seed(generator: torch.Generator) -> int:
        """The one number a call draws from `generator`: the seed of its views."""
        return int(torch.randint(0, 2 ** 62, (1,), generator=generator).item())

    def __call__(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self.views(n, self.draw_seed(generator))

    def views(self, n: int, seed: int) -> torch.Tensor:
        """The n views of `seed` (torchvision's global stream seeded with it, then restored)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            views = [self.drawn(self.base) for _ in range(n)]
        return torch.stack(views).clamp(0, 1)


def released_augment(rgb: torch.Tensor, n: int, size: int, generator: torch.Generator,
                     device: Optional[torch.device | str] = None) -> torch.Tensor:
    """ReleasedAugment(rgb, size, device)(n, generator): n views of one call."""
    return ReleasedAugment(rgb, size, device)(n, generator)


def augment_views(rgb: torch.Tensor, mask: Optional[torch.Tensor], n: int, size: int,
                  generator: torch.Generator, fill: float = 1.0) -> torch.Tensor:
    """n augmented views (n, 3, size, size) in [0, 1] of the object on white: a random square
    crop around the object (the object spans 60–90% of it, centre jittered by ±4%) and a random
    horizontal flip; outside the image is `fill` (white; 0 for an image on black)."""
    _, h, w = rgb.shape
    if mask is not None and mask.sum() > 0:
        ys, xs = torch.nonzero(mask[0] > 0.5, as_tuple=True)
        y0, y1, x0, x1 = ys.min().item(), ys.max().item() + 1, xs.min().item(), xs.max().item() + 1
    else:
        y0, y1, x0, x1 = 0, h, 0, w
    cy, cx, obj = (y0 + y1) / 2, (x0 + x1) / 2, max(y1 - y0, x1 - x0)
    views = []
    for _ in range(n):
        r = torch.rand(4, generator=generator)
        s = obj / (0.6 + 0.3 * r[0].item())
        oy, ox = (r[1].item() - 0.5) * 0.08 * s, (r[2].item() - 0.5) * 0.08 * s
        # an affine crop with white outside the image
        theta = torch.tensor([[s / w, 0.0, 2 * (cx + ox) / w - 1], [0.0, s / h, 2 * (cy + oy) / h - 1]])
        grid = F.affine_grid(theta[None], [1, 3, size, size], align_corners=False).to(rgb)
        v = F.grid_sample(rgb[None] - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
        if r[3].item() < 0.5:
            v = v.flip(-1)
        views.append(v)
    return torch.cat(views).clamp(0, 1)


CHECKPOINT_FORMAT = "lift3d-textual-inversion-1"


def _write_checkpoint(path, digest: str, token: str, emb_weight: torch.Tensor, token_id: int, opt, gen: torch.Generator,
                      step: int, micro: int, elapsed: float) -> None:
    """Only the new row matters: every other row is put back after each step, and AdamW is
    element-wise, so the row, its two moments and the step count continue the run exactly."""
    state = opt.state.get(emb_weight, {})
    row = lambda name: state[name][token_id].detach().float().cpu().clone() if name in state else None  # noqa: E731
    atomic_torch_save({"format": CHECKPOINT_FORMAT, "digest": digest, "token": token, "width": emb_weight.shape[1],
                       "step": step, "micro": micro, "elapsed": elapsed,
                       "row": emb_weight[token_id].detach().float().cpu().clone(),
                       "exp_avg": row("exp_avg"), "exp_avg_sq": row("exp_avg_sq"),
                       "adam_step": float(state["step"]) if "step" in state else 0.0,
                       "generator": gen.get_state()}, Path(path))


def _read_checkpoint(path, digest: str, token: str, width: int) -> Optional[dict]:
    """The checkpoint at `path` when it continues this run; None (start afresh) otherwise."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated file: start afresh, as the stages do
        log.warning("textual inversion: %s is unreadable (%s); starting afresh", path, type(e).__name__)
        return None
    if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
        log.warning("textual inversion: %s is not a textual-inversion checkpoint; starting afresh", path)
        return None
    if (saved["digest"], saved["token"], saved["width"]) != (digest, token, width):
        log.warning("textual inversion: %s was made with other settings; starting afresh", path)
        return None
    return saved


def _restore(saved: dict, emb_weight: torch.Tensor, token_id: int, opt, gen: torch.Generator) -> None:
    with torch.no_grad():
        emb_weight[token_id] = saved["row"].to(emb_weight)
    if saved["exp_avg"] is not None:
        state = opt.state[emb_weight]
        state["step"] = torch.tensor(saved["adam_step"], dtype=torch.float32)
        for name in ("exp_avg", "exp_avg_sq"):
            moment = torch.zeros_like(emb_weight, memory_format=torch.preserve_format)
            moment[token_id] = saved[name].to(moment)
            state[name] = moment
    gen.set_state(saved["generator"])


def learn_token(parts: Any, rgb: torch.Tensor, mask: Optional[torch.Tensor] = None, *, token: str = "<e>",
                initializer: str = "object", steps: int = 3000, lr: float = 1e-4, batch_size: int = 16,
                resolution: int = 512, seed: int = 0, out: Optional[Path | str] = None,
                callback=None, scale_lr: bool = False, gradient_accumulation: int = 1, repeats: Optional[int] = 100,
                weight_decay: float = 1e-2, adam_betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8,
                augmentation: str = "released", background: str = "black", vae_input: str = "unit",
                compile: str = "none", layout: str = "auto", overlap: bool = False, tf32: bool = False,
                prefetch: bool = False,
                progress: bool = True,
                checkpoint: Optional[Path | str] = None,
                checkpoint_every: int = 500, digest: str = "", stats: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """Learn a token for the object in `rgb` (3, H, W) on white. `parts` is a StableDiffusionParts
    (core.guidance.sd). Only the new embedding row trains. Returns {token: embedding}; writes it to
    `out` (learned_embeds.bin) when given. The defaults are the released recipe
    (params.textual_inversion; `learn_token_from_params` passes them all); a tqdm bar shows the
    steps unless `progress` is False. `compile` 'default' runs the VAE encoder and the UNet (forward
    and backward) under torch.compile on a GPU for the full batch (the epoch's short last batch runs
    eagerly); 'graphs' also replays each batch size's whole micro-batch (encoder, noising, text
    encoder, UNet, loss and backward: the same kernels) as one CUDA graph, so the host queues it with
    a few copies and one launch; the optimiser's step stays outside. `layout` 'channels_last' has
    Inductor lay both compiled graphs out channels-last (its heuristics leave them NCHW, and cuDNN
    converts every convolution's input and output: session 29).
    `overlap` (GPU): the host queues a step while the GPU runs the one before (the same numbers).
    `tf32` (GPU): the fp32 text encoder's matmuls, forward and backward, on the tensor cores in TF32
    (10-bit mantissas, fp32 range and sums); the process's setting is restored after the loop.
    `prefetch` (augmentation 'released'): the next batch's views are made on a thread of their own
    while this step is queued (its seed drawn when the plain loop draws it: the same numbers), so
    their ~3,500 small operators a batch of 16 leave the host's path; not across a checkpoint.

    `checkpoint`: a file the state is written to every `checkpoint_every` steps and at the end (the
    new row, its AdamW moments and step count, the random stream; a few kB) and resumed from when it
    holds the same `digest` (of the settings) and token: a run stopped and started again ends with
    the row an uninterrupted one learns. `stats`, when given, gets steps_run, resumed_from and
    loop_seconds (over every run of this checkpoint), and with `prefetch` views_seconds (the thread's
    making them) and views_wait_seconds (the loop's waiting for them), this run's."""
    from tqdm import tqdm

    from core.guidance.sd import compile_vae_moments, encode_images, inductor_kwargs, latent_shape, vae_moments
    from core.guidance.sds import sample_timesteps

    if augmentation not in ("released", "crop"):
        raise ValueError(f"textual inversion: unknown augmentation {augmentation!r} (released, crop)")
    if vae_input not in ("unit", "signed"):
        raise ValueError(f"textual inversion: unknown vae_input {vae_input!r} (unit, signed)")
    if compile not in ("none", "default", "graphs"):
        raise ValueError(f"textual inversion: unknown compile {compile!r} (none, default, graphs)")

    tok, te, vae, unet, sched = parts.tokenizer, parts.text_encoder, parts.vae, parts.unet, parts.scheduler
    device = next(unet.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    token_id = add_token(tok, te, token, initializer=initializer)
    te.to(torch.float32)  # the trained row in fp32 (the UNet/VAE may be fp16)
    emb_weight = te.get_input_embeddings().weight
    emb_weight.requires_grad_(True)
    original = emb_weight.detach().clone()
    lr_used = textual_inversion_lr(lr, batch_size, gradient_accumulation, scale_lr)
    opt = torch.optim.AdamW([emb_weight], lr=lr_used, betas=tuple(adam_betas), eps=adam_eps,
                            weight_decay=weight_decay)
    start, micro, before = 0, 0, 0.0  # micro: DataLoader batches drawn (gradient_accumulation per optimiser step)
    saved = _read_checkpoint(checkpoint, digest, token, emb_weight.shape[1]) if checkpoint is not None else None
    if saved is not None:
        start, micro, before = int(saved["step"]), int(saved["micro"]), float(saved["elapsed"])
        _restore(saved, emb_weight, token_id, opt, gen)
        log.info("textual inversion: resuming from step %d (%s)", start, checkpoint)
    mask = mask.detach().float().cpu() if mask is not None else None
    rgb = on_background(rgb.detach().float().cpu(), mask, background)
    udtype = next(unet.parameters()).dtype
    # compiled for the full batch only: the epoch's short last batch (100 mod 16 = 4 images, one step
    # in seven) runs eagerly, so one shape is compiled instead of two (session 11: ~230 s for both)
    inductor = "none" if compile == "none" else "default"  # 'graphs' replays Inductor's kernels
    if layout not in ("auto", "channels_last"):
        raise ValueError(f"textual inversion: unknown layout {layout!r} (auto, channels_last)")
    cl = layout == "channels_last" and inductor != "none"
    moments, unet_step = compile_vae_moments(inductor, device, channels_last=cl), unet
    if inductor != "none" and device.type == "cuda":
        unet_step = torch.compile(unet, dynamic=False, **inductor_kwargs(inductor, cl))
    te.train()
    bar = tqdm(total=steps, initial=min(start, steps), desc="textual inversion", disable=not progress,
               dynamic_ncols=True)
    # overlap: the augmentation runs on a stream of its own (its small host→GPU copies wait for that
    # stream only) and each step's loss is read back after the next step is queued, so the host
    # prepares step k+1 while the GPU runs step k; the same numbers as without
    side = torch.cuda.Stream(device) if overlap and device.type == "cuda" else None
    t_loop = time.perf_counter()
    elapsed = before  # the loop's seconds to the end of the last finished step, over every run

    def due(step: int) -> bool:  # a checkpoint after this step
        return checkpoint is not None and ((step + 1) % max(1, checkpoint_every) == 0 or step == steps - 1)

    released = ReleasedAugment(rgb, resolution, device) if augmentation == "released" else None
    if side is not None:  # the side stream reads the fixed part made on this one
        side.wait_stream(torch.cuda.current_stream(device))

    # prefetch: one thread makes the next micro-batch's views (on the side stream on a GPU) while
    # this thread queues the step; `ahead` holds (n, the future of (views, their end on the side
    # stream)). The seed is drawn from `gen` right after this batch's last draw, where the next
    # batch's own call would draw it, so the stream of draws is the plain loop's
    pool = (ThreadPoolExecutor(1, thread_name_prefix="lift3d-ti-views")
            if prefetch and released is not None else None)
    ahead: Optional[tuple[int, Future]] = None

    def make(n: int, seed: int):
        """The views of `seed` (on the side stream when there is one) and the event they end with."""
        if side is None:
            return released.views(n, seed), None
        with torch.cuda.stream(side):
            images = released.views(n, seed)
            done = torch.cuda.Event()
            done.record(side)
        return images, done

    # prefetch: the thread's seconds making views (its host's, the interpreter's lock included) and
    # this thread's seconds waiting for them: a step held up by its views shows here (stats)
    views_clock = {"views_seconds": 0.0, "views_wait_seconds": 0.0}

    def made_ahead(n: int, seed: int):
        t0 = time.perf_counter()
        with scope("lift3d.ti.augment"):
            made = make(n, seed)
        views_clock["views_seconds"] += time.perf_counter() - t0
        return made

    def augmented(n: int) -> torch.Tensor:
        nonlocal ahead
        if released is None:
            return augment_views(rgb, mask, n, resolution, gen, fill=0.0 if background == "black" else 1.0).to(device)
        if ahead is not None:
            (n_ahead, future), ahead = ahead, None
            assert n_ahead == n, (n_ahead, n)
            t0 = time.perf_counter()
            images, done = future.result()
            views_clock["views_wait_seconds"] += time.perf_counter() - t0
        else:
            images, done = make(n, released.draw_seed(gen))
        if done is not None:  # wait for these views only (not for a next batch's on the side stream)
            main = torch.cuda.current_stream(device)
            main.wait_event(done)
            images.record_stream(main)
        return images

    def micro_batch(images: torch.Tensor, eps: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                    ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One micro-batch's loss and the new row's gradient (of the loss / gradient_accumulation),
        from the host's draws already on the device: no host work, so capturable as a CUDA graph."""
        n = images.shape[0]
        moments_n, unet_n = (moments, unet_step) if n == batch_size else (vae_moments, unet)
        if vae_input == "unit":  # the released effect: [0, 1] images taken as [-1, 1] ones
            images = (images + 1.0) / 2.0  # encode_images maps x → 2x − 1, so the VAE sees the [0, 1] image
        with torch.no_grad(), scope("lift3d.ti.vae_encode"):
            latents = encode_images(vae, images, moments=moments_n, noise=eps)
        noisy = sched.add_noise(latents, noise, t)
        with scope("lift3d.ti.text_encoder"):
            states = te(ids)[0].to(udtype)
        with scope("lift3d.ti.unet"):
            pred = unet_n(noisy.to(udtype), t, encoder_hidden_states=states).sample
            loss = F.mse_loss(pred.float(), noise.float())  # ε-prediction MSE
        with scope("lift3d.ti.backward"):  # accelerate's accumulation: the mean
            (grad,) = torch.autograd.grad(loss / gradient_accumulation, emb_weight)
        return loss.detach(), grad

    # compile 'graphs': each batch size's micro-batch replayed as one CUDA graph (its draws copied in)
    graphed = compile == "graphs" and device.type == "cuda"
    micro_step = GraphedCall(micro_batch, warmup=2, grad=True) if graphed else micro_batch
    vdtype = next(vae.parameters()).dtype

    def one_step(step: int) -> torch.Tensor:
        """Queue one optimiser step; its loss (a device scalar, the mean over accumulation)."""
        nonlocal micro, ahead
        total, grad = torch.zeros((), device=device), None  # the row's gradient, set on it for the step
        for k in range(gradient_accumulation):
            n = batch_size_at(micro, batch_size, repeats)
            micro += 1
            with scope("lift3d.ti.augment"):
                images = augmented(n)
            # the host's draws in the released loop's order: the posterior's sample, the noise, the
            # timesteps, the prompts (then the next batch's views' seed)
            eps = to_device(torch.randn(latent_shape(vae, n, *images.shape[-2:]), generator=gen), device, vdtype)
            noise = to_device(torch.randn(eps.shape, generator=gen), device)
            t = to_device(sample_timesteps(n, sched.config.num_train_timesteps, (0.0, 0.999), gen), device)
            prompts = [IMAGENET_TEMPLATES_SMALL[int(i)].format(token)
                       for i in torch.randint(len(IMAGENET_TEMPLATES_SMALL), (n,), generator=gen)]
            # the next batch's views, unless a checkpoint (which saves the stream) or the end comes first
            if pool is not None and (k + 1 < gradient_accumulation or (step + 1 < steps and not due(step))):
                n_next = batch_size_at(micro, batch_size, repeats)
                ahead = (n_next, pool.submit(made_ahead, n_next, released.draw_seed(gen)))
            ids = to_device(tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                                return_tensors="pt").input_ids, device)
            # a replay is one scope (those inside ran at its capture); a capture is no step's time
            replay = graphed and micro_step.ready(images, eps, noise, t, ids)
            with scope("lift3d.ti.graph") if replay else contextlib.nullcontext():
                loss, g = micro_step(images, eps, noise, t, ids)
            total += loss / gradient_accumulation
            # summed as the engine accumulates .grad; a graph's gradient is overwritten by its next replay
            grad = (g.clone() if k + 1 < gradient_accumulation else g) if grad is None else grad + g
        with scope("lift3d.ti.optimizer"):
            emb_weight.grad = grad
            opt.step()
            with torch.no_grad():  # only the new row changes: every other row back as it was
                row = emb_weight[token_id].clone()
                emb_weight.copy_(original)
                emb_weight[token_id] = row
        return total

    def finish(step: int, loss: torch.Tensor) -> None:
        """What needs the loss on the host: the callback, the bar, the finite check, the checkpoint."""
        nonlocal elapsed
        total = float(loss)
        elapsed = before + time.perf_counter() - t_loop
        if callback is not None:
            callback(step, total)
        bar.update(1)
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{total:.4f}")
        if not math.isfinite(total):
            raise RuntimeError(f"textual inversion diverged at step {step} (loss {total})")
        if due(step):
            _write_checkpoint(checkpoint, digest, token, emb_weight, token_id, opt, gen, step + 1, micro, elapsed)

    pending: Optional[tuple[int, torch.Tensor]] = None
    try:
        for step in range(start, steps):
            with tf32_matmuls(tf32 and device.type == "cuda"):
                loss = one_step(step)
            if pending is not None:  # overlap: the step before, read now that this one is queued
                finish(*pending)
            pending = (step, loss)
            if side is None or due(step):  # a checkpoint saves the random stream as of this step
                finish(*pending)
                pending = None
        if pending is not None:
            finish(*pending)
    finally:
        bar.close()
        if pool is not None:  # a step that failed may leave views being made: let them finish
            pool.shutdown(wait=True)
    if stats is not None:
        stats.update(steps_run=max(0, steps - start), resumed_from=start, loop_seconds_before=before,
                     loop_seconds=elapsed, **(views_clock if pool is not None else {}))
    # the last step's gradient (the vocabulary's rows: 152 MB at SD's size, in a graph's pool when graphed)
    # is not kept through the stages after this one
    emb_weight.grad = None
    emb_weight.requires_grad_(False)
    te.eval()
    learned = {token: emb_weight[token_id].detach().float().cpu().clone()}
    if out is not None:
        save_learned_embeds(out, learned)
        log.info("textual inversion: %d steps, token %s saved to %s", steps, token, out)
    return learned


def learn_token_from_params(parts: Any, rgb: torch.Tensor, mask: Optional[torch.Tensor], params, *,
                            out: Optional[Path | str] = None, callback=None, progress: bool = True,
                            checkpoint: Optional[Path | str] = None, digest: str = "",
                            stats: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """learn_token with every setting of params.textual_inversion (and the SD resolution and seed);
    `prefetch` on a GPU only (on a CPU the thread would share the step's cores)."""
    ti = params.textual_inversion
    return learn_token(parts, rgb, mask, token=ti.placeholder, initializer=ti.initializer, steps=ti.steps, lr=ti.lr,
                       batch_size=ti.batch_size, resolution=params.sd.resolution, seed=params.seed, out=out,
                       callback=callback, scale_lr=ti.scale_lr, gradient_accumulation=ti.gradient_accumulation,
                       repeats=ti.repeats, weight_decay=ti.weight_decay, adam_betas=tuple(ti.adam_betas),
                       adam_eps=ti.adam_eps, augmentation=ti.augmentation, background=ti.background,
                       vae_input=ti.vae_input, compile=ti.compile, layout=ti.layout, overlap=ti.overlap, tf32=ti.tf32,
                       prefetch=ti.prefetch and next(parts.unet.parameters()).is_cuda,  # GPU only
                       progress=progress, checkpoint=checkpoint,
                       checkpoint_every=ti.checkpoint_every, digest=digest, stats=stats)
