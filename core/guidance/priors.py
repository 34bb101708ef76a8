"""How the 2D and 3D priors combine: Magic123's joint prior and Consistent123's dynamic prior.

* Joint prior, Magic123 eq. 7: L_g = λ_2D·L_2D + λ_3D·L_3D with per-stage weights (coarse 1 and
  40, fine 0.001 and 0.01). Eq. 8 fixes λ_3D = 40 and renames λ_2D the λ_2D/3D knob — the one
  users turn (`--set guidance.coarse.lambda_2d=…`). A prior whose λ is 0 is neither loaded nor
  run (the ablations magic123-2d / magic123-3d).
* Dynamic prior, Consistent123 §3.2–3.3: stage 1 uses the 3D prior only until the CLIP detector
  fires (`start_stage2(step)`); then eq. 8, L_DP = e^(−t/T)·L_3D + (1 − e^(−t/T))·L_2D, with t the
  iterations since the switch and T the iterations the stage-2 schedule spans; eq. 9's linear and
  log variants for the ablation (§4.4), by default as the released code computes them (see
  `dynamic_prior_weights`). The per-stage λ's of params.guidance scale each prior on top of
  the schedule (λ_3D·w_3D(t)·L_3D + λ_2D·w_2D(t)·L_2D), so the priors' magnitudes stay those of
  the joint prior.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from core.guidance.base import GuidanceOutput, RenderBatch


def joint_prior_loss(loss_2d: Optional[torch.Tensor], loss_3d: Optional[torch.Tensor],
                     lambda_2d: float, lambda_3d: float) -> torch.Tensor:
    """Magic123 eq. 7: L_g = λ_2D·L_2D + λ_3D·L_3D (eq. 8: λ_2D is the λ_2D/3D knob, λ_3D = 40).
    A missing loss (its prior not loaded because its λ is 0) contributes nothing."""
    total = None
    for lam, loss in ((lambda_2d, loss_2d), (lambda_3d, loss_3d)):
        if loss is not None and lam != 0.0:
            total = lam * loss if total is None else total + lam * loss
    if total is None:
        raise ValueError("joint prior: both priors are off (λ_2D = λ_3D = 0)")
    return total


DYNAMIC_READINGS = ("released", "paper")


def dynamic_prior_weights(t: float, T: float, kind: str = "exp",
                          reading: str = "released") -> tuple[float, float]:
    """(w_3D, w_2D) of Consistent123's dynamic prior at iteration t of T (t counted from the switch).

    With x = t/T, clamped to [0, 1]:

    reading="released" (default) — the authors' code, lyk412/Consistent123 nerf/utils.py:494-515
    (`Trainer.adjust_loss_weights`): w_2D = f(x), w_3D = 1 − f(x), with
        exp    (eq. 8)  f(x) = 1 − e^(−x)
        linear (eq. 9)  f(x) = x
        log    (eq. 9)  f(x) = log2(1 + x)
    so every schedule starts on the 3D prior (w_3D = 1 at x = 0), moves weight to the 2D prior, and
    the weights lie in [0, 1] and sum to 1. (The released code starts w_2D at 1e-5 instead of 0 and
    computes in float16 — nerf/utils.py:249-254; both are left out here: a 1e-5 difference.)

    reading="paper" — eq. 9 exactly as printed in §4.4 (eq. 8 is the same in both readings):
        linear  w_3D = x,         w_2D = 1 − x       (reversed: starts on the 2D prior)
        log     w_3D = log2(x),   w_2D = 1 − log2(x) (w_3D ≤ 0; −∞ at x = 0, so x is clamped to
                                                      ≥ 1/T, one iteration, to stay finite)
    """
    if T <= 0:
        raise ValueError(f"dynamic prior: T must be positive, got {T}")
    if reading not in DYNAMIC_READINGS:
        raise ValueError(f"dynamic prior: unknown reading '{reading}' (released, paper)")
    # The released code has no clamp: its x stays in [0, 1] because its T runs to the end of the
    # run (nerf/utils.py:1074-1075, 1127-1129). Clamped here so a shorter T cannot leave [0, 1].
    x = min(max(float(t), 0.0), float(T)) / float(T)
    if kind == "exp":  # Consistent123 eq. 8 (= released `exponential`, alpha = 1)
        w3 = math.exp(-x)
        return w3, 1.0 - w3
    if kind == "linear":  # Consistent123 eq. 9 (left)
        if reading == "paper":
            return x, 1.0 - x
        return 1.0 - x, x
    if kind == "log":  # Consistent123 eq. 9 (right)
        if reading == "paper":
            w3 = math.log2(max(x, 1.0 / float(T)))
            return w3, 1.0 - w3
        w2 = math.log2(1.0 + x)
        return 1.0 - w2, w2
    raise ValueError(f"dynamic prior: unknown schedule '{kind}' (exp, linear, log)")


def _run(prior, batch: RenderBatch, name: str, diag: dict[str, float]) -> torch.Tensor:
    out = prior(batch)
    for k, v in out.diagnostics.items():
        diag[f"{name}/{k}"] = v
    diag[f"{name}/loss"] = float(out.loss.detach())
    return out.loss


def _generators(prior) -> dict[str, torch.Generator]:
    """The random streams of a prior's parts (SDS timesteps and noise), by part name."""
    return {name: part.generator for name, part in (("sd", prior.sd), ("zero123", prior.zero123))
            if part is not None and isinstance(getattr(part, "generator", None), torch.Generator)}


