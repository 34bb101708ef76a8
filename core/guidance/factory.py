"""`build_guidance(params, reference, stage, device)`: the novel-view guidance a stage runs.

kinds: joint (Magic123 eqs. 7–8), dynamic (Consistent123 eqs. 8–9), none (reference view only),
oracle (a known procedural object; core.oracle.guidance, imported only when asked for). A prior
whose λ is 0 in this stage is not loaded. With params.models.tiny the tiny random priors of
core.testmodels.priors stand in for the hub models, through the same loader.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from core.rendering.cameras import reference_cameras
from core.guidance.priors import DynamicPrior, JointPrior, NoGuidance
from core.models.sources import prior_model as model_name

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
                                   object_scale=params.segment.object_scale)
            return sharp.rgb.float(), sharp.mask
        except Exception as e:  # noqa: BLE001 - the given reference still works, only blurrier
            log.warning("could not re-read %s at %d² (%s); using the %d² reference", path, size, e, rgb.shape[-1])
    return rgb, mask


def resolve_prompt(params, parts, reference: Any) -> str:
    """The SD prompt: the template with a token from params.prompt.learned_embeds, else a plain
    description (params.prompt.text), else a token learned now by textual inversion."""
    from core.guidance.sd import compose_prompt
    from core.guidance.textual_inversion import learn_token, load_learned_embeds

    ph = params.textual_inversion.placeholder
    token = None
    if params.prompt.learned_embeds:
        token = load_learned_embeds(params.prompt.learned_embeds, parts.tokenizer, parts.text_encoder)[0]
    elif params.prompt.text is None and params.textual_inversion.enabled and reference is not None:
        ti = params.textual_inversion
        log.info("textual inversion: learning %s for the reference image (%d steps)", ph, ti.steps)
        rgb, mask = _reference_rgb_mask(reference, params.sd.resolution, params)
        learn_token(parts, rgb, mask, token=ph, initializer=ti.initializer, steps=ti.steps, lr=ti.lr,
                    batch_size=ti.batch_size, resolution=params.sd.resolution, seed=params.seed)
        token = ph
    return compose_prompt(params.prompt.template, ph, token, params.prompt.text)


def build_sd_guidance(params, reference: Any, device):
    from core.guidance.sd import StableDiffusionGuidance, compile_unet, load_stable_diffusion, weights_dtype

    dtype = weights_dtype(device, params.sd.fp16)
    parts = load_stable_diffusion(model_name(params, "sd"), device, dtype, params.models)
    prompt = resolve_prompt(params, parts, reference)
    parts.unet = compile_unet(parts.unet, params.sd.compile, device)  # after textual inversion (which needs grad)
    return StableDiffusionGuidance(parts, prompt, guidance_scale=params.sd.guidance_scale,
                                   t_range=params.sd.t_range, resolution=params.sd.resolution, seed=params.seed)


def build_zero123_guidance(params, reference: Any, device):
    from core.guidance.sd import compile_unet, weights_dtype
    from core.guidance.zero123 import Zero123Guidance, load_zero123

    dtype = weights_dtype(device, params.zero123.fp16)
    parts = load_zero123(model_name(params, "zero123"), device, dtype, params.models)
    parts.unet = compile_unet(parts.unet, params.zero123.compile, device)
    rgb, _ = _reference_rgb_mask(reference, params.zero123.resolution, params)
    return Zero123Guidance(parts, rgb, reference_cameras(params.camera), guidance_scale=params.zero123.guidance_scale,
                           t_range=params.zero123.t_range, resolution=params.zero123.resolution, seed=params.seed)


def build_guidance(params, reference: Any, stage: str = "coarse", device="cpu"):
    """The guidance of `stage` ('coarse' | 'fine') for params.guidance.kind.

    `reference`: core.inputs.images.Reference (rgb (3,H,W) on white, mask) or an rgb tensor."""
    device = torch.device(device)
    kind = params.guidance.kind
    if kind == "none":
        return NoGuidance()
    if kind == "oracle":
        from core.oracle.guidance import OracleGuidance  # Helper A's; imported only when used

        if not params.guidance.oracle_object:
            from core.errors import InputError

            raise InputError("guidance.kind is 'oracle' but guidance.oracle_object is not set")
        return OracleGuidance(params.guidance.oracle_object, params)
    weights = getattr(params.guidance, stage)
    l2, l3 = weights.lambda_2d, weights.lambda_3d
    sd = build_sd_guidance(params, reference, device) if l2 > 0 else None
    z123 = build_zero123_guidance(params, reference, device) if l3 > 0 else None
    if kind == "joint":
        log.info("guidance: joint prior (Magic123 eq. 7), %s stage: λ_2D=%g%s, λ_3D=%g%s", stage, l2,
                 "" if sd else " (not loaded)", l3, "" if z123 else " (not loaded)")
        return JointPrior(sd, z123, l2, l3)
    if kind == "dynamic":
        prior = DynamicPrior(sd, z123, l2, l3, schedule=params.guidance.dynamic_schedule)
        if stage == "fine":  # Consistent123's released code: the dynamic prior runs on through DMTet
            prior.start_stage2(0)
        log.info("guidance: dynamic prior (Consistent123 eq. 8/9, %s), %s stage", prior.schedule, stage)
        return prior
    raise ValueError(f"unknown guidance kind {kind!r}")
