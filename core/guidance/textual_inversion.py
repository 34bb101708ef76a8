"""Textual inversion (Gal et al.): a token <e> for the reference image (Magic123 §2.2, RealFusion).

The recipe of diffusers' `textual_inversion` example: augmented views of the object on white
(random crops and flips), the small set of ImageNet-style templates ("a photo of a {}", …), a new
token whose embedding row — and only that row — trains, initialised from an existing word's
embedding, with the MSE between the UNet's noise prediction and the added noise (t ~ U[0, T)).

Files are the benchmark folders' format: a `torch.save`d dict `{token: float32 tensor[D]}` named
`learned_embeds.bin`; D is 768 for SD 1.5 (the benchmark files), 1024 for SD 2.x.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from core.errors import InputError
from core.io import atomic_torch_save

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
def augment_views(rgb: torch.Tensor, mask: Optional[torch.Tensor], n: int, size: int,
                  generator: torch.Generator) -> torch.Tensor:
    """n augmented views (n, 3, size, size) in [0, 1] of the object on white: a random square
    crop around the object (the object spans 60–90% of it, centre jittered by ±4%) and a random
    horizontal flip; outside the image is white."""
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
        v = F.grid_sample(rgb[None] - 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 1.0
        if r[3].item() < 0.5:
            v = v.flip(-1)
        views.append(v)
    return torch.cat(views).clamp(0, 1)


def learn_token(parts: Any, rgb: torch.Tensor, mask: Optional[torch.Tensor] = None, *, token: str = "<e>",
                initializer: str = "object", steps: int = 3000, lr: float = 5e-3, batch_size: int = 4,
                resolution: int = 512, seed: int = 0, out: Optional[Path | str] = None,
                callback=None) -> dict[str, torch.Tensor]:
    """Learn a token for the object in `rgb` (3, H, W) on white. `parts` is a StableDiffusionParts
    (core.guidance.sd). Only the new embedding row trains. Returns {token: embedding}; writes it to
    `out` (learned_embeds.bin) when given."""
    from core.guidance.sd import encode_images
    from core.guidance.sds import sample_timesteps

    tok, te, vae, unet, sched = parts.tokenizer, parts.text_encoder, parts.vae, parts.unet, parts.scheduler
    device = next(unet.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    token_id = add_token(tok, te, token, initializer=initializer)
    te.to(torch.float32)  # the trained row in fp32 (the UNet/VAE may be fp16)
    emb_weight = te.get_input_embeddings().weight
    emb_weight.requires_grad_(True)
    original = emb_weight.detach().clone()
    keep = torch.ones(emb_weight.shape[0], dtype=torch.bool, device=emb_weight.device)
    keep[token_id] = False
    opt = torch.optim.AdamW([emb_weight], lr=lr, weight_decay=0.0)
    rgb = rgb.detach().float().cpu()
    mask = mask.detach().float().cpu() if mask is not None else None
    udtype = next(unet.parameters()).dtype
    te.train()
    for step in range(steps):
        images = augment_views(rgb, mask, batch_size, resolution, gen).to(device)
        with torch.no_grad():
            latents = encode_images(vae, images, gen)
        noise = torch.randn(latents.shape, generator=gen).to(device)
        t = sample_timesteps(batch_size, sched.config.num_train_timesteps, (0.0, 0.999), gen).to(device)
        noisy = sched.add_noise(latents, noise, t)
        prompts = [IMAGENET_TEMPLATES_SMALL[int(i)].format(token)
                   for i in torch.randint(len(IMAGENET_TEMPLATES_SMALL), (batch_size,), generator=gen)]
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        states = te(ids)[0].to(udtype)
        pred = unet(noisy.to(udtype), t, encoder_hidden_states=states).sample
        loss = F.mse_loss(pred.float(), noise.float())  # ε-prediction MSE
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # only the new row changes
            emb_weight[keep] = original[keep]
        if callback is not None:
            callback(step, float(loss.detach()))
        if not math.isfinite(float(loss.detach())):
            raise RuntimeError(f"textual inversion diverged at step {step} (loss {float(loss)})")
    emb_weight.requires_grad_(False)
    te.eval()
    learned = {token: emb_weight[token_id].detach().float().cpu().clone()}
    if out is not None:
        save_learned_embeds(out, learned)
        log.info("textual inversion: %d steps, token %s saved to %s", steps, token, out)
    return learned
