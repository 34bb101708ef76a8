"""`build_guidance(params, reference, stage, device)`: the novel-view guidance a stage runs.

kinds: joint (Magic123 eqs. 7–8), dynamic (Consistent123 eqs. 8–9), none (reference view only),
oracle (a known procedural object; core.oracle.guidance, imported only when asked for). A prior
whose λ is 0 in this stage is not loaded. With params.models.tiny the tiny random priors of
core.testmodels.priors stand in for the hub models, through the same loader. The priors are loaded
once per process and reused by every asset that runs in it (core.models.cache; `stable_diffusion_parts`,
`zero123_parts`).
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from core.rendering.cameras import reference_cameras
from core.guidance.priors import DynamicPrior, JointPrior, NoGuidance, PriorStreams, SDSGradientScale, prior_streams
from core.models.cache import PRIORS
from core.models.sources import prior_model

log = logging.getLogger(__name__)


def _reference_rgb_mask(reference: Any, size: Optional[int] = None,
                        params=None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The reference's rgb (3,H,W) and mask. The coarse loop loads the reference at the render size
    (128²); when the prior needs more pixels (Zero-1-to-3: 256², textual inversion: 512²) and the
    image file is known, it is read again at that size with the same framing."""
    if torch.is_tensor(reference):
        return reference.float(), None
    rgb, mask = reference.rgb.float(), getattr(reference, "mask", None)
    path = getattr(reference, "image_path", None)
    if size and path and rgb.shape[-1] < size and params is not None:
        try:
            from core.inputs.images import load_reference

            sharp = load_reference(path, None, size=size, max_pixels=params.segment.max_input_pixels,
                                   object_scale=params.segment.object_scale, params=params)
            return sharp.rgb.float(), sharp.mask
        except Exception as e:  # noqa: BLE001 - the given reference still works, only blurrier
            log.warning("could not re-read %s at %d² (%s); using the %d² reference", path, size, e, rgb.shape[-1])
    return rgb, mask


def resolve_token(params, parts, reference: Any, token: Optional[dict] = None) -> Optional[dict]:
    """The token embedding the 2D prior guides with, added to the tokenizer and text encoder:
    `token` when given (a stage continuing an earlier one: the same embedding), else the file
    params.prompt.learned_embeds, else — without a plain description, textual inversion on — one
    learned now (Magic123 §2.2). None when the prompt is the plain description. Returns
    {placeholder: embedding}."""
    from core.guidance.textual_inversion import add_token, learn_token_from_params, read_learned_embeds

    if token:
        for name, vec in token.items():
            add_token(parts.tokenizer, parts.text_encoder, name, embedding=vec)
        return {k: v.detach().float().cpu().clone() for k, v in token.items()}
    if params.prompt.learned_embeds:
        embeds = read_learned_embeds(params.prompt.learned_embeds)
        for name, vec in embeds.items():
            add_token(parts.tokenizer, parts.text_encoder, name, embedding=vec)
        log.info("loaded token(s) %s from %s", ", ".join(embeds), params.prompt.learned_embeds)
        return embeds
    if params.prompt.text is None and params.textual_inversion.enabled and reference is not None:
        ti = params.textual_inversion
        log.info("textual inversion: learning %s for the reference image (%d steps)", ti.placeholder, ti.steps)
        rgb, mask = _reference_rgb_mask(reference, params.sd.resolution, params)
        return learn_token_from_params(parts, rgb, mask, params)
    return None


def stage_t_range(prior_params, stage: str) -> tuple[float, float]:
    """The SDS t range of `stage`: `fine_t_range` in the fine stage when set (released: Magic123
    main.py:413, Consistent123 main.py:352), else `t_range`."""
    if stage == "fine" and prior_params.fine_t_range is not None:
        return tuple(prior_params.fine_t_range)
    return tuple(prior_params.t_range)


def _cache_key(which: str, name: str, device, dtype, models_params) -> tuple:
    return (which, name, str(dtype), str(torch.device(device)), str(getattr(models_params, "cache_dir", None)))


