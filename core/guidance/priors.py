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
* The SDS balance (`SDSGradientScale`): the released Magic123 code's SDS gradient reaches the
  parameters divided by the fp16 loss scale (core.guidance.sds.sds_gradient_multiplier;
  docs/fidelity.md "SDS balance (item 1)"). Both priors multiply their whole loss — whose gradient
  is the SDS gradient — by the factor of the stage iteration, λ's included.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch

from core.guidance.base import Diagnostics, GuidanceOutput, RenderBatch
from core.guidance.sds import SDS_GRADIENT_SCALES, sds_gradient_multiplier
from core.perf import scope


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


class SDSGradientScale:
    """The factor on the priors' loss at a render batch's stage iteration.

    mode 'loss_scale_schedule' (released Magic123): 1 / S(i), S the GradScaler's loss scale at
    0-based iteration i of the stage (a fresh scaler per stage: 65536 for i < 2000, then ×2 every
    2000); 'none' (face value): 1. The stage iteration is `batch.stage_step` where the stage loop
    gives it; else the guidance clock less the iterations before the stage — 0 for the coarse
    stage, clock length − `fine_iters` for the fine stage (core/stages/engine.py's clock)."""

    def __init__(self, mode: str = "loss_scale_schedule", init_scale: float = 65536.0, growth_factor: float = 2.0,
                 growth_interval: int = 2000, fine_iters: Optional[int] = None):
        if mode not in SDS_GRADIENT_SCALES:
            raise ValueError(f"unknown SDS gradient scale {mode!r} ({', '.join(SDS_GRADIENT_SCALES)})")
        self.mode = mode
        self.init_scale, self.growth_factor, self.growth_interval = float(init_scale), float(growth_factor), int(
            growth_interval)
        self.fine_iters = fine_iters

    @classmethod
    def from_params(cls, params) -> "SDSGradientScale":
        g = params.guidance
        return cls(g.sds_gradient_scale, g.loss_scale.init_scale, g.loss_scale.growth_factor,
                   g.loss_scale.growth_interval, fine_iters=params.fine.iters)

    def stage_step(self, batch: RenderBatch) -> int:
        local = getattr(batch, "stage_step", None)
        if local is not None:
            return int(local)
        if getattr(batch, "stage", "coarse") == "fine" and self.fine_iters is not None:
            return max(int(batch.step) - (int(batch.total_steps) - int(self.fine_iters)), 0)
        return max(int(batch.step), 0)

    def __call__(self, batch: RenderBatch) -> float:
        if self.mode == "none":
            return 1.0
        return sds_gradient_multiplier(self.stage_step(batch), self.mode, self.init_scale, self.growth_factor,
                                       self.growth_interval)


def _scaled(loss: torch.Tensor, batch: RenderBatch, sds_scale: Optional[SDSGradientScale],
            diag: Diagnostics) -> torch.Tensor:
    """`loss` times the SDS balance factor of this iteration (recorded as diag['sds_multiplier'])."""
    if sds_scale is None:
        return loss
    m = sds_scale(batch)
    diag["sds_multiplier"] = m
    return loss if m == 1.0 else loss * m


def _run(prior, batch: RenderBatch, name: str, diag: Diagnostics) -> torch.Tensor:
    with scope(f"lift3d.guidance.{name}"):
        out = prior(batch)
    for k, v in out.diagnostics.items():
        diag[f"{name}/{k}"] = v
    diag[f"{name}/loss"] = out.loss.detach()  # read when logged (core.guidance.base)
    return out.loss


def prior_streams(mode: str, device, unet_compile: dict[str, str]) -> str:
    """What guidance.streams ('auto' | 'one' | 'two') comes to: 'one' off a GPU, and where a prior's
    UNet compiles to 'reduce-overhead' (`unet_compile`: prior → its resolved compile mode): Inductor's
    CUDA-graph trees record every graph of a device into one memory pool, a later graph's buffers
    reusing an earlier one's, so two of them must not replay at once ('two' beside them is refused
    when the params load: core.params). Else 'two' unless 'one' is asked."""
    if torch.device(device).type != "cuda" or mode == "one":
        return "one"
    return "one" if "reduce-overhead" in unet_compile.values() else "two"


class PriorStreams:
    """guidance.streams 'two': the second prior of an iteration on a CUDA stream of its own.

    `split(batch)` marks where the render ends on the caller's stream (the side stream waits for
    that point only, not for the first prior queued after it); `beside()` runs a block on the side
    stream; leaving `split` makes the caller's stream wait for the side one, so the loss and
    diagnostics are read after both priors. Autograd runs each backward operator on its forward's
    stream and joins the streams at the end of `backward()` (PyTorch's stream semantics of backward
    passes), so the two priors' encoder gradients overlap too and the render's backward sees both.
    The same kernels on the same inputs, each prior drawing from its own generator: the order of
    the host's calls changes no draw."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.side = torch.cuda.Stream(self.device)

    @contextlib.contextmanager
    def split(self, batch: RenderBatch):
        main = torch.cuda.current_stream(self.device)
        self.side.wait_stream(main)  # the render is queued: the side prior starts after it, not after the first prior
        batch.rgb.record_stream(self.side)  # its memory not reused before the side stream's reads
        try:
            yield
        finally:
            main.wait_stream(self.side)

    def beside(self):
        return torch.cuda.stream(self.side)


def _split(streams: Optional[PriorStreams], batch: RenderBatch, both: bool):
    """(the context of both priors' calls, the context of the second prior's): streams' when both
    priors run and there are streams, else none."""
    if streams is None or not both:
        return contextlib.nullcontext(), contextlib.nullcontext
    return streams.split(batch), streams.beside


def _generators(prior) -> dict[str, torch.Generator]:
    """The random streams of a prior's parts (SDS timesteps and noise), by part name."""
    return {name: part.generator for name, part in (("sd", prior.sd), ("zero123", prior.zero123))
            if part is not None and isinstance(getattr(part, "generator", None), torch.Generator)}


