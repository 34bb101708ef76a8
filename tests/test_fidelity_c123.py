"""Consistent123 fidelity items (docs/fidelity.md): the dynamic prior's schedules (eqs. 8–9) in the
released code's reading and as printed, and the detector's firing rule (|R| < δ vs R < δ).

The expected numbers are worked out by hand from the released code's definition
(lyk412/Consistent123 nerf/utils.py:494-515: w_2D = f(x), w_3D = 1 − f(x), x = t/T) and from eq. 9
as printed (§4.4), at x = t/T = 0, 0.25, 0.5, 1 with T = 1000.
"""
from __future__ import annotations

import pytest
import torch

from core.guidance.base import GuidanceOutput, RenderBatch
from core.guidance.priors import DynamicPrior, dynamic_prior_weights
from core.params import DetectorParams, load_params
from core.rendering.cameras import Cameras
from core.stages.detector import StageDetector, rate_below

T = 1000
TS = (0, 250, 500, 1000)  # x = 0, 0.25, 0.5, 1

# (w_3D, w_2D) at x = 0, 0.25, 0.5, 1
RELEASED = {
    # f = 1 − e^(−x): e^(−0.25) = 0.7788007831, e^(−0.5) = 0.6065306597, e^(−1) = 0.3678794412
    "exp": [(1.0, 0.0), (0.7788007831, 0.2211992169), (0.6065306597, 0.3934693403), (0.3678794412, 0.6321205588)],
    # f = x
    "linear": [(1.0, 0.0), (0.75, 0.25), (0.5, 0.5), (0.0, 1.0)],
    # f = log2(1 + x): log2 1 = 0, log2 1.25 = 0.3219280949, log2 1.5 = 0.5849625007, log2 2 = 1
    "log": [(1.0, 0.0), (0.6780719051, 0.3219280949), (0.4150374993, 0.5849625007), (0.0, 1.0)],
}
PAPER = {
    "exp": RELEASED["exp"],  # eq. 8 is the same in both readings
    # eq. 9 as printed: w_3D = x, w_2D = 1 − x
    "linear": [(0.0, 1.0), (0.25, 0.75), (0.5, 0.5), (1.0, 0.0)],
    # eq. 9 as printed: w_3D = log2(x), w_2D = 1 − log2(x); x = 0 clamped to 1/T = 0.001:
    # log2(0.001) = −9.9657842847; log2(0.25) = −2; log2(0.5) = −1; log2(1) = 0
    "log": [(-9.9657842847, 10.9657842847), (-2.0, 3.0), (-1.0, 2.0), (0.0, 1.0)],
}


@pytest.mark.parametrize("kind", ["exp", "linear", "log"])
def test_released_reading_by_hand(kind):
    for t, (e3, e2) in zip(TS, RELEASED[kind]):
        w3, w2 = dynamic_prior_weights(t, T, kind, reading="released")
        assert (w3, w2) == (pytest.approx(e3, abs=1e-9), pytest.approx(e2, abs=1e-9)), (kind, t)
    # the default reading is the released one
    assert dynamic_prior_weights(250, T, kind) == dynamic_prior_weights(250, T, kind, reading="released")


@pytest.mark.parametrize("kind", ["exp", "linear", "log"])
def test_paper_reading_by_hand(kind):
    for t, (e3, e2) in zip(TS, PAPER[kind]):
        w3, w2 = dynamic_prior_weights(t, T, kind, reading="paper")
        assert (w3, w2) == (pytest.approx(e3, abs=1e-9), pytest.approx(e2, abs=1e-9)), (kind, t)


@pytest.mark.parametrize("kind", ["exp", "linear", "log"])
def test_released_weights_in_unit_interval_sum_to_one_and_move_to_2d(kind):
    prev_w2 = -1.0
    for t in list(range(-10, T + 11, 7)) + [T, 10 * T]:  # t outside [0, T] is clamped
        w3, w2 = dynamic_prior_weights(t, T, kind, reading="released")
        assert 0.0 <= w3 <= 1.0 and 0.0 <= w2 <= 1.0
        assert w3 + w2 == pytest.approx(1.0, abs=1e-12)
        assert w2 >= prev_w2  # the 2D prior's share never falls
        prev_w2 = w2
    assert dynamic_prior_weights(0, T, kind) == (1.0, 0.0)  # every schedule starts on the 3D prior


def test_paper_reading_is_outside_unit_interval_for_log():
    w3, w2 = dynamic_prior_weights(500, T, "log", reading="paper")
    assert w3 < 0 and w2 > 1


def test_unknown_reading_or_schedule_raises():
    with pytest.raises(ValueError, match="reading"):
        dynamic_prior_weights(1, T, "linear", reading="printed")
    with pytest.raises(ValueError, match="schedule"):
        dynamic_prior_weights(1, T, "cosine", reading="released")
    with pytest.raises(ValueError):
        DynamicPrior(None, object(), 1.0, 40.0, schedule="linear", reading="printed")


class _Prior:
    def __call__(self, batch):
        return GuidanceOutput(loss=batch.rgb.sum(), diagnostics={})