class JointPrior:
    """Magic123's joint 2D + 3D prior (eqs. 7–8). `sd` / `zero123` may be None when their λ is 0."""

    def __init__(self, sd, zero123, lambda_2d: float, lambda_3d: float):
        if (sd is None or lambda_2d == 0) and (zero123 is None or lambda_3d == 0):
            raise ValueError("joint prior: both priors are off (λ_2D = λ_3D = 0)")
        self.sd, self.zero123 = sd, zero123
        self.lambda_2d, self.lambda_3d = float(lambda_2d), float(lambda_3d)

    def generators(self) -> dict[str, torch.Generator]:
        return _generators(self)

    def __call__(self, batch: RenderBatch) -> GuidanceOutput:
        diag: dict[str, float] = {"lambda_2d": self.lambda_2d, "lambda_3d": self.lambda_3d}
        l2 = _run(self.sd, batch, "sd", diag) if self.sd is not None and self.lambda_2d else None
        l3 = _run(self.zero123, batch, "zero123", diag) if self.zero123 is not None and self.lambda_3d else None
        loss = joint_prior_loss(l2, l3, self.lambda_2d, self.lambda_3d)
        diag["loss"] = float(loss.detach())
        return GuidanceOutput(loss=loss, diagnostics=diag)


class DynamicPrior:
    """Consistent123's two-stage prior: 3D only, then the dynamic mix of eq. 8 (or eq. 9)."""

    def __init__(self, sd, zero123, lambda_2d: float, lambda_3d: float, schedule: str = "exp",
                 span: Optional[int] = None, switch_step: Optional[int] = None, reading: str = "released"):
        if zero123 is None:
            raise ValueError("dynamic prior: the 3D prior (Zero-1-to-3) is required for stage 1")
        dynamic_prior_weights(0, 1, schedule, reading)  # validate the names now
        self.sd, self.zero123 = sd, zero123
        self.lambda_2d, self.lambda_3d = float(lambda_2d), float(lambda_3d)
        self.schedule = schedule
        self.reading = reading  # eq. 9 as the released code computes it, or as printed
        self.span = span  # T; default: the iterations left in the stage after the switch
        self.switch_step: Optional[int] = switch_step

    @property
    def in_stage2(self) -> bool:
        return self.switch_step is not None

    def start_stage2(self, step: int) -> None:
        """Consistent123 §3.2: the detector fired (or the forced switch came) at `step`."""
        if self.switch_step is None:
            self.switch_step = int(step)

    def weights(self, step: int, total_steps: int) -> tuple[float, float]:
        """(w_3D, w_2D) at `step`: (1, 0) in stage 1, eq. 8/9 in stage 2."""
        if not self.in_stage2:
            return 1.0, 0.0
        t = step - self.switch_step
        T = self.span or max(total_steps - self.switch_step, 1)
        return dynamic_prior_weights(t, T, self.schedule, self.reading)

    def generators(self) -> dict[str, torch.Generator]:
        return _generators(self)

    def state_dict(self) -> dict:
        return {"switch_step": self.switch_step, "schedule": self.schedule, "span": self.span}

    def load_state_dict(self, state: dict) -> None:
        self.switch_step = state.get("switch_step")
        self.span = state.get("span", self.span)

    def __call__(self, batch: RenderBatch) -> GuidanceOutput:
        w3, w2 = self.weights(batch.step, batch.total_steps)
        diag: dict[str, float] = {"w_3d": w3, "w_2d": w2, "in_stage2": float(self.in_stage2)}
        loss = None
        if w3 != 0.0 and self.lambda_3d:
            loss = self.lambda_3d * w3 * _run(self.zero123, batch, "zero123", diag)
        if w2 != 0.0 and self.lambda_2d and self.sd is not None:
            l2 = self.lambda_2d * w2 * _run(self.sd, batch, "sd", diag)
            loss = l2 if loss is None else loss + l2
        if loss is None:
            loss = batch.rgb.sum() * 0.0
        diag["loss"] = float(loss.detach())
        return GuidanceOutput(loss=loss, diagnostics=diag)


class NoGuidance:
    """guidance.kind = none: the reference view alone (a zero loss that keeps the graph)."""

    def __call__(self, batch: RenderBatch) -> GuidanceOutput:
        return GuidanceOutput(loss=batch.rgb.sum() * 0.0, diagnostics={})
