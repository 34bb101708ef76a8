"""Score distillation sampling (DreamFusion), shared by the 2D and 3D priors.

Magic123 eq. 5 (2D prior) and eq. 6 (3D prior), Consistent123 eqs. 4 and 7, all have the form

    ∇_θ L = E_{t,ε}[ w(t) (ε̂_φ(z_t; y, t) − ε) ∂z/∂I ∂I/∂θ ]

with ε̂ the classifier-free-guided noise prediction and w(t) = σ_t² = 1 − ᾱ_t (DreamFusion's
weighting, the one threestudio and the Magic123 code use). The UNet Jacobian is dropped: the UNet
runs under no_grad and the gradient is injected into the latent z with the standard trick

    loss = ½ ‖z − stopgrad(z − g)‖² / B,   so that  ∂loss/∂z = g / B,

i.e. the per-sample SDS gradient g = w(t)(ε̂ − ε), averaged over the batch of B renders (the
normalisation threestudio uses). The loss *value* ½‖g‖²/B is only a diagnostic.
"""
from __future__ import annotations

import torch

from core.guidance.base import Diagnostics
from core.perf import to_device


def sample_timesteps(batch: int, num_train_timesteps: int, t_range: tuple[float, float],
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """t ~ U{⌊t_lo·T⌋, …, ⌊t_hi·T⌋} (Magic123: t ∈ [0.2, 0.6] of the schedule). Long, on the CPU."""
    lo = int(num_train_timesteps * t_range[0])
    hi = int(num_train_timesteps * t_range[1])
    return torch.randint(lo, hi + 1, (batch,), generator=generator, dtype=torch.long)


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """ε̂ = ε_uncond + s (ε_cond − ε_uncond) (Ho & Salimans; s = 100 for SD, 5 for Zero-1-to-3)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def sds_weight(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """DreamFusion's w(t) = σ_t² = 1 − ᾱ_t, shaped (B, 1, 1, 1)."""
    return (1.0 - alphas_cumprod.to(t.device)[t]).reshape(-1, 1, 1, 1)


def sds_gradient(eps_hat: torch.Tensor, noise: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The SDS gradient on the latent, w(t)(ε̂ − ε): Magic123 eqs. 5–6 without ∂z/∂I ∂I/∂θ."""
    return torch.nan_to_num(weight * (eps_hat.float() - noise.float()))


def sds_loss(latents: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """½‖z − sg(z − g)‖² / B: its gradient on z is g / B (see the module docstring)."""
    target = (latents - grad).detach()
    return 0.5 * ((latents.float() - target.float()) ** 2).sum() / latents.shape[0]


def score_distillation(latents: torch.Tensor, predict_noise, scheduler, alphas_cumprod: torch.Tensor,
                       t_range: tuple[float, float], generator: torch.Generator | None = None,
                       t: torch.Tensor | None = None, noise: torch.Tensor | None = None, gradient=None
                       ) -> tuple[torch.Tensor, Diagnostics]:
    """One SDS step on latents (B, C, h, w): sample t and ε, noise the latents, ask the prior for
    ε̂ = predict_noise(z_t, t) (guided) under no_grad, and return the loss whose gradient on the
    latents is w(t)(ε̂ − ε)/B (Magic123 eqs. 5–6) with its diagnostics. `gradient(z, ε, t)`, when
    given, does the noising, the prediction and w(t)(ε̂ − ε) in one (a prior's CUDA-graph replay of
    them: compile 'graphs'); `predict_noise` is then not called."""
    num_t = scheduler.config.num_train_timesteps
    device = latents.device
    if t is None:
        t = sample_timesteps(latents.shape[0], num_t, t_range, generator)
    # a diagnostic; t is drawn on the host (the seeded stream), where reading it waits for nothing
    t_frac = float(t.float().mean()) / num_t if t.device.type == "cpu" else t.float().mean() / num_t
    t = to_device(t, device)
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator)
    noise = to_device(noise, device)
    with torch.no_grad():
        if gradient is not None:
            grad = gradient(latents.detach().float(), noise.float(), t)
        else:
            latents_noisy = scheduler.add_noise(latents.detach().float(), noise.float(), t)
            eps_hat = predict_noise(latents_noisy, t)
            grad = sds_gradient(eps_hat, noise, sds_weight(alphas_cumprod, t))
    loss = sds_loss(latents, grad)
    # the diagnostics stay scalar tensors on the device (core.guidance.base): float() of them here
    # would make the host wait for the UNet at every step
    return loss, {"t": t_frac, "grad_norm": grad.norm(), "loss": loss.detach()}


# ------------------------------------------------------------------------ the released SDS balance
# Magic123's released trainer (guochengqian/Magic123 nerf/utils.py, guidance/sd_utils.py,
# guidance/zero123_utils.py; docs/fidelity.md "SDS balance (item 1)") trains under fp16 autocast
# with a torch.cuda.amp.GradScaler and injects the SDS gradient with
# `latents.backward(gradient=grad)` *inside* the guidance's train_step: that gradient never passes
# through `scaler.scale(loss)`, while the reference losses and the regularisers do. The scaler's
# `unscale_` then divides every gradient by the loss scale S, so the SDS gradient reaches the
# parameters as grad / S. S follows GradScaler's schedule: init_scale, ×growth_factor after every
# growth_interval consecutive steps without inf/nan gradients, ×backoff_factor on a step that
# overflows (that step is skipped and the count restarts). lift3d reproduces that *effect* as a
# factor on the prior's loss (whose gradient is the SDS gradient): `sds_gradient_multiplier`.

SDS_GRADIENT_SCALES = ("loss_scale_schedule", "none")


def loss_scale_at(step: int, init_scale: float = 65536.0, growth_factor: float = 2.0,
                  growth_interval: int = 2000, backoff_factor: float = 0.5,
                  overflow_steps: tuple[int, ...] | list[int] = ()) -> float:
    """The loss scale a torch GradScaler (fresh at step 0) applies at 0-based iteration `step`.

    Every iteration is one `scaler.step` + `scaler.update()`. After `growth_interval` consecutive
    iterations whose gradients were finite the scale is multiplied by `growth_factor`; an iteration
    in `overflow_steps` (inf/nan found) multiplies it by `backoff_factor` and restarts the count.
    Without overflows: init · growth^⌊step / interval⌋ (65536 for steps 0–1999, 131072 for
    2000–3999, 262144 for 4000–5999 with the defaults)."""
    step = int(step)
    if step < 0:
        raise ValueError(f"loss scale: step must be ≥ 0, got {step}")
    if growth_interval < 1:
        raise ValueError(f"loss scale: growth_interval must be ≥ 1, got {growth_interval}")
    overflows = sorted(int(s) for s in overflow_steps if 0 <= int(s) < step)
    if not overflows:
        return float(init_scale) * float(growth_factor) ** (step // growth_interval)
    scale, tracker, k = float(init_scale), 0, 0
    for i in range(step):  # the update at the end of iteration i sets the scale of iteration i + 1
        if k < len(overflows) and overflows[k] == i:
            scale *= backoff_factor
            tracker = 0
            k += 1
        else:
            tracker += 1
            if tracker == growth_interval:
                scale *= growth_factor
                tracker = 0
    return scale


def sds_gradient_multiplier(step: int, mode: str = "loss_scale_schedule", init_scale: float = 65536.0,
                            growth_factor: float = 2.0, growth_interval: int = 2000) -> float:
    """The factor on the SDS gradient at 0-based stage iteration `step`: 1 / loss_scale_at(step)
    for 'loss_scale_schedule' (the released Magic123 code's effective balance), 1 for 'none' (the
    paper's λ's at face value)."""
    if mode == "none":
        return 1.0
    if mode == "loss_scale_schedule":
        return 1.0 / loss_scale_at(step, init_scale, growth_factor, growth_interval)
    raise ValueError(f"unknown SDS gradient scale {mode!r} ({', '.join(SDS_GRADIENT_SCALES)})")