def _shared_prior(which: str, params, device, dtype: Optional[torch.dtype], load):
    """params' `which` prior ('sd' or 'zero123') as `load(name, device, dtype, models)` gives it,
    loaded once per process and key (core.models.cache); its UNet and VAE channels-last when
    params.<which>.channels_last, its VAE encoder on lift3d's kernels when params.<which>.vae_kernels
    comes to 'lift3d' (core.guidance.sd.use_vae_kernels)."""
    from core.guidance.sd import to_channels_last, use_vae_kernels, vae_kernels_mode, weights_dtype

    device = torch.device(device)
    dtype = dtype or weights_dtype(device, getattr(params, which).fp16)
    name = prior_model(params, which)
    channels_last = bool(getattr(params, which).channels_last)
    kernels = vae_kernels_mode(getattr(params, which).vae_kernels, device)

    def load_it():
        parts = load(name, device, dtype, params.models)
        parts = to_channels_last(parts) if channels_last else parts
        return use_vae_kernels(parts, kernels, device)

    return PRIORS.get(_cache_key(which, name, device, dtype, params.models) + (channels_last, kernels), load_it,
                      label=f"{which}:{name}:{str(dtype).replace('torch.', '')}:{device}"
                            + (":channels_last" if channels_last else "") + (":lift3d_vae" if kernels == "lift3d" else ""))


def stable_diffusion_parts(params, device, dtype: Optional[torch.dtype] = None):
    """params' Stable Diffusion, loaded once per process (core.models.cache): a new parts object
    whose tokenizer and text encoder are this caller's own copies (a token is added to them,
    textual inversion trains a row) and whose UNet, VAE and scheduler are shared, read-only."""
    import copy
    import dataclasses

    from core.guidance.sd import load_stable_diffusion

    shared = _shared_prior("sd", params, device, dtype, load_stable_diffusion)
    return dataclasses.replace(shared, tokenizer=copy.deepcopy(shared.tokenizer),
                               text_encoder=copy.deepcopy(shared.text_encoder))


def zero123_parts(params, device, dtype: Optional[torch.dtype] = None):
    """params' Zero-1-to-3, loaded once per process (core.models.cache); a new parts object over the
    shared, read-only modules."""
    import dataclasses

    from core.guidance.zero123 import load_zero123

    return dataclasses.replace(_shared_prior("zero123", params, device, dtype, load_zero123))


def build_sd_guidance(params, reference: Any, device, token: Optional[dict] = None, stage: str = "coarse"):
    from core.guidance.sd import StableDiffusionGuidance, compile_mode, compose_prompt

    parts = stable_diffusion_parts(params, device)
    embeds = resolve_token(params, parts, reference, token)
    prompt = compose_prompt(params.prompt.template, params.textual_inversion.placeholder,
                            next(iter(embeds)) if embeds else None, params.prompt.text)
    # after textual inversion (which needs grad)
    parts.unet, moments = sds_modules(parts, params.sd, device)
    guidance = StableDiffusionGuidance(parts, prompt, guidance_scale=params.sd.guidance_scale,
                                       t_range=stage_t_range(params.sd, stage), resolution=params.sd.resolution,
                                       seed=params.seed, view_dependent=params.sd.view_dependent_prompt,
                                       reference_azimuth=params.camera.ref_azimuth, moments=moments,
                                       graphed=compile_mode(params.sd.compile, device) == "graphs")
    return guidance, embeds


def build_zero123_guidance(params, reference: Any, device, stage: str = "coarse"):
    from core.guidance.sd import compile_mode
    from core.guidance.zero123 import Zero123Guidance

    parts = zero123_parts(params, device)
    parts.unet, moments = sds_modules(parts, params.zero123, device)
    rgb, _ = _reference_rgb_mask(reference, params.zero123.resolution, params)
    return Zero123Guidance(parts, rgb, reference_cameras(params.camera), guidance_scale=params.zero123.guidance_scale,
                           t_range=stage_t_range(params.zero123, stage), resolution=params.zero123.resolution,
                           seed=params.seed, angle_weighting=params.zero123.angle_weighting,
                           moments=moments, graphed=compile_mode(params.zero123.compile, device) == "graphs")


def sds_modules(parts, prior_params, device):
    """(UNet, encode function) a prior's SDS runs: its UNet compiled per `compile` and
    `compile_layout`, its VAE encode per `vae_compile` and `vae_graphs`, built once per loaded prior
    and settings (core.guidance.sd.per_prior): each stage and asset of a process runs the same ones."""
    from core.guidance.sd import compile_unet, encoder_moments, per_prior

    device = torch.device(device)
    p = prior_params
    unet = per_prior(parts, ("unet", p.compile, p.compile_layout, str(device)),
                     lambda: compile_unet(parts.unet, p.compile, device, p.compile_layout))
    moments = per_prior(parts, ("moments", p.vae_compile, p.vae_graphs, str(device)),
                        lambda: encoder_moments(p, device))
    return unet, moments