class JointPrior:
    """Magic123's joint 2D + 3D prior (eqs. 7–8). `sd` / `zero123` may be None when their λ is 0."""

    def __init__(self, sd, zero123, lambda_2d: float, lambda_3d: float,
                 sds_scale: Optional[SDSGradientScale] = None, streams: Optional[PriorStreams] = None):
        if (sd is None or lambda_2d == 0) and (zero123 is None or lambda_3d == 0):
            raise ValueError("joint prior: both priors are off (λ_2D = λ_3D = 0)")
        self.sd, self.zero123 = sd, zero123
        self.lambda_2d, self.lambda_3d = float(lambda_2d), float(lambda_3d)
        self.sds_scale = sds_scale  # None: face value (the paper's λ's)
        self.streams = streams  # guidance.streams 'two': Zero-1-to-3 beside Stable Diffusion

    def generators(self) -> dict[str, torch.Generator]:
        return _generators(self)

    def __call__(self, batch: RenderBatch) -> GuidanceOutput:
        diag: Diagnostics = {"lambda_2d": self.lambda_2d, "lambda_3d": self.lambda_3d}
        run_2d, run_3d = self.sd is not None and self.lambda_2d, self.zero123 is not None and self.lambda_3d
        both, beside = _split(self.streams, batch, run_2d and run_3d)
        with both:
            l2 = _run(self.sd, batch, "sd", diag) if run_2d else None
            with beside():
                l3 = _run(self.zero123, batch, "zero123", diag) if run_3d else None
        loss = _scaled(joint_prior_loss(l2, l3, self.lambda_2d, self.lambda_3d), batch, self.sds_scale, diag)
        diag["loss"] = loss.detach()
        return GuidanceOutput(loss=loss, diagnostics=diag)


class DynamicPrior:
    """Consistent123's two-stage prior: 3D only, then the dynamic mix of eq. 8 (or eq. 9)."""

    def __init__(self, sd, zero123, lambda_2d: float, lambda_3d: float, schedule: str = "exp",
                 span: Optional[int] = None, switch_step: Optional[int] = None, reading: str = "released",
                 sds_scale: Optional[SDSGradientScale] = None, streams: Optional[PriorStreams] = None):
        if zero123 is None:
            raise ValueError("dynamic prior: the 3D prior (Zero-1-to-3) is required for stage 1")
        dynamic_prior_weights(0, 1, schedule, reading)  # validate the names now
        self.sd, self.zero123 = sd, zero123
        self.lambda_2d, self.lambda_3d = float(lambda_2d), float(lambda_3d)
        self.schedule = schedule
        self.reading = reading  # eq. 9 as the released code computes it, or as printed
        self.span = span  # T; default: the iterations left in the stage after the switch
        self.switch_step: Optional[int] = switch_step
        self.sds_scale = sds_scale  # None: face value (as the Consistent123 code optimises)
        self.streams = streams  # guidance.streams 'two': Stable Diffusion beside Zero-1-to-3 in stage 2

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
        diag: Diagnostics = {"w_3d": w3, "w_2d": w2, "in_stage2": float(self.in_stage2)}
        loss = None
        run_3d, run_2d = w3 != 0.0 and self.lambda_3d, w2 != 0.0 and self.lambda_2d and self.sd is not None
        both, beside = _split(self.streams, batch, run_3d and run_2d)
        with both:
            l3 = _run(self.zero123, batch, "zero123", diag) if run_3d else None
            with beside():
                l2 = _run(self.sd, batch, "sd", diag) if run_2d else None
        if l3 is not None:
            loss = self.lambda_3d * w3 * l3
        if l2 is not None:
            l2 = self.lambda_2d * w2 * l2
            loss = l2 if loss is None else loss + l2
        if loss is None:
            loss = batch.rgb.sum() * 0.0
        else:
            loss = _scaled(loss, batch, self.sds_scale, diag)
        diag["loss"] = loss.detach()
        return GuidanceOutput(loss=loss, diagnostics=diag)


class NoGuidance:
    """guidance.kind = none: the reference view alone (a zero loss that keeps the graph)."""

    def __call__(self, batch: RenderBatch) -> GuidanceOutput:
        return GuidanceOutput(loss=batch.rgb.sum() * 0.0, diagnostics={})
