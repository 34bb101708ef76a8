"""The 2D prior: score distillation with Stable Diffusion (Magic123 eq. 5, Consistent123 eq. 7).

The render is resized to 512×512 (params.sd.resolution), encoded by the VAE *with* the gradient
through the encoder (the ∂z/∂I term of eq. 5 is kept), noised at t ~ U[0.2, 0.6]·T, and the UNet
predicts the noise under no_grad with classifier-free guidance (scale 100). The gradient
w(t)(ε̂ − ε) is injected into the latent (core.guidance.sds). The text condition is the prompt
"A high-resolution DSLR image of <e>" with <e> a textual-inversion token (core.guidance.textual_inversion),
or a plain description. Weights are fp16 on a GPU (params.sd.fp16) and fp32 on the CPU.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from core.errors import InputError
from core.guidance.base import GuidanceOutput, RenderBatch
from core.guidance.sds import classifier_free_guidance, score_distillation
from core.models.loader import load_pretrained

log = logging.getLogger(__name__)


def weights_dtype(device: torch.device | str, fp16: bool) -> torch.dtype:
    """fp16 weights on a GPU when asked; fp32 on the CPU (CPU fp16 convolutions are slow/missing)."""
    return torch.float16 if fp16 and torch.device(device).type == "cuda" else torch.float32


def compile_unet(unet, mode: str, device):
    """torch.compile a UNet for SDS (fixed shapes, no grad) on a GPU; eager elsewhere or for 'none'.
    'reduce-overhead' captures CUDA graphs: the UNet's many small kernels are launch-bound eagerly."""
    if mode == "none" or torch.device(device).type != "cuda":
        return unet
    log.info("UNet: torch.compile(mode=%r)", mode)
    return torch.compile(unet, mode=mode, dynamic=False)


@dataclass
class StableDiffusionParts:
    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    scheduler: Any


def load_stable_diffusion(name: str, device, dtype: torch.dtype, models_params=None, key: str = "sd.model",
                          text_encoder_dtype: Optional[torch.dtype] = None) -> StableDiffusionParts:
    """Tokenizer, text encoder, VAE, UNet and noise schedule of a Stable Diffusion (hub id or folder)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kw = dict(key=key, models_params=models_params)
    tokenizer = load_pretrained(CLIPTokenizer, name, subfolder="tokenizer", **kw)
    text_encoder = load_pretrained(CLIPTextModel, name, subfolder="text_encoder", **kw)
    vae = load_pretrained(AutoencoderKL, name, subfolder="vae", torch_dtype=dtype, **kw)
    unet = load_pretrained(UNet2DConditionModel, name, subfolder="unet", torch_dtype=dtype, **kw)
    scheduler = load_pretrained(DDPMScheduler, name, subfolder="scheduler", **kw)
    text_encoder.to(device, dtype=text_encoder_dtype or dtype).eval().requires_grad_(False)
    vae.to(device, dtype=dtype).eval().requires_grad_(False)
    unet.to(device, dtype=dtype).eval().requires_grad_(False)
    return StableDiffusionParts(tokenizer, text_encoder, vae, unet, scheduler)


def compose_prompt(template: str, placeholder: str, token: Optional[str], text: Optional[str]) -> str:
    """Magic123's "A high-resolution DSLR image of <e>" with <e> the learned token, or a plain
    description: '{text}' in the template is the description (Consistent123), and without a token
    the placeholder is replaced by the description too."""
    subject = token or text
    if subject is None:
        raise InputError(
            "the 2D prior needs a prompt: pass --text 'a description of the object' or --embeds "
            "learned_embeds.bin (or enable textual inversion: --set textual_inversion.enabled=true)"
        )
    prompt = template.replace("{text}", text or subject)
    return prompt.replace(placeholder, subject)


@torch.no_grad()
def encode_prompts(parts: StableDiffusionParts, prompts: list[str]) -> torch.Tensor:
    """CLIP text embeddings (N, 77, D) of the prompts, padded to the tokenizer's max length."""
    tok = parts.tokenizer(prompts, padding="max_length", max_length=parts.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt")
    dev = next(parts.text_encoder.parameters()).device
    return parts.text_encoder(tok.input_ids.to(dev))[0]


def encode_images(vae, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Images in [0, 1] → scaled VAE latents, differentiable (the ∂z/∂I of eq. 5)."""
    dtype = next(vae.parameters()).dtype
    posterior = vae.encode(images.to(dtype) * 2.0 - 1.0).latent_dist
    z = posterior.mean + posterior.std * torch.randn(
        posterior.mean.shape, generator=generator, device="cpu").to(posterior.mean)  # .sample(), seeded
    return z.float() * vae.config.scaling_factor


class StableDiffusionGuidance:
    """L_2D of Magic123 eq. 5 for a batch of renders."""

    def __init__(self, parts: StableDiffusionParts, prompt: str, *, guidance_scale: float = 100.0,
                 t_range: tuple[float, float] = (0.2, 0.6), resolution: int = 512, seed: int = 0,
                 negative_prompt: str = ""):
        self.parts = parts
        self.prompt = prompt
        self.guidance_scale = float(guidance_scale)
        self.t_range = tuple(t_range)
        self.resolution = int(resolution)
        self.device = next(parts.unet.parameters()).device
        self.dtype = next(parts.unet.parameters()).dtype
        self.num_train_timesteps = int(parts.scheduler.config.num_train_timesteps)
        self.alphas_cumprod = parts.scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.generator = torch.Generator().manual_seed(seed)
        emb = encode_prompts(parts, [negative_prompt, prompt]).to(self.dtype)
        self.uncond_embeddings, self.text_embeddings = emb[:1], emb[1:]
        log.info("2D prior: Stable Diffusion, prompt %r, CFG %.0f, t∈%s·T, %d²", prompt, self.guidance_scale,
                 list(self.t_range), self.resolution)

    @torch.no_grad()
    def predict_noise(self, latents_noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Classifier-free-guided ε̂ for a batch; the UNet runs without gradient."""
        b = latents_noisy.shape[0]
        x_in = torch.cat([latents_noisy] * 2).to(self.dtype)
        t_in = torch.cat([t] * 2).to(self.device)
        cond = torch.cat([self.uncond_embeddings.expand(b, -1, -1), self.text_embeddings.expand(b, -1, -1)])
        eps = self.parts.unet(x_in, t_in, encoder_hidden_states=cond).sample
        eps_uncond, eps_cond = eps.float().chunk(2)
        return classifier_free_guidance(eps_uncond, eps_cond, self.guidance_scale)

    def sds(self, latents: torch.Tensor, t: Optional[torch.Tensor] = None,
            noise: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, float]]:
        """SDS on given latents (B, 4, h, w): the loss whose gradient on `latents` is w(t)(ε̂ − ε)/B."""
        return score_distillation(latents, self.predict_noise, self.parts.scheduler, self.alphas_cumprod,
                                  self.t_range, self.generator, t, noise)

    def __call__(self, batch: RenderBatch) -> GuidanceOutput:
        rgb = F.interpolate(batch.rgb, (self.resolution, self.resolution), mode="bilinear", align_corners=False)
        latents = encode_images(self.parts.vae, rgb.to(self.device), self.generator)
        loss, diag = self.sds(latents)
        return GuidanceOutput(loss=loss, diagnostics=diag)
