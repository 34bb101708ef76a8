"""Analytic priors: exact denoisers of known objects, in the real on-disk layout (issue 11).

A denoiser can be exact without being learned. For a data set {x_i} (here: VAE latents of renders
of known objects), the ε-prediction that minimises the diffusion loss E‖ε̂(x_t, t) − ε‖² under
x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε (DDPM, Ho et al. 2020 eq. 4; the scheduler's `add_noise`) is

    ε̂*(x_t, t) = (x_t − √ᾱ_t·x̂_0) / √(1 − ᾱ_t),                                   (A1)
    x̂_0 = E[x_0 | x_t] = Σ_i π_i N(x_t; √ᾱ_t x_i, (1 − ᾱ_t)I) x_i / Σ_i π_i N(…)   (A2)

(Tweedie's formula; x̂_0 is a softmax over the data with logits log π_i − ‖x_t − √ᾱ_t x_i‖² /
(2(1 − ᾱ_t))). With it, SDS (Magic123 eqs. 5–6, w(t) = 1 − ᾱ_t) becomes
w(t)(ε̂* − ε) = √ᾱ_t·√(1 − ᾱ_t)·(z − x̂_0): the render's latent z is pulled towards the posterior
mean of the data given its noised self — everything that makes the method the method (noising at
a sampled t, the UNet's ε, classifier-free guidance, w(t), the VAE encoder's Jacobian, Zero-1-to-3's
camera conditioning through `cc_projection`, the joint/dynamic weights) runs unchanged, and the
only thing not real is the knowledge in the weights.

* `AnalyticStableDiffusionUNet` (the 2D prior): the data are latents of renders of every known
  object from a grid of views; it does not know the camera, like the real 2D prior. The text
  condition selects the object: the CLIP text embedding is compared with stored embeddings of the
  prompts that name each object ("<name>", the prompt template with <name>, and its
  front/side/back-view forms), the nearest wins; the embedding of the empty prompt (the
  unconditional branch) selects the mixture over all objects, so CFG means what it means:
  ε̂ = ε_all + s(ε_object − ε_all).
* `AnalyticZero123UNet` (the 3D prior): reads (Δpolar, sin Δazimuth, cos Δazimuth, Δradius) back
  out of the first four channels of its cross-attention input (the `cc_projection` built here
  passes the four camera numbers through unchanged: `readable_cc_projection`), selects the object
  by its 4 concatenated reference-latent channels (nearest stored reference latent), and denoises
  towards that object rendered at the reference camera moved by Δ: the data are the object's
  renders on a grid of cameras, weighted by a Gaussian kernel π_i ∝ exp(−γ_i² / 2κ²) of the
  angle γ_i between the grid camera and the target camera (and of the radius difference). The
  unconditional branch (zeroed embedding and reference latent) is the mixture over every view of
  every object. A wrong sign or axis anywhere between our cameras and Zero-1-to-3's condition moves
  the target camera, and the prior then pulls towards the wrong view: a wrong shape.
* The VAE: the tiny AutoencoderKL of core/testmodels/priors.py (8× downsampling, 4 latent
  channels), with two of its weights set as a trained VAE has them: the posterior's log-variance
  is pinned to −20 (σ ≈ 5e-5; the random one has σ ≈ 1, which would drown the latent means, whose
  spread is ≈ 0.2) and `scaling_factor` is 1/std of the data latents (how SD's 0.18215 was
  chosen), so the noise schedule's signal-to-noise ratios mean what they mean for SD.
  `vae_injectivity` measures how much of the image it keeps (reports/analytic/README.md).

Both priors are saved with `save_pretrained` in the layouts of the real ones (`unet/`, `vae/`,
`text_encoder/`, `tokenizer/`, `scheduler/`; `image_encoder/`, `feature_extractor/`,
`cc_projection/`) and load through core.models.loader, which takes the UNet's class from the
folder's model_index.json (lift3d's own classes only). The data latents, the schedule's log ᾱ and
the prompt keys are the UNets' weights (safetensors). `ensure_analytic_prior` builds a folder once per
specification (objects, resolution, cameras, prompt template) under the tiny-model root.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Optional

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

log = logging.getLogger(__name__)

ANALYTIC_VERSION = "a2"  # bump when what a folder holds changes, so stale caches are rebuilt
PREFIX = "analytic"
DEFAULT_OBJECTS = ("torus", "blocks", "snowman")
LOGVAR_PINNED = -20.0
# view grids (degrees): SD's data views and Zero-1-to-3's target views; both contain the reference (90°, 0°)
SD_GRID_STEP = 15.0
ZERO123_GRID_STEP = 10.0
ZERO123_KERNEL_DEG = 5.0  # κ: half the grid step
RADIUS_KERNEL = 0.1  # the kernel's length scale of the radius difference (world units)


def _output(sample: torch.Tensor, return_dict: bool):
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    return UNet2DConditionOutput(sample=sample) if return_dict else (sample,)


def _timesteps(timestep, batch: int, device) -> torch.Tensor:
    t = torch.as_tensor(timestep, device=device)
    if t.dim() == 0:
        t = t.expand(batch)
    return t.round().long()


def posterior_mean(x_t: torch.Tensor, data: torch.Tensor, alpha_bar: torch.Tensor,
                   log_prior: Optional[torch.Tensor] = None, one_minus: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x̂_0 of eq. (A2) for one noisy sample x_t (D,) over data (N, D) at ᾱ (a 0-d tensor):
    softmax_i(log π_i − ‖x_t − √ᾱ x_i‖² / (2(1 − ᾱ))) · x_i, in float64 (`one_minus`: 1 − ᾱ
    computed without cancellation, when the caller has it)."""
    x, X, a = x_t.double(), data.double(), alpha_bar.double()
    s2 = (1.0 - a) if one_minus is None else one_minus.double()
    d2 = (x * x).sum() - 2.0 * a.sqrt() * (X @ x) + a * (X * X).sum(-1)
    logits = -d2 / (2.0 * s2)
    if log_prior is not None:
        logits = logits + log_prior.double()
    w = torch.softmax(logits, dim=0)
    return w @ X