def _batch(step, total):
    rgb = torch.full((1, 3, 2, 2), 0.5, requires_grad=True)
    return RenderBatch(rgb=rgb, opacity=torch.ones(1, 1, 2, 2), depth=torch.zeros(1, 1, 2, 2), normal=None,
                       cameras=Cameras.make(90, 45, 1.8, 40), shading="albedo", light_dir=None, step=step,
                       total_steps=total, stage="coarse")


def test_dynamic_prior_passes_the_reading_through():
    # switch at 10 of 110: t = 35 of T = 100 at step 45 → x = 0.35
    for reading, (e3, e2) in (("released", (0.65, 0.35)), ("paper", (0.35, 0.65))):
        prior = DynamicPrior(_Prior(), _Prior(), 1.0, 1.0, schedule="linear", reading=reading)
        prior.start_stage2(10)
        out = prior(_batch(45, 110))
        assert out.diagnostics["w_3d"] == pytest.approx(e3) and out.diagnostics["w_2d"] == pytest.approx(e2)
    default = DynamicPrior(_Prior(), _Prior(), 1.0, 1.0, schedule="log")
    assert default.reading == "released"


def test_params_defaults_are_the_released_readings():
    for preset in ("magic123", "consistent123"):
        p = load_params(preset)
        assert p.guidance.dynamic_reading == "released" and p.detector.rate_rule == "abs"
    p = load_params("consistent123", ["guidance.dynamic_reading=paper", "detector.rate_rule=signed"])
    assert p.guidance.dynamic_reading == "paper" and p.detector.rate_rule == "signed"


# ------------------------------------------------------------------------------------ detector rule
class _Scripted:
    def __init__(self, scores):
        self.scores, self.calls = list(scores), 0

    def __call__(self, images):
        self.calls += 1
        return self.scores[self.calls - 1]


def _scores(s0, rates):
    out = [s0]
    for r in rates:
        out.append(out[-1] * (1 + r))
    return out


def _run(det, last):
    imgs = torch.zeros(1, 3, 2, 2)
    for step in range(last + 1):
        if det.due(step) and det.update(step, imgs):
            return step
    return None


def test_rate_below_by_rule():
    assert rate_below(0.0001, 0.00025, "abs") and rate_below(-0.0001, 0.00025, "abs")
    assert not rate_below(-0.01, 0.00025, "abs")
    assert rate_below(-0.01, 0.00025, "signed") and not rate_below(0.001, 0.00025, "signed")
    with pytest.raises(ValueError):
        rate_below(0.0, 0.00025, "square")


def _falling(rule):
    # checks every 10 iterations from 0 (first check = earliest − L·h = 50 − 50); score j at step 10·j.
    # Relative changes: five of −1 %, then −0.01 % per check: a falling score that settles.
    p = DetectorParams(enabled=True, every=10, window=5, delta=0.00025, earliest=50, latest=1000, rate_rule=rule)
    return StageDetector(p, _Scripted(_scores(0.3, [-0.01] * 5 + [-0.0001] * 10)))


def test_abs_rule_fires_on_a_falling_score_once_it_settles():
    # R (eq. 6, L = 5) by hand:
    #   j=5:  −.01×5             → R = −0.01      |R| ≥ δ
    #   j=6:  −.01×4, −.0001     → R = −0.00802   |R| ≥ δ
    #   j=7:  −.01×3, −.0001×2   → R = −0.00604
    #   j=8:  −.01×2, −.0001×3   → R = −0.00406
    #   j=9:  −.01,   −.0001×4   → R = −0.00208
    #   j=10: −.0001×5           → R = −0.0001    |R| = 0.0001 < δ = 0.00025 → switch at step 100
    det = _falling("abs")
    assert _run(det, 1000) == 100 and not det.forced
    rates = [t["rate"] for t in det.trace[5:]]
    assert rates == pytest.approx([-0.01, -0.00802, -0.00604, -0.00406, -0.00208, -0.0001], rel=1e-9)


def test_signed_rule_fires_at_once_on_a_falling_score():
    # the same sequence: R = −0.01 < δ at j = 5, the first check where R exists and step ≥ earliest
    det = _falling("signed")
    assert _run(det, 1000) == 50 and not det.forced
    assert det.trace[-1]["rate"] == pytest.approx(-0.01)


def test_rules_agree_on_a_rising_score():
    # +1 % ×5 then +0.01 %: R > 0 throughout, so |R| = R and both rules switch at step 100
    for rule in ("abs", "signed"):
        p = DetectorParams(enabled=True, every=10, window=5, delta=0.00025, earliest=50, latest=1000, rate_rule=rule)
        det = StageDetector(p, _Scripted(_scores(0.3, [0.01] * 5 + [0.0001] * 10)))
        assert _run(det, 1000) == 100


def test_detector_settings_are_the_released_scripts():
    # lyk412/Consistent123 scripts/realfusion15.sh:1: --render_interval 21 --last_N 5 --threshold 0.00025
    # --least_3Donly 2000 --most_3Donly 3500 (the paper, §3.2: h = 20; §4.1: L = 5, δ = 0.00025)
    d = load_params("consistent123").detector
    assert d.enabled and (d.every, d.window, d.delta, d.rate_rule) == (21, 5, 0.00025, "abs")
    assert (d.earliest, d.latest) == (2106, 3500)  # 2000 + h·L + 1: the released first firing step (docs/fidelity.md)