def guidance_streams(params, device) -> str:
    """What params.guidance.streams comes to on `device` ('one' | 'two'; core.guidance.priors.prior_streams)."""
    from core.guidance.sd import compile_mode

    return prior_streams(params.guidance.streams, device,
                         {k: compile_mode(getattr(params, k).compile, device) for k in ("sd", "zero123")})


def build_guidance(params, reference: Any, stage: str = "coarse", device="cpu", token: Optional[dict] = None):
    """The guidance of `stage` ('coarse' | 'fine') for params.guidance.kind.

    `reference`: core.inputs.images.Reference (rgb (3,H,W) on white, mask) or an rgb tensor.
    `token`: the {placeholder: embedding} an earlier stage guided with (see resolve_token). The
    returned guidance's `token_embeds` is the embedding in use (None without one)."""
    device = torch.device(device)
    kind = params.guidance.kind
    if kind == "none":
        return NoGuidance()
    if kind == "oracle":
        from core.oracle.guidance import OracleGuidance  # imported only when used

        if not params.guidance.oracle_object:
            from core.errors import InputError

            raise InputError("guidance.kind is 'oracle' but guidance.oracle_object is not set")
        return OracleGuidance(params.guidance.oracle_object, params)
    weights = getattr(params.guidance, stage)
    l2, l3 = weights.lambda_2d, weights.lambda_3d
    sd, embeds = build_sd_guidance(params, reference, device, token, stage) if l2 > 0 else (None, token)
    z123 = build_zero123_guidance(params, reference, device, stage) if l3 > 0 else None
    balance = SDSGradientScale.from_params(params)  # docs/fidelity.md "SDS balance (item 1)"
    if balance.mode != "none":
        ls = params.guidance.loss_scale
        log.info("guidance: SDS gradient × 1/loss scale as released (%g, ×%g every %d iterations)",
                 ls.init_scale, ls.growth_factor, ls.growth_interval)
    two = guidance_streams(params, device) == "two" and sd is not None and z123 is not None
    streams = PriorStreams(device) if two else None
    if streams is not None:
        log.info("guidance: the two priors on two CUDA streams (guidance.streams)")
    if kind == "joint":
        log.info("guidance: joint prior (Magic123 eq. 7), %s stage: λ_2D=%g%s, λ_3D=%g%s", stage, l2,
                 "" if sd else " (not loaded)", l3, "" if z123 else " (not loaded)")
        prior = JointPrior(sd, z123, l2, l3, sds_scale=balance, streams=streams)
    elif kind == "dynamic":
        # the stage-2 switch comes from the detector (coarse) or the coarse stage's state (fine)
        prior = DynamicPrior(sd, z123, l2, l3, schedule=params.guidance.dynamic_schedule,
                             reading=params.guidance.dynamic_reading, sds_scale=balance, streams=streams)
        log.info("guidance: dynamic prior (Consistent123 eq. 8/9, %s), %s stage", prior.schedule, stage)
    else:
        raise ValueError(f"unknown guidance kind {kind!r}")
    prior.token_embeds = embeds
    prior.first_call_note = first_call_note(params, device, sd is not None, z123 is not None)
    return prior


def first_call_note(params, device, sd: bool, zero123: bool) -> str:
    """What a stage's progress bar says at its first guided iteration when the priors in use (`sd`,
    `zero123`) compile there (`priors_compile`): the bar would otherwise stand
    still for minutes without a word (session 41, one H200, empty compile caches: the coarse stage's
    first guided iteration took ~3 min); '' otherwise."""
    if not priors_compile(params, device, sd, zero123):
        return ""
    return "the priors' first calls: compiling and capturing graphs (minutes where the compile caches are empty)"


def priors_compile(params, device, sd: bool, zero123: bool) -> bool:
    """Whether the priors in use (`sd`, `zero123`) compile on `device`: a UNet's or a VAE encoder's
    compile setting not 'none' on a GPU where Inductor builds (core.perf.inductor_missing)."""
    from core.perf import inductor_missing

    if torch.device(device).type != "cuda":
        return False
    used = [p for p, on in ((params.sd, sd), (params.zero123, zero123)) if on]
    modes = [m for p in used for m in (p.compile, p.vae_compile) if m != "none"]
    return bool(modes) and not (all(m == "auto" for m in modes) and inductor_missing())