def optimal_epsilon(x_t: torch.Tensor, x0_hat: torch.Tensor, alpha_bar: torch.Tensor,
                    one_minus: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Eq. (A1): ε̂* = (x_t − √ᾱ·x̂_0) / √(1 − ᾱ)."""
    a = alpha_bar.double()
    s2 = (1.0 - a) if one_minus is None else one_minus.double()
    return (x_t.double() - a.sqrt() * x0_hat.double()) / s2.sqrt()


def schedule_at(log_alphas_cumprod: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ᾱ_t, 1 − ᾱ_t) in float64 from the stored log ᾱ (the scheduler's alphas_cumprod, kept as a log
    so that fp16 weights keep 1 − ᾱ accurate near t = 0: ᾱ_1 = 0.99915 is 0.9990 or 0.9995 in fp16)."""
    la = log_alphas_cumprod.double()[t]
    return la.exp(), -torch.expm1(la)


class AnalyticStableDiffusionUNet(ModelMixin, ConfigMixin):
    """The exact ε-prediction (A1–A2) over renders of known objects; the text selects the object.

    Weights: `data` (K, N, C, h, w) scaled VAE latents of N views of each of K objects,
    `log_alphas_cumprod` (T,) log of the scheduler's ᾱ, `text_keys` (M, L, D) CLIP text embeddings of
    prompts; config `key_objects` (M,) the object index each key selects (−1: all objects)."""

    @register_to_config
    def __init__(self, sample_size: int = 8, in_channels: int = 4, out_channels: int = 4,
                 cross_attention_dim: int = 768, text_length: int = 77, num_objects: int = 1,
                 views_per_object: int = 1, num_train_timesteps: int = 1000,
                 object_names: tuple = ("object",), key_objects: tuple = (-1,), key_prompts: tuple = ("",)):
        super().__init__()
        c, s = in_channels, sample_size
        self.data = torch.nn.Parameter(torch.zeros(num_objects, views_per_object, c, s, s), requires_grad=False)
        self.log_alphas_cumprod = torch.nn.Parameter(torch.zeros(num_train_timesteps), requires_grad=False)
        self.text_keys = torch.nn.Parameter(torch.zeros(len(key_objects), text_length, cross_attention_dim),
                                            requires_grad=False)

    def select_objects(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """(B,) the object each condition names: that of the nearest stored prompt embedding
        (mean squared difference over tokens and channels); −1 for the mixture over all."""
        c = encoder_hidden_states.float().flatten(1)
        k = self.text_keys.float().flatten(1)
        d = torch.cdist(c.double(), k.double())
        nearest = d.argmin(-1)
        return torch.as_tensor(self.config.key_objects, device=c.device)[nearest]

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                return_dict: bool = True, **_: Any):
        b = sample.shape[0]
        t = _timesteps(timestep, b, sample.device)
        alpha, one_minus = schedule_at(self.log_alphas_cumprod, t)
        objects = self.select_objects(encoder_hidden_states)
        data = self.data.flatten(2)  # (K, N, D)
        everything = data.flatten(0, 1)
        x = sample.flatten(1)
        eps = torch.empty(x.shape, dtype=torch.float64, device=x.device)
        for i in range(b):
            k = int(objects[i])
            pool = everything if k < 0 else data[k]
            x0 = posterior_mean(x[i], pool, alpha[i], one_minus=one_minus[i])
            eps[i] = optimal_epsilon(x[i], x0, alpha[i], one_minus[i])
        return _output(eps.view_as(sample).to(sample.dtype), return_dict)


class AnalyticZero123UNet(ModelMixin, ConfigMixin):
    """The exact ε-prediction (A1–A2) of Zero-1-to-3's task for known objects.

    Input: 8 channels (the noisy latent ⊕ the reference latent, zeroed for the unconditional
    branch); cross-attention input (B, 1, 768) whose channels 0–3 are Zero-1-to-3's camera
    [Δpolar (rad), sin Δazimuth, cos Δazimuth, Δradius] (zeroed for the unconditional branch).
    Weights: `data` (K, N, 4, h, w) scaled latents of each object's renders at the grid cameras
    `view_polar/azimuth/radius` (config, degrees), `reference_latents` (K, 4, h, w) the unscaled
    posterior modes of each object's reference view, `log_alphas_cumprod` (T,) log ᾱ."""

    @register_to_config
    def __init__(self, sample_size: int = 8, in_channels: int = 8, out_channels: int = 4,
                 cross_attention_dim: int = 768, num_objects: int = 1, num_train_timesteps: int = 1000,
                 object_names: tuple = ("object",), reference_polar: float = 90.0, reference_azimuth: float = 0.0,
                 reference_radius: float = 1.8, view_polar: tuple = (90.0,), view_azimuth: tuple = (0.0,),
                 view_radius: tuple = (1.8,), kernel_deg: float = ZERO123_KERNEL_DEG,
                 radius_kernel: float = RADIUS_KERNEL):
        super().__init__()
        c, s, n = out_channels, sample_size, len(view_polar)
        self.data = torch.nn.Parameter(torch.zeros(num_objects, n, c, s, s), requires_grad=False)
        self.reference_latents = torch.nn.Parameter(torch.zeros(num_objects, in_channels - c, s, s),
                                                    requires_grad=False)
        self.log_alphas_cumprod = torch.nn.Parameter(torch.zeros(num_train_timesteps), requires_grad=False)

    @staticmethod
    def read_camera(encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Δpolar°, Δazimuth°, Δradius, conditioned?) read from channels 0–3 (Zero-1-to-3's
        [Δθ rad, sin Δφ, cos Δφ, Δr]); a condition is unconditional when sin² + cos² is ~0."""
        c = encoder_hidden_states[:, 0, :4].double()
        d_polar = torch.rad2deg(c[:, 0])
        d_azimuth = torch.rad2deg(torch.atan2(c[:, 1], c[:, 2]))
        return d_polar, d_azimuth, c[:, 3], (c[:, 1] ** 2 + c[:, 2] ** 2) > 0.25

    def target_cameras(self, encoder_hidden_states: torch.Tensor):
        """The target cameras the condition asks for: the reference camera moved by Δ (degrees)."""
        cfg = self.config
        d_polar, d_azimuth, d_radius, cond = self.read_camera(encoder_hidden_states)
        return cfg.reference_polar + d_polar, cfg.reference_azimuth + d_azimuth, cfg.reference_radius + d_radius, cond

    def view_log_prior(self, polar: torch.Tensor, azimuth: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
        """log π_i (N,) of the grid views for one target camera: −γ_i²/2κ² − (Δr_i/ρ)²/2, γ_i the
        angle at the origin between the grid camera and the target camera."""
        from core.rendering.cameras import spherical_to_cartesian

        cfg = self.config
        dev = polar.device
        vp = torch.tensor(cfg.view_polar, dtype=torch.float64, device=dev)
        va = torch.tensor(cfg.view_azimuth, dtype=torch.float64, device=dev)
        vr = torch.tensor(cfg.view_radius, dtype=torch.float64, device=dev)
        one = torch.ones((), dtype=torch.float64, device=dev)
        u = spherical_to_cartesian(vp, va, torch.ones_like(vp))
        v = spherical_to_cartesian(polar.double(), azimuth.double(), one)
        gamma = torch.rad2deg(torch.atan2(torch.linalg.cross(u, v.expand_as(u), dim=-1).norm(dim=-1), u @ v))
        return -0.5 * (gamma / cfg.kernel_deg) ** 2 - 0.5 * ((vr - radius.double()) / cfg.radius_kernel) ** 2

    def select_objects(self, reference: torch.Tensor) -> torch.Tensor:
        """(B,) the object whose stored reference latent is nearest; −1 where the reference is zeroed."""
        r = reference.flatten(1).double()
        k = self.reference_latents.flatten(1).double()
        nearest = torch.cdist(r, k).argmin(-1)
        blank = r.abs().amax(-1) == 0
        return torch.where(blank, torch.full_like(nearest, -1), nearest)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                return_dict: bool = True, **_: Any):
        b, c = sample.shape[0], self.config.out_channels
        x, reference = sample[:, :c], sample[:, c:]
        t = _timesteps(timestep, b, sample.device)
        alpha, one_minus = schedule_at(self.log_alphas_cumprod, t)
        polar, azimuth, radius, cond = self.target_cameras(encoder_hidden_states)
        objects = self.select_objects(reference)
        data = self.data.flatten(2)  # (K, N, D)
        xf = x.flatten(1)
        eps = torch.empty(xf.shape, dtype=torch.float64, device=x.device)
        for i in range(b):
            k = int(objects[i])
            if k < 0 or not bool(cond[i]):  # the unconditional branch: every view of every object
                x0 = posterior_mean(xf[i], data.flatten(0, 1), alpha[i], one_minus=one_minus[i])
            else:
                x0 = posterior_mean(xf[i], data[k], alpha[i], self.view_log_prior(polar[i], azimuth[i], radius[i]),
                                    one_minus[i])
            eps[i] = optimal_epsilon(xf[i], x0, alpha[i], one_minus[i])
        return _output(eps.view_as(x).to(sample.dtype), return_dict)


def readable_cc_projection(in_channel: int = 772, out_channel: int = 768):
    """Zero-1-to-3's `cc_projection` (core.guidance.zero123.CCProjection) with weights that keep the
    camera readable: output channels 0–3 are the four camera inputs (768–771) unchanged, channels
    4–767 carry the CLIP image embedding's channels 4–767, bias 0."""
    from core.guidance.zero123 import CCProjection

    proj = CCProjection(in_channel=in_channel, out_channel=out_channel)
    w = torch.zeros(out_channel, in_channel)
    clip = in_channel - 4
    for j in range(4):
        w[j, clip + j] = 1.0
    idx = torch.arange(4, min(out_channel, clip))
    w[idx, idx] = 1.0
    with torch.no_grad():
        proj.projection.weight.copy_(w)
        proj.projection.bias.zero_()
    return proj


# ------------------------------------------------------------------------------------------ objects
def object_names(spec: str) -> list[str]:
    """The objects of a model name 'analytic' or 'analytic:torus+blocks+/path/to/mesh.glb'."""
    body = spec.split(":", 1)[1] if ":" in spec else ""
    names = [n for n in body.split("+") if n] if body else list(DEFAULT_OBJECTS)
    return names


def is_analytic(name: str) -> bool:
    return name == PREFIX or name.startswith(PREFIX + ":")


def object_label(name: str) -> str:
    """The word the text condition names an object by: a procedural name, or a mesh file's stem."""
    return Path(name).stem if ("/" in name or "." in name) else name


def _object_fingerprint(name: str) -> str:
    p = Path(name).expanduser()
    if p.is_file():
        return f"{object_label(name)}:{hashlib.sha256(p.read_bytes()).hexdigest()[:16]}"
    return name


def grid_cameras(step: float, radii: list[float], fovy: float, device="cpu"):
    """Cameras on a (polar, azimuth) grid of `step` degrees that contains (90°, 0°): polar in (0°, 180°),
    azimuth in (−180°, 180°], at each radius in `radii`."""
    from core.rendering.cameras import Cameras

    k = int(math.floor((90.0 - 1e-6) / step))
    polars = [90.0 + step * i for i in range(-k, k + 1)]
    n_az = int(round(360.0 / step))
    azimuths = [((step * j + 180.0) % 360.0) - 180.0 for j in range(n_az)]
    azimuths = [a if a != -180.0 else 180.0 for a in azimuths]
    pol, az, rad = zip(*[(p, a, r) for r in radii for p in polars for a in azimuths])
    return Cameras.make(list(pol), list(az), list(rad), fovy, device=device)


@torch.no_grad()
def render_views(obj, cameras, resolution: int, chunk: int | None = None) -> torch.Tensor:
    """The object's albedo renders on white (N, 3, H, W) at `cameras`, in chunks of ~2^18 rays."""
    chunk = chunk or max(1, (1 << 18) // (resolution * resolution))
    out = [obj.render(cameras[i:i + chunk], resolution, shading="albedo")["rgb"].cpu()
           for i in range(0, len(cameras), chunk)]
    return torch.cat(out)


@torch.no_grad()
def encode_means(vae, images: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """Posterior means (unscaled) of images in [0, 1]."""
    dev = next(vae.parameters()).device
    return torch.cat([vae.encode(images[i:i + chunk].to(dev) * 2 - 1).latent_dist.mean.float().cpu()
                      for i in range(0, len(images), chunk)])


# ---------------------------------------------------------------------------------------------- VAE
def analytic_vae(seed: int = 0):
    """The tiny AutoencoderKL (core.testmodels.priors) with its posterior log-variance pinned to
    LOGVAR_PINNED: quant_conv's log-variance rows have weight 0 and bias −20."""
    from core.testmodels.priors import _tiny_vae

    torch.manual_seed(seed)
    vae = _tiny_vae()
    c = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[c:].zero_()
        vae.quant_conv.bias[c:].fill_(LOGVAR_PINNED)
    return vae.eval()


def set_scaling_factor(vae, latents_unscaled: torch.Tensor) -> float:
    """scaling_factor = 1/std of the data latents (how SD's 0.18215 was chosen)."""
    f = float(1.0 / latents_unscaled.float().std().clamp_min(1e-8))
    vae.register_to_config(scaling_factor=f)
    return f


@torch.no_grad()
def vae_injectivity(vae, images: torch.Tensor) -> dict:
    """How much of the image the encoder keeps, on `images` (N, 3, H, W):
    * nn_agreement: the fraction of images whose nearest other image by latent distance is their
      nearest by pixel distance;
    * distance_correlation: Pearson correlation of pairwise latent and pixel distances;
    * jacobian_rank: at the first image, the number of singular values of ∂(latent mean)/∂image
      above 1e-3 of the largest, out of the latent's size (its most: injective on the latent's
      dimensions), and the condition number over those."""
    lat = encode_means(vae, images).flatten(1).double()
    pix = images.flatten(1).double()
    dl, dp = torch.cdist(lat, lat), torch.cdist(pix, pix)
    n = len(images)
    eye = torch.eye(n, dtype=torch.bool)
    nl = dl.masked_fill(eye, float("inf")).argmin(-1)
    np_ = dp.masked_fill(eye, float("inf")).argmin(-1)
    iu = torch.triu_indices(n, n, 1)
    a, b = dl[iu[0], iu[1]], dp[iu[0], iu[1]]
    corr = float(((a - a.mean()) * (b - b.mean())).mean() / (a.std(unbiased=False) * b.std(unbiased=False)))
    x = images[:1].clone()
    dev = next(vae.parameters()).device
    with torch.enable_grad():
        jac = torch.autograd.functional.jacobian(
            lambda im: vae.encode(im.to(dev) * 2 - 1).latent_dist.mean.flatten(), x).reshape(lat.shape[1], -1)
    s = torch.linalg.svdvals(jac.double())
    keep = s > 1e-3 * s[0]
    return {"images": n, "latent_size": int(lat.shape[1]), "image_size": int(pix.shape[1]),
            "nn_agreement": round(float((nl == np_).double().mean()), 4),
            "distance_correlation": round(corr, 4), "jacobian_rank": int(keep.sum()),
            "jacobian_condition": round(float(s[0] / s[keep][-1]), 2)}


# -------------------------------------------------------------------------------------- the builders
def _schedule():
    from diffusers import DDPMScheduler

    from core.testmodels.priors import SD_SCHEDULER

    return DDPMScheduler(**SD_SCHEDULER)


def _known_objects(names: list[str]):
    from core.oracle.objects import make_object

    return [make_object(n) for n in names]


def sd_key_prompts(labels: list[str], template: str, placeholder: str) -> tuple[list[str], list[int]]:
    """The prompts whose embeddings are the text keys, and the object each selects (−1: all):
    the empty prompt (the unconditional branch), then per object its name, the template with it,
    and the template's front/side/back-view forms (core.guidance.sd.VIEW_SUFFIXES)."""
    from core.guidance.sd import VIEW_SUFFIXES, compose_prompt

    prompts, owners = [""], [-1]
    for k, label in enumerate(labels):
        full = compose_prompt(template, placeholder, None, label)
        for p in [label, full] + [full + s for s in VIEW_SUFFIXES]:
            prompts.append(p)
            owners.append(k)
    return prompts, owners


def build_analytic_sd(folder: Path, names: list[str], resolution: int, radius: float, fovy: float,
                      template: str, placeholder: str, device="cpu", seed: int = 0) -> Path:
    """An analytic Stable Diffusion in the hub layout (tokenizer/, text_encoder/, vae/, unet/, scheduler/)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from core.testmodels.priors import write_tiny_text_encoder

    folder = Path(folder)
    write_tiny_text_encoder(folder, seed=seed)
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    objs = _known_objects(names)
    cams = grid_cameras(SD_GRID_STEP, [radius], fovy, device=device)
    images = torch.stack([render_views(o, cams, resolution) for o in objs])  # (K, N, 3, H, W)
    vae = analytic_vae(seed).to(device)
    means = encode_means(vae, images.flatten(0, 1))
    factor = set_scaling_factor(vae, means)
    latents = (means * factor).view(len(objs), len(cams), *means.shape[1:])
    labels = [object_label(n) for n in names]
    prompts, owners = sd_key_prompts(labels, template, placeholder)
    with torch.no_grad():
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        keys = text_encoder(ids)[0].float()
    sched = _schedule()
    unet = AnalyticStableDiffusionUNet(
        sample_size=latents.shape[-1], in_channels=latents.shape[2], out_channels=latents.shape[2],
        cross_attention_dim=keys.shape[-1], text_length=keys.shape[1], num_objects=len(objs),
        views_per_object=len(cams), num_train_timesteps=sched.config.num_train_timesteps,
        object_names=labels, key_objects=owners, key_prompts=prompts)
    with torch.no_grad():
        unet.data.copy_(latents)
        unet.log_alphas_cumprod.copy_(sched.alphas_cumprod.double().log())
        unet.text_keys.copy_(keys)
    unet.save_pretrained(folder / "unet")
    vae.cpu().save_pretrained(folder / "vae")
    sched.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_note": "lift3d analytic prior: exact denoiser of known objects",
        "objects": labels, "unet": ["core.testmodels.analytic", "AnalyticStableDiffusionUNet"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDPMScheduler"],
    }, indent=1))
    return folder


def zero123_radii(radius: float, radius_range: tuple[float, float]) -> list[float]:
    lo, hi = float(radius_range[0]), float(radius_range[1])
    return sorted({round(r, 4) for r in ([radius] if hi - lo < 1e-6 else [lo, radius, hi])})


def build_analytic_zero123(folder: Path, names: list[str], resolution: int, reference: tuple[float, float, float],
                           fovy: float, radius_range: tuple[float, float], device="cpu", seed: int = 0) -> Path:
    """An analytic Zero-1-to-3 in the layout of bennyguo/zero123-diffusers (image_encoder/,
    feature_extractor/, vae/, unet/, cc_projection/, scheduler/). `reference` = (polar, azimuth, radius)
    of the reference camera the condition's Δ is taken from."""
    from core.rendering.cameras import Cameras
    from core.testmodels.priors import write_tiny_image_encoder

    folder = Path(folder)
    write_tiny_image_encoder(folder, seed=seed)
    objs = _known_objects(names)
    ref_polar, ref_azimuth, ref_radius = reference
    cams = grid_cameras(ZERO123_GRID_STEP, zero123_radii(ref_radius, radius_range), fovy, device=device)
    images = torch.stack([render_views(o, cams, resolution) for o in objs])
    ref_cam = Cameras.make(ref_polar, ref_azimuth, ref_radius, fovy, device=device)
    ref_images = torch.cat([render_views(o, ref_cam, resolution) for o in objs])
    vae = analytic_vae(seed).to(device)
    means = encode_means(vae, images.flatten(0, 1))
    factor = set_scaling_factor(vae, means)
    latents = (means * factor).view(len(objs), len(cams), *means.shape[1:])
    ref_latents = encode_means(vae, ref_images)  # unscaled posterior modes, as Zero123Guidance's c_concat
    sched = _schedule()
    c = latents.shape[2]
    unet = AnalyticZero123UNet(
        sample_size=latents.shape[-1], in_channels=2 * c, out_channels=c, num_objects=len(objs),
        num_train_timesteps=sched.config.num_train_timesteps, object_names=[object_label(n) for n in names],
        reference_polar=ref_polar, reference_azimuth=ref_azimuth, reference_radius=ref_radius,
        view_polar=cams.polar.tolist(), view_azimuth=cams.azimuth.tolist(), view_radius=cams.radius.tolist())
    with torch.no_grad():
        unet.data.copy_(latents)
        unet.reference_latents.copy_(ref_latents)
        unet.log_alphas_cumprod.copy_(sched.alphas_cumprod.double().log())
    unet.save_pretrained(folder / "unet")
    vae.cpu().save_pretrained(folder / "vae")
    readable_cc_projection().save_pretrained(folder / "cc_projection")
    sched.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "Zero1to3StableDiffusionPipeline",
        "_note": "lift3d analytic prior: exact denoiser of known objects", "objects": [object_label(n) for n in names],
        "unet": ["core.testmodels.analytic", "AnalyticZero123UNet"], "vae": ["diffusers", "AutoencoderKL"],
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "cc_projection": ["core.guidance.zero123", "CCProjection"], "scheduler": ["diffusers", "DDPMScheduler"],
    }, indent=1))
    return folder


