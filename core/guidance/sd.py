"""The 2D prior: score distillation with Stable Diffusion (Magic123 eq. 5, Consistent123 eq. 7).

The render is resized to 512×512 (params.sd.resolution), encoded by the VAE *with* the gradient
through the encoder (the ∂z/∂I term of eq. 5 is kept), noised at t ~ U[0.2, 0.6]·T, and the UNet
predicts the noise under no_grad with classifier-free guidance (scale 100). The gradient
w(t)(ε̂ − ε) is injected into the latent (core.guidance.sds). The text condition is the prompt
"A high-resolution DSLR image of <e>" with <e> a textual-inversion token (core.guidance.textual_inversion),
or a plain description. Weights are fp16 on a GPU (params.sd.fp16) and fp32 on the CPU.

View-dependent prompts (params.sd.view_dependent_prompt; both papers' released code, not their
text): "<prompt>, front view", ", side view", ", back view" are encoded once, and each render is
guided by the text embedding interpolated linearly in |Δazimuth| to the reference view — front at
0°, side at 90°, back at 180° (`view_prompt_weights`; guochengqian/Magic123 nerf/utils.py:349-361,
:709-732; lyk412/Consistent123 nerf/utils.py:389-394, :850-879). The polar angle plays no part
(no overhead/bottom prompt), and the unconditional embedding stays that of the negative prompt.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from core.errors import InputError
from core.guidance.base import Diagnostics, GuidanceOutput, RenderBatch
from core.guidance.sds import classifier_free_guidance, score_distillation, sds_gradient, sds_weight
from core.models.loader import load_pretrained
from core.perf import GraphedCall, inductor_missing, to_device
from core.rendering.cameras import Cameras, wrap_degrees

log = logging.getLogger(__name__)


def weights_dtype(device: torch.device | str, fp16: bool) -> torch.dtype:
    """fp16 weights on a GPU when asked; fp32 on the CPU (CPU fp16 convolutions are slow/missing)."""
    return torch.float16 if fp16 and torch.device(device).type == "cuda" else torch.float32


def compile_mode(mode: str, device, have_triton: Optional[bool] = None, have_cc: Optional[bool] = None) -> str:
    """The torch.compile mode `mode` ('none' | 'auto' | 'default' | 'reduce-overhead' | 'graphs')
    comes to on `device`: 'none' off a GPU; 'auto' is 'graphs' where Inductor can build its kernels
    (Triton importable, a C compiler for Triton's launchers) and 'none' where it cannot, so that a
    plain `pip install` on a machine without a compiler gets the eager UNet, not an error mid-run.
    The compiled UNets give the eager SDS gradients (tests/test_gpu_backends.py) and save ~25% of a
    guided iteration after a ~90 s compile (reports/speed/README.md, sessions 9 and 12–13); 'graphs'
    (with guidance.streams 'two', which it allows) saved 1.7 ms a coarse iteration and 0.6 ms a fine
    one against 'reduce-overhead' on one H200 (session 34; 'auto' was 'reduce-overhead' until then)."""
    return _gpu_compile_mode(mode, device, "graphs", "UNet", "compile", have_triton, have_cc)


def _gpu_compile_mode(mode: str, device, auto: str, what: str, key: str, have_triton: Optional[bool],
                      have_cc: Optional[bool]) -> str:
    """`what`'s compile setting `key` on `device`: 'none' off a GPU; 'auto' is `auto` where Inductor can
    build its kernels (`inductor_missing`) and 'none' (logged) where it cannot; else as asked."""
    if mode == "none" or torch.device(device).type != "cuda":
        return "none"
    if mode != "auto":
        return mode
    why = inductor_missing(have_triton, have_cc)
    if why:
        log.info("%s: eager (%s=auto: %s)", what, key, why)
        return "none"
    return auto


def unet_layout(mode: str, layout: str, device, have_triton: Optional[bool] = None,
                have_cc: Optional[bool] = None) -> str:
    """The compiled UNet's Inductor layout that `layout` (sd/zero123.compile_layout: 'auto' | 'inductor'
    | 'channels_last') comes to with compile `mode` on `device`: 'inductor' (its heuristics' layout)
    where the UNet runs eagerly or under 'reduce-overhead' (torch.compile takes a mode or options, not
    both); 'auto' is 'channels_last' (`inductor_kwargs`) with 'graphs' and 'default'. H200, session 40,
    A B A B on one machine: a steady coarse iteration 34.8 / 35.3 → 33.7 / 33.6 ms, fine (805k faces)
    37.4 / 35.6 → 36.0 / 35.1 ms; the same SDS gradients up to fp16 rounding (tests/test_gpu_backends.py)."""
    mode = compile_mode(mode, device, have_triton, have_cc)
    if mode in ("none", "reduce-overhead"):
        return "inductor"
    return "channels_last" if layout == "auto" else layout


def compile_unet(unet, mode: str, device, layout: str = "auto"):
    """torch.compile a UNet for SDS (fixed shapes, no grad) on a GPU; eager elsewhere or for 'none'
    (`compile_mode`), in the layout `layout` comes to (`unet_layout`: by default forced channels-last
    with 'graphs' and 'default', Inductor's own with 'reduce-overhead').
    'reduce-overhead' captures CUDA graphs: the UNet's many small kernels are launch-bound eagerly. 'graphs': Inductor's kernels without its CUDA graphs (mode 'default'); the
    guidance then replays an SDS step's no-grad middle (the noising, the condition, the CFG batch,
    the UNet, the CFG sum, w(t)(ε̂ − ε)) as one CUDA graph of its own (core.perf.GraphedCall; the
    guidance's `graphed`), without Dynamo's guards and cudagraph trees' Python at every call (~4 ms
    of host time a UNet call on an H200 with 'reduce-overhead': reports/speed session 25)."""
    mode = compile_mode(mode, device)  # resolved once: 'auto' logs why where it comes to eager
    layout = unet_layout(mode, layout, device)
    if mode == "none":
        return unet
    inductor = "default" if mode == "graphs" else mode
    log.info("UNet: torch.compile(mode=%r%s)%s", inductor, ", channels-last" if layout == "channels_last" else "",
             ", the SDS step replayed as one CUDA graph" if mode == "graphs" else "")
    return torch.compile(unet, dynamic=False, **inductor_kwargs(inductor, layout == "channels_last"))


def to_channels_last(parts):
    """`parts` (Stable Diffusion's or Zero-1-to-3's) with the UNet's and the VAE's weights in the
    channels-last layout, in place: cuDNN runs half-precision convolutions NHWC, so an NCHW model
    converts the layout around each one. The outputs are the same up to the convolution algorithm
    (tests/test_prior_cache.py)."""
    for name in ("unet", "vae"):
        module = getattr(parts, name, None)
        if module is not None:
            module.to(memory_format=torch.channels_last)
    return parts


def vae_kernels_mode(mode: str, device) -> str:
    """What `vae_kernels` ('auto' | 'diffusers' | 'lift3d') comes to on `device`: 'auto' is lift3d
    on a GPU where Triton imports; off a GPU the kernels would fall back to torch's anyway."""
    if mode != "auto":
        return mode
    from core.representations.hashgrid import triton_available

    return "lift3d" if torch.device(device).type == "cuda" and triton_available() else "diffusers"


def use_vae_kernels(parts, mode: str, device):
    """`parts` (Stable Diffusion's or Zero-1-to-3's) with its VAE encoder on lift3d's kernels, in
    place, for mode 'lift3d' (`vae_kernels_mode`): every GroupNorm becomes a
    core.guidance.group_norm_triton.TritonGroupNorm (same parameters; torch's kernel where the Triton
    one does not apply) and the attention runs diffusers' AttnProcessor (baddbmm, softmax in fp32,
    bmm: cuBLAS forward and backward) instead of scaled_dot_product_attention, whose
    memory-efficient backward at head dim 512 (the encoder's one attention, 64² tokens at 512²)
    takes ~3 ms an H200 (reports/speed session 16). The same function up to float rounding
    (tests/test_priors.py, tests/test_gpu_backends.py)."""
    if vae_kernels_mode(mode, device) != "lift3d":
        return parts
    lift3d_encoder_kernels(parts.vae.encoder)
    log.info("VAE encoder: lift3d kernels (Triton GroupNorm, matmul attention)")
    return parts


def lift3d_encoder_kernels(encoder, group_norm: bool = True, attention: bool = True):
    """`encoder`'s GroupNorms as TritonGroupNorm and/or its attention on AttnProcessor, in place."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    from core.guidance.group_norm_triton import TritonGroupNorm

    for module in encoder.modules():
        if group_norm and type(module) is torch.nn.GroupNorm:
            module.__class__ = TritonGroupNorm
        elif attention and isinstance(module, Attention):
            module.set_processor(AttnProcessor())
    return encoder


@dataclass
class StableDiffusionParts:
    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    scheduler: Any
    # what was built over these modules for SDS (the compiled UNet, the encode function and its
    # graphs), shared by every parts object over them (dataclasses.replace passes it on): `per_prior`
    compiled: dict = field(default_factory=dict, repr=False, compare=False)


def per_prior(parts, key: tuple, make: Callable[[], Any]) -> Any:
    """`make()`, built once for the loaded prior `parts` stands for (its `compiled` dict, which every
    parts object over the same shared modules holds: core.guidance.factory) and `key`, then reused.
    The coarse and fine stages of one process (and every later asset in it) then run one compiled
    UNet and one graphed encoder per prior: a new torch.compile wrapper would trace again and a new
    encode function capture its graphs again (session 41, one H200: the fine stage, after the coarse
    stage in its process, stood ~54 s at its first guided iterations). A prior loaded afresh
    (LIFT3D_PRIOR_CACHE=0) has a new dict, so it builds its own."""
    if key not in parts.compiled:
        parts.compiled[key] = make()
    return parts.compiled[key]


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


def vae_moments(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and standard deviation of the VAE's posterior for images in [0, 1]."""
    dtype = next(vae.parameters()).dtype
    posterior = vae.encode(images.to(dtype) * 2.0 - 1.0).latent_dist
    return posterior.mean, posterior.std


def vae_compile_mode(mode: str, device, have_triton: Optional[bool] = None, have_cc: Optional[bool] = None) -> str:
    """What `vae_compile` ('auto' | 'none' | 'default' | 'channels_last') comes to on `device`: 'none'
    off a GPU; 'auto' is 'channels_last' where Inductor can build its kernels (`inductor_missing`) and
    'none' where it cannot. H200, session 39: the encode forward + backward 11.1 → 8.0 ms at 512², 3.8
    → 2.8 ms at 256² (replayed as graphs both); a steady iteration −3.2 ms in both stages, for
    ~47 s of compiling in a process without a compile cache (reports/speed)."""
    return _gpu_compile_mode(mode, device, "channels_last", "VAE encoder", "vae_compile", have_triton, have_cc)


def inductor_kwargs(mode: str, channels_last: bool = False) -> dict:
    """torch.compile's keywords for `mode`; `channels_last` (mode 'default' only) has Inductor lay the
    graph out channels-last whatever its heuristics say (its force_layout_optimization, for this
    graph alone: torch.compile takes either a mode or options)."""
    if not channels_last:
        return {"mode": mode}
    if mode != "default":
        raise ValueError(f"Inductor's channels-last layout needs compile mode 'default', not {mode!r}")
    return {"options": {"force_layout_optimization": True}}


def compile_vae_moments(mode: str, device, channels_last: bool = False):
    """`vae_moments` under torch.compile (forward and backward) on a GPU for mode 'default' (or
    'channels_last': 'default' with Inductor's layout forced channels-last), itself for 'none' and
    anywhere off a GPU. In SDS the render's gradient flows back through the encoder
    (the ∂z/∂I of eq. 5), so the encoder runs forward and backward at every guided iteration; eagerly
    its GroupNorm and SiLU are separate memory-bound kernels, which Inductor fuses (the textual
    inversion's encoder: 89 → 47 ms a batch of 16, reports/speed session 11). One compiled shape
    per prior (batch 1 at its resolution). `channels_last`: see inductor_kwargs."""
    mode = vae_compile_mode(mode, device)
    if mode == "none":
        return vae_moments
    if mode == "channels_last":
        mode, channels_last = "default", True
    log.info("VAE encoder: torch.compile(mode=%r%s)", mode, ", channels-last" if channels_last else "")
    return torch.compile(vae_moments, dynamic=False, **inductor_kwargs(mode, channels_last))


def vae_graphs_run_on(device) -> bool:
    """Whether `vae_graphs` takes effect on `device`: CUDA graphs, so only on a GPU."""
    return torch.device(device).type == "cuda"


def graph_group_norms(vae):
    """While a graph over `vae`'s encoder is captured: its lift3d GroupNorms (if any) take every row
    of at least group_norm_triton.GRAPH_MIN_ROW onto the Triton kernels, whose launches a graph makes
    free (eagerly, rows below MIN_ROW stay on torch's kernel, for the launches' host time)."""
    gnt = sys.modules.get("core.guidance.group_norm_triton")  # imported by use_vae_kernels, or no such norms
    return contextlib.nullcontext() if gnt is None else gnt.min_row_within(vae.encoder, gnt.GRAPH_MIN_ROW)


def graph_vae_moments(moments, device):
    """`moments` (vae_moments or its compiled copy) replayed as CUDA graphs on a GPU, itself
    elsewhere: per VAE and input shape, the first call with gradients on captures the encoder's
    forward and backward (torch.cuda.make_graphed_callables: a few warm-up runs, then one capture);
    later calls copy the image into the graph's input and replay the forward, and their backward
    replays the backward: one launch each instead of the encoder's several hundred kernels, which
    the host launches one by one (reports/speed session 16: the GPU waits on the host ~20–35 ms a
    guided iteration). The graph keeps one set of activations, so a call made while an earlier
    call's backward is still to come, or without gradients, runs `moments` itself. The outputs are
    cloned out of the graph's buffers. The graph's memory (the encoder's activations at its
    resolution) stays reserved for the process."""
    if not vae_graphs_run_on(device):
        return moments
    graphs: dict = {}  # (VAE, shape, dtype, device) → its graphed encode; lives as long as this function
    pending: set = set()  # graphs whose last forward's backward has not run yet

    def graphed(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (id(vae), tuple(images.shape), images.dtype, images.device)
        if not (torch.is_grad_enabled() and images.requires_grad and images.is_cuda) or key in pending:
            return moments(vae, images)
        if key not in graphs:
            log.info("VAE encoder: capturing CUDA graphs (forward and backward) for %s", tuple(images.shape))
            sample = images.detach().clone().requires_grad_(True)
            with graph_group_norms(vae):
                graphs[key] = torch.cuda.make_graphed_callables(lambda x: moments(vae, x), (sample,))
        # × 1: the graph's input gradient is one buffer that each replay overwrites; the product's
        # backward hands a fresh tensor on (a leaf image would otherwise keep the buffer as its .grad)
        mean, std = graphs[key](images * 1.0)
        pending.add(key)

        def backward_reached(grad):  # the gradient reaches an output: the backward graph replays next
            pending.discard(key)

        mean.register_hook(backward_reached)
        std.register_hook(backward_reached)
        return mean.clone(), std.clone()

    return graphed


def encoder_moments(prior_params, device):
    """The encode function a prior's SDS runs: vae_moments, compiled per `vae_compile`, replayed as
    CUDA graphs per `vae_graphs`."""
    moments = compile_vae_moments(prior_params.vae_compile, device)
    return graph_vae_moments(moments, device) if prior_params.vae_graphs else moments


def latent_shape(vae, n: int, height: int, width: int) -> tuple[int, int, int, int]:
    """The shape of `vae`'s latents for `n` images of height × width (each down block but the last halves them)."""
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    return n, vae.config.latent_channels, height // f, width // f


def encode_images(vae, images: torch.Tensor, generator: Optional[torch.Generator] = None,
                  moments=vae_moments, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Images in [0, 1] → scaled VAE latents, differentiable (the ∂z/∂I of eq. 5). `moments` is
    vae_moments or a compiled copy of it. The posterior's sample takes `noise` (a standard normal
    draw of latent_shape) or draws it from `generator` (on the host, so seeded)."""
    mean, std = moments(vae, images)
    if noise is None:
        noise = torch.randn(mean.shape, generator=generator)
    z = mean + std * to_device(noise, mean.device, mean.dtype)  # .sample(), seeded
    return z.float() * vae.config.scaling_factor


VIEW_SUFFIXES = (", front view", ", side view", ", back view")


def view_prompt_weights(azimuth: torch.Tensor, reference_azimuth: float = 0.0) -> torch.Tensor:
    """(B, 3) weights of the (front, side, back) prompts for cameras at `azimuth` (degrees).

    The released rule (Magic123 nerf/utils.py:711-730, Consistent123 nerf/utils.py:862-877), with
    a = |Δazimuth| ∈ [0°, 180°] to the reference view:
        a < 90°:  front·(1 − a/90) + side·(a/90)
        a ≥ 90°:  side·(2 − a/90) + back·(a/90 − 1)
    so 0° is the front prompt, 90° the side one, 180° the back one, and 60° is ⅓ front + ⅔ side.
    (The released code writes r = 1 ∓ Δ/90 per sign of Δ; it is the same function of |Δ|.)
    """
    a = wrap_degrees(azimuth.float() - reference_azimuth).abs()
    u = a / 90.0
    front = (1.0 - u).clamp(min=0.0)
    back = (u - 1.0).clamp(min=0.0)
    side = 1.0 - front - back
    return torch.stack([front, side, back], dim=-1)


class StableDiffusionGuidance:
    """L_2D of Magic123 eq. 5 for a batch of renders."""

    def __init__(self, parts: StableDiffusionParts, prompt: str, *, guidance_scale: float = 100.0,
                 t_range: tuple[float, float] = (0.2, 0.6), resolution: int = 512, seed: int = 0,
                 negative_prompt: str = "", view_dependent: bool = False, reference_azimuth: float = 0.0,
                 moments=vae_moments, graphed: bool = False):
        self.parts = parts
        # compile 'graphs': an SDS step's noising, guided ε̂ and w(t)(ε̂ − ε) replayed as one CUDA graph
        self.graphed_gradient = GraphedCall(self._gradient) if graphed else None
        self.moments = moments  # the encode function (encoder_moments)
        self.prompt = prompt
        self.view_dependent = bool(view_dependent)
        self.reference_azimuth = float(reference_azimuth)
        self.guidance_scale = float(guidance_scale)
        self.t_range = tuple(t_range)
        self.resolution = int(resolution)
        self.device = next(parts.unet.parameters()).device
        self.dtype = next(parts.unet.parameters()).dtype
        self.num_train_timesteps = int(parts.scheduler.config.num_train_timesteps)
        self.alphas_cumprod = parts.scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.generator = torch.Generator().manual_seed(seed)
        prompts = [negative_prompt, prompt] + ([prompt + s for s in VIEW_SUFFIXES] if self.view_dependent else [])
        emb = encode_prompts(parts, prompts)  # encoded once; the per-view mix is made per batch
        self.uncond_embeddings, self.text_embeddings = emb[:1].to(self.dtype), emb[1:2].to(self.dtype)
        self.view_embeddings = emb[2:].float() if self.view_dependent else None  # (3, 77, D): front, side, back
        log.info("2D prior: Stable Diffusion, prompt %r%s, CFG %.0f, t∈%s·T, %d²", prompt,
                 " + front/side/back view" if self.view_dependent else "", self.guidance_scale,
                 list(self.t_range), self.resolution)

    def text_embeddings_for(self, cameras: Optional[Cameras]) -> torch.Tensor:
        """The text condition (B or 1, 77, D) for renders from `cameras`: the view-dependent mix
        (`view_prompt_weights`) when on, else the one prompt's embedding."""
        if not self.view_dependent or cameras is None:
            return self.text_embeddings
        # the weights from the cameras' host copy where they have one (a few numbers, sent without
        # waiting), else on their device: copying the azimuths back would wait for the render
        az = cameras.for_small_math().azimuth.detach()
        w = to_device(view_prompt_weights(az, self.reference_azimuth), self.device)
        return torch.einsum("bk,kld->bld", w, self.view_embeddings).to(self.dtype)

    @torch.no_grad()
    def predict_noise(self, latents_noisy: torch.Tensor, t: torch.Tensor,
                      text_embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Classifier-free-guided ε̂ for a batch; the UNet runs without gradient. `text_embeddings`
        (1 or B, 77, D): the condition (default: the prompt's)."""
        text = self.text_embeddings if text_embeddings is None else text_embeddings
        return self._guided_eps(latents_noisy, to_device(t, self.device), text)

    def _guided_eps(self, latents_noisy: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """ε̂ from tensors on the UNet's device (capturable: no copy from the host)."""
        b = latents_noisy.shape[0]
        x_in = torch.cat([latents_noisy] * 2).to(self.dtype)
        t_in = torch.cat([t] * 2)
        cond = torch.cat([self.uncond_embeddings.expand(b, -1, -1), text.expand(b, -1, -1)])
        eps = self.parts.unet(x_in, t_in, encoder_hidden_states=cond).sample
        eps_uncond, eps_cond = eps.float().chunk(2)
        return classifier_free_guidance(eps_uncond, eps_cond, self.guidance_scale)

    def sds(self, latents: torch.Tensor, t: Optional[torch.Tensor] = None,
            noise: Optional[torch.Tensor] = None, cameras: Optional[Cameras] = None
            ) -> tuple[torch.Tensor, Diagnostics]:
        """SDS on given latents (B, 4, h, w): the loss whose gradient on `latents` is w(t)(ε̂ − ε)/B,
        conditioned on the view-dependent prompt of `cameras` when that is on."""
        text = self.text_embeddings_for(cameras)
        graphed = self.graphed_gradient
        return score_distillation(latents, lambda z, t_: self.predict_noise(z, t_, text), self.parts.scheduler,
                                  self.alphas_cumprod, self.t_range, self.generator, t, noise,
                                  gradient=(lambda z, e, t_: graphed(z, e, t_, text)) if graphed else None)

    def _gradient(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """w(t)(ε̂ − ε) from tensors on the UNet's device, as score_distillation computes it (capturable)."""
        latents_noisy = self.parts.scheduler.add_noise(latents, noise, t)
        return sds_gradient(self._guided_eps(latents_noisy, t, text), noise, sds_weight(self.alphas_cumprod, t))

    def __call__(self, batch: RenderBatch) -> GuidanceOutput:
        rgb = F.interpolate(batch.rgb, (self.resolution, self.resolution), mode="bilinear", align_corners=False)
        latents = encode_images(self.parts.vae, rgb.to(self.device), self.generator, self.moments)
        loss, diag = self.sds(latents, cameras=batch.cameras)
        return GuidanceOutput(loss=loss, diagnostics=diag)
