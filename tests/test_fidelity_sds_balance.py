"""Item 1, the SDS balance (docs/fidelity.md): the released Magic123 code's SDS gradient bypasses the
fp16 GradScaler and reaches the parameters divided by the loss scale; lift3d's
`guidance.sds_gradient_scale: loss_scale_schedule` multiplies the prior's loss by 1 / S(i)."""
from __future__ import annotations

import pytest
import torch

from core.guidance.base import GuidanceOutput
from core.guidance.priors import DynamicPrior, JointPrior, SDSGradientScale
from core.guidance.sds import loss_scale_at, sds_gradient_multiplier, sds_loss
from core.params import ParamsError, load_params
from core.rendering.batch import RenderBatch


# ------------------------------------------------------------------------------------------ schedule
def test_multiplier_by_hand_at_0_1999_2000_4000():
    # GradScaler defaults: 2^16, ×2 after every 2000 finite steps; a fresh scaler per stage
    assert sds_gradient_multiplier(0) == 1.0 / 65536.0
    assert sds_gradient_multiplier(1999) == 1.0 / 65536.0
    assert sds_gradient_multiplier(2000) == 1.0 / 131072.0
    assert sds_gradient_multiplier(3999) == 1.0 / 131072.0
    assert sds_gradient_multiplier(4000) == 1.0 / 262144.0
    assert sds_gradient_multiplier(4999) == 1.0 / 262144.0
    assert sds_gradient_multiplier(4000, "none") == 1.0
    assert sds_gradient_multiplier(100, init_scale=1024.0, growth_factor=4.0, growth_interval=50) == 1.0 / (1024 * 16)
    with pytest.raises(ValueError, match="unknown SDS gradient scale"):
        sds_gradient_multiplier(0, "paper")


def _torch_scaler_scales(n: int, overflow: set[int], interval: int) -> list[float]:
    """The scale torch's own GradScaler uses at each of n iterations, with inf gradients at `overflow`."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.0)
    sc = torch.amp.GradScaler("cpu", init_scale=65536.0, growth_factor=2.0, backoff_factor=0.5,
                              growth_interval=interval)
    out = []
    for i in range(n):
        out.append(sc.get_scale())
        opt.zero_grad()
        sc.scale((p * (float("inf") if i in overflow else 1.0)).sum()).backward()
        sc.step(opt)
        sc.update()
    return out


def test_loss_scale_matches_torch_gradscaler_with_and_without_overflows():
    interval = 5
    for overflow in (set(), {3}, {0, 9, 10, 17}):
        want = _torch_scaler_scales(30, overflow, interval)
        got = [loss_scale_at(i, growth_interval=interval, overflow_steps=sorted(overflow)) for i in range(30)]
        assert got == want, overflow


# ------------------------------------------------------------------------------- the surrogate loss
class _FakePrior:
    """A prior whose loss is the SDS surrogate on the render itself: ∂loss/∂rgb = g / B."""

    def __init__(self, g: torch.Tensor):
        self.g = g
        self.generator = None

    def __call__(self, batch: RenderBatch) -> GuidanceOutput:
        return GuidanceOutput(loss=sds_loss(batch.rgb, self.g), diagnostics={})


def _batch(step: int, total: int = 10_000, stage: str = "coarse") -> RenderBatch:
    rgb = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    return RenderBatch(rgb=rgb, opacity=torch.ones(1, 1, 8, 8), depth=torch.ones(1, 1, 8, 8), normal=None,
                       step=step, total_steps=total, stage=stage)


@pytest.mark.parametrize("step,scale", [(0, 65536.0), (1999, 65536.0), (2000, 131072.0), (4000, 262144.0)])
def test_joint_prior_surrogate_gradient_is_the_scaled_sds_gradient(step, scale):
    g2 = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    g3 = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    prior = JointPrior(_FakePrior(g2), _FakePrior(g3), 1.0, 40.0, sds_scale=SDSGradientScale(fine_iters=5000))
    b = _batch(step)
    out = prior(b)
    out.loss.backward()
    want = (1.0 * g2 + 40.0 * g3) / scale  # eq. 7's λ's, then ÷ the loss scale as released
    torch.testing.assert_close(b.rgb.grad, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    assert out.diagnostics["sds_multiplier"] == 1.0 / scale
    # face value: the λ's alone
    face = JointPrior(_FakePrior(g2), _FakePrior(g3), 1.0, 40.0, sds_scale=SDSGradientScale("none"))
    b = _batch(step)
    face(b).loss.backward()
    torch.testing.assert_close(b.rgb.grad, 1.0 * g2 + 40.0 * g3, rtol=1e-5, atol=1e-5)


def test_dynamic_prior_is_scaled_too():
    g = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    prior = DynamicPrior(None, _FakePrior(g), 1.0, 40.0, sds_scale=SDSGradientScale())
    b = _batch(2500)
    prior(b).loss.backward()  # stage 1: the 3D prior alone, w_3D = 1
    torch.testing.assert_close(b.rgb.grad, 40.0 * g / 131072.0, rtol=1e-5, atol=1e-6 * float((40.0 * g / 131072.0).abs().max()))


def test_fine_stage_restarts_the_schedule():
    """The released DMTet stage is a new Trainer with a fresh GradScaler (main.py:474-485 loads the
    model weights only): the fine stage's iteration 0 is at 2^16 again."""
    s = SDSGradientScale(fine_iters=5000)
    assert s.stage_step(_batch(5000 + 0, total=10_000, stage="fine")) == 0
    assert s(_batch(5000 + 2500, total=10_000, stage="fine")) == 1.0 / 131072.0
    assert s(_batch(2500, total=10_000, stage="coarse")) == 1.0 / 131072.0
    b = _batch(7000, total=10_000, stage="fine")
    b.stage_step = 4100  # a stage loop that gives the stage iteration wins
    assert s(b) == 1.0 / 262144.0


# --------------------------------------------------------------------------------------- parameters
def test_presets():
    assert load_params("magic123").guidance.sds_gradient_scale == "loss_scale_schedule"
    ls = load_params("magic123").guidance.loss_scale
    assert (ls.init_scale, ls.growth_factor, ls.growth_interval) == (65536.0, 2.0, 2000)
    # Consistent123's guidance returns (grad * latents).sum(): through the scaler, face value
    assert load_params("consistent123").guidance.sds_gradient_scale == "none"
    # smoke: the released balance too — tiny random priors are noise, and at face value they tear
    # the reference-view fit apart (docs/fidelity.md, the teddy bear runs)
    assert load_params("smoke").guidance.sds_gradient_scale == "loss_scale_schedule"
    with pytest.raises(ParamsError, match="sds_gradient_scale"):
        load_params("magic123", ["guidance.sds_gradient_scale=paper"])


def test_factory_passes_the_balance_to_the_prior():
    from core.guidance.factory import build_guidance

    p = load_params("tiny", ["guidance.sds_gradient_scale=loss_scale_schedule", "prompt.text=a teddy bear"])
    prior = build_guidance(p, torch.ones(3, 32, 32), "coarse", "cpu")
    assert prior.sds_scale.mode == "loss_scale_schedule" and prior.sds_scale.fine_iters == p.fine.iters
    p = load_params("consistent123", ["models.tiny=true", "device=cpu", "prompt.text=a teddy bear",
                                      "sd.resolution=64", "zero123.resolution=64"])
    assert build_guidance(p, torch.ones(3, 32, 32), "coarse", "cpu").sds_scale.mode == "none"