def analytic_spec(params: Any, which: str) -> dict:
    """What an analytic prior's folder depends on: its objects (mesh files by content), the
    resolution the guidance feeds it, the cameras, the prompt template (SD)."""
    section = getattr(params, which)
    names = object_names(section.model)
    cam = params.camera
    spec = {"version": ANALYTIC_VERSION, "which": which, "objects": [_object_fingerprint(n) for n in names],
            "resolution": int(section.resolution), "fovy": float(cam.fovy)}
    if which == "sd":
        spec.update(radius=float(cam.radius), template=params.prompt.template,
                    placeholder=params.textual_inversion.placeholder)
    else:
        spec.update(reference=[float(cam.ref_polar), float(cam.ref_azimuth), float(cam.radius)],
                    radius_range=[float(r) for r in cam.radius_range])
    return spec


def ensure_analytic_prior(params: Any, which: str, root: Optional[Path] = None, device=None) -> str:
    """Build (once per specification) and return the folder of the analytic 'sd' or 'zero123' prior
    that params.<which>.model names ('analytic' or 'analytic:OBJ+OBJ…')."""
    from core.testmodels import tiny_root
    from core.testmodels.priors import _build_once

    spec = analytic_spec(params, which)
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(root) if root is not None else tiny_root(params) / "analytic"
    if device is None:
        device = "cuda" if params.device != "cpu" and torch.cuda.is_available() else "cpu"
    names = object_names(getattr(params, which).model)

    def build(folder: Path) -> Path:
        log.info("building the analytic %s prior of %s at %d² (once; %s)", which, ", ".join(names),
                 spec["resolution"], folder.name)
        (folder / "spec.json").write_text(json.dumps(spec, indent=1))
        if which == "sd":
            return build_analytic_sd(folder, names, spec["resolution"], spec["radius"], spec["fovy"],
                                     spec["template"], spec["placeholder"], device=device)
        return build_analytic_zero123(folder, names, spec["resolution"], tuple(spec["reference"]), spec["fovy"],
                                      tuple(spec["radius_range"]), device=device)

    return str(_build_once(root, f"{which}-{digest}", build))
