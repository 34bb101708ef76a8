"""Consistent123 §3.2: the CLIP stage detector (eqs. 5–6) against hand computations."""
import math

import pytest
import torch

from core.stages.detector import StageDetector, change_rate, clip_score, write_trace
from core.params import DetectorParams


class ScriptedScorer:
    """Returns the next score of a fixed sequence (ignores the images)."""

    def __init__(self, scores):
        self.scores = list(scores)
        self.calls = 0

    def __call__(self, images):
        s = self.scores[self.calls]
        self.calls += 1
        return s


def scores_from_rates(s0, rates):
    out = [s0]
    for r in rates:
        out.append(out[-1] * (1 + r))
    return out


def run(det, last_step):
    imgs = torch.zeros(8, 3, 4, 4)
    for step in range(0, last_step + 1):
        if det.due(step) and det.update(step, imgs):
            return step
    return None


def test_eq5_clip_score_is_mean_cosine():
    img = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    txt = torch.tensor([1.0, 0.0])
    # cosines with (1,0): 1, 0, 1/√2 → mean (1 + 0 + 0.70711)/3
    assert clip_score(img, txt) == pytest.approx((1 + 0 + 1 / math.sqrt(2)) / 3, abs=1e-6)


def test_eq6_change_rate_by_hand():
    s = [0.20, 0.22, 0.231, 0.231, 0.2079]
    # L = 3, last four scores 0.22, 0.231, 0.231, 0.2079:
    # (0.231−0.22)/0.22 = 0.05; (0.231−0.231)/0.231 = 0; (0.2079−0.231)/0.231 = −0.1 → R = −0.05/3
    assert change_rate(s, 3) == pytest.approx(-0.05 / 3, abs=1e-9)
    assert change_rate(s[:3], 3) is None  # fewer than L+1 scores


def test_switch_iteration_equals_hand_computation():
    p = DetectorParams(enabled=True, every=10, window=5, delta=0.00025, earliest=50, latest=1000)
    # Relative changes r_i = S^i/S^{i−1} − 1 built into the sequence: five of 1 %, then 0.1 %, then 0.
    rates = [0.01] * 5 + [0.001, 0.0, 0.0, 0.0, 0.0] + [0.0] * 5
    scorer = ScriptedScorer(scores_from_rates(0.25, rates))
    det = StageDetector(p, scorer)
    # Checks at steps 0, 10, 20, … (first check = earliest − L·h = 0); score j is taken at step 10·j.
    # R (eq. 6) is the mean of the last 5 r's, defined from the 6th score (j = 5) on:
    #   j=5:  r1..r5   = .01,.01,.01,.01,.01  → R = 0.01      ≥ δ
    #   j=6:  r2..r6   = .01×4, .001          → R = 0.0082    ≥ δ
    #   j=7:  .01×3, .001, 0                  → R = 0.0062    ≥ δ
    #   j=8:  .01×2, .001, 0, 0               → R = 0.0042    ≥ δ
    #   j=9:  .01, .001, 0, 0, 0              → R = 0.0022    ≥ δ
    #   j=10: .001, 0, 0, 0, 0                → R = 0.0002    < δ = 0.00025 → switch at step 10·10 = 100
    assert run(det, 1000) == 100
    assert det.switch_step == 100 and not det.forced
    assert [t["step"] for t in det.trace] == list(range(0, 101, 10))
    assert det.trace[-1]["rate"] == pytest.approx(0.0002, rel=1e-6)
    assert det.trace[9]["rate"] == pytest.approx(0.0022, rel=1e-6)
    assert all(t["rate"] is None for t in det.trace[:5])
    assert not det.due(110)  # done: no more checks


def test_no_switch_before_earliest_and_forced_at_latest():
    # constant scores: R = 0 < δ from the 6th score on, but firing waits for `earliest`
    p = DetectorParams(enabled=True, every=10, window=5, delta=0.00025, earliest=200, latest=1000)
    det = StageDetector(p, ScriptedScorer([0.3] * 200))
    assert det.first_check == 150
    assert not det.due(140) and det.due(150)
    assert run(det, 1000) == 200
    # ever-rising scores (2 % per check): never below δ → forced switch at latest = 333 (not a multiple of h)
    p = DetectorParams(enabled=True, every=10, window=5, delta=0.00025, earliest=200, latest=333)
    det = StageDetector(p, ScriptedScorer(scores_from_rates(0.2, [0.02] * 100)))
    assert run(det, 1000) == 333
    assert det.forced and det.trace[-1]["forced"]


