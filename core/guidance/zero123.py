"""The 3D prior: score distillation with Zero-1-to-3 (Magic123 eq. 6, Consistent123 eq. 4).

Zero-1-to-3 in diffusers format (bennyguo/zero123-diffusers, the community `zero1to3` pipeline):
a UNet with 8 input channels (the noisy latent ⊕ the reference image's latent), a CLIP image
encoder, and `cc_projection`, a Linear(768 + 4 → 768) that joins the CLIP image embedding of the
reference with the relative camera [Δpolar (rad), sin Δazimuth, cos Δazimuth, Δradius]. The
unconditional branch zeroes both the projected embedding and the reference latent; guidance
scale 5; renders at 256×256.

Camera conventions (checked against threestudio's zero123_guidance.py and Zero-1-to-3's own
`get_T`): Zero-1-to-3 measures the polar angle θ from the up axis (θ = 90° − elevation) and the
azimuth counter-clockwise about the up axis seen from above (atan2(y, x) in its z-up Blender
world); its condition is [θ_tgt − θ_ref, sin(φ_tgt − φ_ref), cos(φ_tgt − φ_ref), r_tgt − r_ref].
Our cameras (core/rendering/cameras.py) measure polar from +y (up) too, and our azimuth turns about +y
from +z towards +x, which is also counter-clockwise seen from above (a right-handed rotation
about the up axis; threestudio's z-up azimuth turns the same way). So the mapping is the
identity: Δpolar = polar_tgt − polar_ref (a camera moving up gives a negative Δpolar), Δazimuth =
azimuth_tgt − azimuth_ref, Δradius = radius_tgt − radius_ref. (stable-dreamfusion and the
Magic123 code write sin(−Δazimuth) because their look-at builds a mirrored camera, right = −x for
the front view; ours has right = +x, like threestudio's.)

Angle weighting (params.zero123.angle_weighting; the released code of both papers, not their
text): each view's SDS gradient is scaled by γ/180°, γ the angle at the origin between the view's
camera and the reference camera, so the reference view gets no 3D-prior gradient and the back view
the full λ_3D (Magic123: 40·γ/180). guochengqian/Magic123 guidance/zero123_utils.py:129-137 and
:197 (`zero123_grad_scale='angle'`, main.py:324; 180/len(refs) with one reference image);
lyk412/Consistent123 guidance/zero123_utils.py:116-124, main.py:161.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from core.rendering.cameras import Cameras, relative_pose
from core.guidance.base import Diagnostics, GuidanceOutput, RenderBatch
from core.guidance.sd import encode_images, vae_moments
from core.guidance.sds import (classifier_free_guidance, sample_timesteps, score_distillation, sds_gradient,
                                sds_weight)
from core.perf import GraphedCall, to_device
from core.models.loader import load_pretrained

log = logging.getLogger(__name__)


class CCProjection(ModelMixin, ConfigMixin):
    """Zero-1-to-3's `cc_projection`: [CLIP image embedding (768) ⊕ camera (4)] → 768.

    Same config and state-dict keys as the community pipeline's class (`projection.weight/bias`),
    so a `cc_projection/` folder of bennyguo/zero123-diffusers loads into it."""

    @register_to_config
    def __init__(self, in_channel: int = 772, out_channel: int = 768):
        super().__init__()
        self.in_channel = in_channel
        self.out_channel = out_channel
        self.projection = torch.nn.Linear(in_channel, out_channel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(x)


def zero123_condition(ref: Cameras, tgt: Cameras) -> torch.Tensor:
    """Zero-1-to-3's relative camera (B, 4): [Δpolar (rad), sin Δazimuth, cos Δazimuth, Δradius].

    The mapping from our cameras is the identity (see the module docstring for why)."""
    d_polar, d_azimuth, d_radius = relative_pose(ref, tgt)
    d_polar, d_azimuth = torch.deg2rad(d_polar), torch.deg2rad(d_azimuth)
    return torch.stack([d_polar, torch.sin(d_azimuth), torch.cos(d_azimuth), d_radius], dim=-1)


def angle_to_reference(ref: Cameras, tgt: Cameras) -> torch.Tensor:
    """γ (B,), degrees: the angle at the origin between each target camera and the reference camera
    (the released `angle_between` of the two cameras' unit position vectors; radius plays no part)."""
    a, b = ref.centers.double(), tgt.centers.double()
    a = a.expand_as(b)
    # atan2(|a × b|, a · b): arccos of the normalised dot product, without its loss of precision near 0°
    return torch.rad2deg(torch.atan2(torch.linalg.cross(a, b, dim=-1).norm(dim=-1), (a * b).sum(-1))).float()


def angle_weight(ref: Cameras, tgt: Cameras) -> torch.Tensor:
    """The released per-view scale of the Zero-1-to-3 SDS gradient, γ/180° (B,) in [0, 1]
    (zero123_utils.py:137 with one reference image: angles / (180 / 1))."""
    return angle_to_reference(ref, tgt) / 180.0


@dataclass
class Zero123Parts:
    image_encoder: Any
    feature_extractor: Any
    vae: Any
    unet: Any
    cc_projection: Any
    scheduler: Any
    compiled: dict = field(default_factory=dict, repr=False, compare=False)  # core.guidance.sd.per_prior


def load_zero123(name: str, device, dtype: torch.dtype, models_params=None, key: str = "zero123.model") -> Zero123Parts:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    kw = dict(key=key, models_params=models_params)
    image_encoder = load_pretrained(CLIPVisionModelWithProjection, name, subfolder="image_encoder", **kw)
    feature_extractor = load_pretrained(CLIPImageProcessor, name, subfolder="feature_extractor", **kw)
    vae = load_pretrained(AutoencoderKL, name, subfolder="vae", torch_dtype=dtype, **kw)
    unet = load_pretrained(UNet2DConditionModel, name, subfolder="unet", torch_dtype=dtype, **kw)
    cc_projection = load_pretrained(CCProjection, name, subfolder="cc_projection", torch_dtype=dtype, **kw)
    scheduler = load_pretrained(DDPMScheduler, name, subfolder="scheduler", **kw)
    for m in (image_encoder, vae, unet, cc_projection):
        m.to(device, dtype=dtype).eval().requires_grad_(False)
    if unet.config.in_channels != 8:
        from core.errors import ModelNotFoundError

        raise ModelNotFoundError(f"model '{name}' ({key}) is not a Zero-1-to-3 UNet: it has "
                                 f"{unet.config.in_channels} input channels, not 8")
    return Zero123Parts(image_encoder, feature_extractor, vae, unet, cc_projection, scheduler)


@torch.no_grad()
def clip_image_embedding(parts: Zero123Parts, image: torch.Tensor) -> torch.Tensor:
    """CLIP image embedding (B, 1, 768) of images in [0, 1]: resized to the encoder's input size
    (bicubic, antialiased) and normalised with the feature extractor's mean and std."""
    fe = parts.feature_extractor
    crop = fe.crop_size
    size = int(crop["height"] if not isinstance(crop, (int, float)) else crop)
    x = F.interpolate(image.float(), (size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    mean = torch.tensor(fe.image_mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(fe.image_std, device=x.device).view(1, 3, 1, 1)
    dtype = next(parts.image_encoder.parameters()).dtype
    return parts.image_encoder(((x - mean) / std).to(dtype)).image_embeds.unsqueeze(1)


class Zero123Guidance:
    """L_3D of Magic123 eq. 6 for a batch of renders, conditioned on the reference view."""

    def __init__(self, parts: Zero123Parts, reference_rgb: torch.Tensor, reference_camera: Cameras, *,
                 guidance_scale: float = 5.0, t_range: tuple[float, float] = (0.2, 0.6), resolution: int = 256,
                 seed: int = 0, angle_weighting: bool = False, moments=vae_moments, graphed: bool = False):
        self.parts = parts
        # compile 'graphs': an SDS step's noising, guided ε̂ (angle-weighted) and w(t)(ε̂ − ε) as one CUDA graph
        self.graphed_gradient = GraphedCall(self._gradient) if graphed else None
        self.moments = moments  # the encode function (core.guidance.sd.encoder_moments)
        self.angle_weighting = bool(angle_weighting)
        self.guidance_scale = float(guidance_scale)
        self.t_range = tuple(t_range)
        self.resolution = int(resolution)
        self.device = next(parts.unet.parameters()).device
        self.dtype = next(parts.unet.parameters()).dtype
        self.num_train_timesteps = int(parts.scheduler.config.num_train_timesteps)
        self.alphas_cumprod = parts.scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.generator = torch.Generator().manual_seed(seed + 7)
        self.reference_camera = reference_camera
        ref = reference_rgb.reshape(1, 3, *reference_rgb.shape[-2:]).to(self.device).float()
        ref = F.interpolate(ref, (self.resolution, self.resolution), mode="bilinear", align_corners=False,
                            antialias=True)
        with torch.no_grad():
            self.clip_embedding = clip_image_embedding(parts, ref)  # (1, 1, 768): c_crossattn before projection
            # the reference latent: the posterior's mode, *unscaled* — as Zero-1-to-3's ldm code
            # (encode_first_stage(x).mode()), threestudio and the community pipeline do
            vae_dtype = next(parts.vae.parameters()).dtype
            self.reference_latent = parts.vae.encode(ref.to(vae_dtype) * 2 - 1).latent_dist.mode()
        log.info("3D prior: Zero-1-to-3, CFG %.0f, t∈%s·T, %d²%s", self.guidance_scale, list(self.t_range),
                 self.resolution, ", SDS × angle/180°" if self.angle_weighting else "")

    def pose(self, cameras: Cameras) -> torch.Tensor:
        """[Δθ, sin Δφ, cos Δφ, Δr] (B, 4) to the reference view, on the UNet's device and dtype."""
        c = cameras.for_small_math()  # the host copy where there is one
        return to_device(zero123_condition(self.reference_camera.to(c.device), c), self.device, self.dtype)

    @torch.no_grad()
    def condition(self, cameras: Cameras) -> torch.Tensor:
        """The projected condition (B, 1, 768): cc_projection(CLIP(I_ref) ⊕ [Δθ, sin Δφ, cos Δφ, Δr])."""
        return self._condition(self.pose(cameras))

    def _condition(self, pose: torch.Tensor) -> torch.Tensor:
        emb = self.clip_embedding.expand(pose.shape[0], -1, -1)
        return self.parts.cc_projection(torch.cat([emb, pose[:, None, :]], dim=-1))

    @torch.no_grad()
    def predict_noise(self, latents_noisy: torch.Tensor, t: torch.Tensor, cameras: Cameras) -> torch.Tensor:
        return self._guided_eps(latents_noisy, to_device(t, self.device), self.pose(cameras))

    def _guided_eps(self, latents_noisy: torch.Tensor, t: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
        """ε̂ from tensors on the UNet's device (capturable: no copy from the host)."""
        b = latents_noisy.shape[0]
        cond = self._condition(pose)
        c_crossattn = torch.cat([torch.zeros_like(cond), cond])  # unconditional: zeroed embedding
        ref = self.reference_latent.expand(b, -1, -1, -1)
        c_concat = torch.cat([torch.zeros_like(ref), ref])  # unconditional: zeroed reference latent
        x_in = torch.cat([torch.cat([latents_noisy] * 2).to(self.dtype), c_concat], dim=1)
        eps = self.parts.unet(x_in, torch.cat([t] * 2), encoder_hidden_states=c_crossattn).sample
        eps_uncond, eps_cond = eps.float().chunk(2)
        return classifier_free_guidance(eps_uncond, eps_cond, self.guidance_scale)

    def sds(self, latents: torch.Tensor, cameras: Cameras, t: Optional[torch.Tensor] = None,
            noise: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Diagnostics]:
        """SDS on given latents for novel views `cameras` (Magic123 eq. 6). With angle weighting the
        gradient on each view's latent is k·w(t)(ε̂ − ε)/B, k = γ/180° (`angle_weight`)."""
        predict = lambda z, t_: self.predict_noise(z, t_, cameras)  # noqa: E731
        graphed = self.graphed_gradient
        if not self.angle_weighting:
            pose = self.pose(cameras) if graphed else None
            return score_distillation(latents, predict, self.parts.scheduler, self.alphas_cumprod, self.t_range,
                                      self.generator, t, noise,
                                      gradient=(lambda z, e, t_: graphed(z, e, t_, pose)) if graphed else None)
        # ε̂ ← ε + k(ε̂ − ε) makes score_distillation's gradient k·w(t)(ε̂ − ε); t and ε are drawn
        # here, from the same stream in the same order as score_distillation draws them
        if t is None:
            t = sample_timesteps(latents.shape[0], self.num_train_timesteps, self.t_range, self.generator)
        if noise is None:
            noise = torch.randn(latents.shape, generator=self.generator)
        c = cameras.for_small_math()  # the host copy where there is one
        k = to_device(angle_weight(self.reference_camera.to(c.device), c), self.device).reshape(-1, 1, 1, 1)

        def weighted(z, t_):
            eps = to_device(noise, self.device).float()  # without waiting for the GPU's queue
            return eps + k * (predict(z, t_) - eps)

        pose = self.pose(cameras) if graphed else None
        loss, diag = score_distillation(latents, weighted, self.parts.scheduler, self.alphas_cumprod, self.t_range,
                                        self.generator, t, noise,
                                        gradient=(lambda z, e, t_: graphed(z, e, t_, pose, k)) if graphed else None)
        diag["angle_weight"] = k.mean()  # read when logged (core.guidance.base)
        return loss, diag

    def _gradient(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, pose: torch.Tensor,
                  *k: torch.Tensor) -> torch.Tensor:
        """w(t)(ε̂ − ε) from tensors on the UNet's device, as score_distillation computes it, with the
        angle weight ε̂ ← ε + k(ε̂ − ε) when `k` is given (capturable)."""
        latents_noisy = self.parts.scheduler.add_noise(latents, noise, t)
        eps = self._guided_eps(latents_noisy, t, pose)
        if k:
            eps = noise + k[0] * (eps - noise)
        return sds_gradient(eps, noise, sds_weight(self.alphas_cumprod, t))

    def __call__(self, batch: RenderBatch) -> GuidanceOutput:
        rgb = F.interpolate(batch.rgb, (self.resolution, self.resolution), mode="bilinear", align_corners=False)
        latents = encode_images(self.parts.vae, rgb.to(self.device), self.generator, self.moments)
        loss, diag = self.sds(latents, batch.cameras)
        return GuidanceOutput(loss=loss, diagnostics=diag)