def test_disabled_detector_is_never_due(tmp_path):
    det = StageDetector(DetectorParams(enabled=False), ScriptedScorer([]))
    assert not any(det.due(s) for s in range(0, 5000, 7))
    write_trace(det, tmp_path / "detector.json")
    assert (tmp_path / "detector.json").read_text().count('"switch_step": null') == 1


def test_state_dict_roundtrip_resumes():
    p = DetectorParams(enabled=True, every=10, window=5, delta=0.00025, earliest=50, latest=1000)
    seq = scores_from_rates(0.25, [0.01] * 5 + [0.001, 0.0, 0.0, 0.0, 0.0])
    a = StageDetector(p, ScriptedScorer(seq))
    imgs = torch.zeros(1, 3, 2, 2)
    for step in range(0, 61, 10):
        a.update(step, imgs)
    b = StageDetector(p, ScriptedScorer(seq[7:]))
    b.load_state_dict(a.state_dict())
    assert run_from(b, 70, 1000) == 100


def run_from(det, start, last):
    imgs = torch.zeros(1, 3, 2, 2)
    for step in range(start, last + 1):
        if det.due(step) and det.update(step, imgs):
            return step
    return None


class RecordingGuidance:
    """A guidance stub with the dynamic prior's stage switch: zero loss, records start_stage2."""

    def __init__(self):
        self.stage2_calls = []
        self.steps_seen = []

    def start_stage2(self, step):
        self.stage2_calls.append(step)

    @property
    def in_stage2(self):
        return bool(self.stage2_calls)

    def __call__(self, batch):
        from core.guidance.base import GuidanceOutput

        self.steps_seen.append(batch.step)
        return GuidanceOutput(loss=batch.rgb.sum() * 0.0, diagnostics={})


def test_coarse_loop_ends_stage_one_at_the_detector_switch(tmp_path):
    """The stage loop consults the detector and calls guidance.start_stage2 at its switch."""
    pytest.importorskip("core.stages.coarse")
    from core.stages.coarse import run_coarse
    from core.inputs.images import Reference
    from core.params import load_params

    p = load_params("smoke", {
        "coarse.iters": 18, "coarse.resolution": 16, "coarse.samples_per_ray": 8,
        "coarse.checkpoint_every": 1000, "coarse.occupancy_every": 1000, "guidance.kind": "none",
        "coarse.grid.levels": 2, "coarse.grid.log2_table_size": 8, "coarse.grid.max_resolution": 32,
        "coarse.losses.normal_smooth": 0, "coarse.losses.orientation": 0, "coarse.shading.normal_only": 0,
        "coarse.shading.diffuse_prob": 0, "coarse.shading.textureless_prob": 0,
        "detector.enabled": True, "detector.every": 2, "detector.window": 3, "detector.delta": 0.00025,
        "detector.earliest": 8, "detector.latest": 16, "detector.views": 2,
    })
    # checks at 2, 4, 6, … (first check = earliest − L·h = 8 − 6 = 2); relative changes r per check:
    #   score at 2: S0; r(4)=.05, r(6)=.05, r(8)=.05, r(10)=0, r(12)=0, r(14)=0, …
    # R (eq. 6, L=3) = mean of the last three r's:
    #   step 8: (.05+.05+.05)/3 = .05 ; 10: (.05+.05+0)/3 = .0333 ; 12: (.05+0+0)/3 = .0167 ;
    #   step 14: (0+0+0)/3 = 0 < δ → stage 2 starts at iteration 14 (before the forced switch at 16).
    scorer = ScriptedScorer(scores_from_rates(0.3, [0.05, 0.05, 0.05] + [0.0] * 10))
    det = StageDetector(p.detector, scorer)
    g = RecordingGuidance()
    ref = Reference(rgb=torch.ones(3, 16, 16), mask=torch.zeros(1, 16, 16), depth=None)
    ref.rgb[:, 4:12, 4:12] = 0.5
    ref.mask[:, 4:12, 4:12] = 1.0
    trainer = run_coarse(p, ref, tmp_path / "coarse", guidance=g, detector=det, device="cpu", progress=False)
    assert det.switch_step == 14 and not det.forced
    assert g.stage2_calls == [14] and trainer.snapshot().detector["switch_step"] == 14
    assert scorer.calls == 7  # checks at 2, 4, …, 14, none after the switch
    assert [t["step"] for t in det.trace] == [2, 4, 6, 8, 10, 12, 14]
