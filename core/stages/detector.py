"""Consistent123's CLIP-based optimisation boundary judgement (§3.2, eqs. 5–6).

Every h iterations of stage 1 the coarse loop renders V views (azimuths 0°, 45°, …), the detector
scores them against the text y with CLIP (eq. 5), keeps the moving average over the last L checks
of the relative change of that score (eq. 6), and fires when its magnitude falls below δ: |R| < δ,
as the released code does (lyk412/Consistent123 nerf/utils.py:619-623 keeps abs(mean), :1057
compares it with the threshold). `rate_rule="signed"` fires on R < δ instead (the paper's "falls
below" read literally: a falling score fires at once). As in the released code it may fire only
between `earliest` and `latest` iterations, and it forces the switch at `latest`. Scoring starts L
checks before `earliest`, so that the window is full when firing becomes possible. (The released
code scores from its `least_3Donly` on and fires only after least_3Donly + L·h, so its first
possible switch is 2121 for 2000, h = 21, L = 5; lift3d's `earliest` = least_3Donly + L·h + 1 gives
the same firing steps. docs/fidelity.md.)

The coarse loop's side (core/stages/coarse.py): `if det.due(step): fired = det.update(step, renders)`, and
on fire `guidance.start_stage2(step)`.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import torch

log = logging.getLogger(__name__)

Scorer = Callable[[torch.Tensor], float]


def clip_score(image_embeds: torch.Tensor, text_embed: torch.Tensor) -> float:
    """Consistent123 eq. 5: S^k = (1/M) Σ_v ε_CLIP(G^k(v)) · φ_CLIP(y), with unit-norm embeddings
    (cosine similarity). image_embeds (M,D), text_embed (D,) or (1,D)."""
    img = torch.nn.functional.normalize(image_embeds.float(), dim=-1)
    txt = torch.nn.functional.normalize(text_embed.float().reshape(1, -1), dim=-1)
    return float((img @ txt.T).mean())


def change_rate(scores: Sequence[float], window: int) -> Optional[float]:
    """Consistent123 eq. 6: R^k = (1/L) Σ_{i=k−L+1..k} (S^i − S^{i−1}) / S^{i−1}, over the last L+1
    scores; None while fewer than L+1 scores exist."""
    if len(scores) < window + 1:
        return None
    s = scores[-(window + 1):]
    return sum((s[i] - s[i - 1]) / s[i - 1] for i in range(1, window + 1)) / window


def rate_below(rate: float, delta: float, rule: str = "abs") -> bool:
    """The firing test on eq. 6's R: |R| < δ ("abs", the released code: nerf/utils.py:621, :1057)
    or R < δ ("signed", the paper's text read literally)."""
    if rule == "abs":
        return abs(rate) < delta
    if rule == "signed":
        return rate < delta
    raise ValueError(f"detector: unknown rate_rule '{rule}' (abs, signed)")


class ClipScorer:
    """Eq. 5 with an open_clip model: images (V,3,H,W) in [0,1] → mean cosine similarity to y."""

    def __init__(self, clip, text: str):
        self.clip = clip
        self.text = text
        self.text_embed = clip.encode_text([text])[0]

    def __call__(self, images: torch.Tensor) -> float:
        return clip_score(self.clip.encode_images(images), self.text_embed)

    @classmethod
    def from_params(cls, params, device: torch.device | str = "cpu") -> "ClipScorer":
        from core.evaluation.clip import clip_from_params

        text = detector_text(params)
        return cls(clip_from_params(params, "detector", device), text)


def detector_text(params) -> str:
    """y: the plain description (params.prompt.text); without one, a generic description (logged)."""
    text = params.prompt.text
    if not text:
        log.warning("detector: no prompt.text (--text) given; scoring against 'a photo of an object'")
        return "a photo of an object"
    return text


class StageDetector:
    """Decides when stage 1 (3D prior only) ends. `params` is params.detector."""

    def __init__(self, params, scorer: Scorer):
        self.p = params
        self.scorer = scorer
        self.scores: list[float] = []
        self.trace: list[dict] = []
        self.switch_step: Optional[int] = None
        self.forced = False

    @property
    def first_check(self) -> int:
        """Scoring starts L·h iterations before `earliest`: [earliest − L·h, earliest) holds exactly L
        multiples of h, so the first check at or after `earliest` has the L+1 scores eq. 6 needs."""
        return max(0, self.p.earliest - self.p.window * self.p.every)

    def due(self, step: int) -> bool:
        """True when the loop should render the V views and call update() at this step."""
        if not self.p.enabled or self.switch_step is not None:
            return False
        if step >= self.p.latest:
            return True  # the forced switch (released code)
        return step >= self.first_check and step % self.p.every == 0

    @torch.no_grad()
    def update(self, step: int, images: torch.Tensor) -> bool:
        """Score the renders (eq. 5), update R (eq. 6); True when stage 2 starts at this step."""
        if self.switch_step is not None:
            return False
        score = float(self.scorer(images))
        self.scores.append(score)
        rate = change_rate(self.scores, self.p.window)
        rule = getattr(self.p, "rate_rule", "abs")
        fired = rate is not None and rate_below(rate, self.p.delta, rule) and step >= self.p.earliest
        forced = not fired and step >= self.p.latest
        self.trace.append({"step": int(step), "score": score, "rate": rate, "fired": fired or forced,
                           "forced": forced})
        if fired or forced:
            self.switch_step = int(step)
            self.forced = forced
            log.info("detector: stage 2 from iteration %d (%s; R=%s, δ=%g)", step,
                     "forced at detector.latest" if forced else ("|R| < δ" if rule == "abs" else "R < δ"),
                     rate, self.p.delta)
            return True
        return False

    def state_dict(self) -> dict:
        return {"scores": list(self.scores), "trace": list(self.trace), "switch_step": self.switch_step,
                "forced": self.forced}

    def load_state_dict(self, state: dict) -> None:
        self.scores = list(state.get("scores", []))
        self.trace = list(state.get("trace", []))
        self.switch_step = state.get("switch_step")
        self.forced = bool(state.get("forced", False))


def write_trace(detector: StageDetector, path) -> None:
    """DIR/detector.json: the switch iteration and the per-check trace (read by core.evaluation.report)."""
    import json
    from pathlib import Path

    p = detector.p
    Path(path).write_text(json.dumps({
        "switch_step": detector.switch_step, "forced": detector.forced, "delta": p.delta, "window": p.window,
        "every": p.every, "earliest": p.earliest, "latest": p.latest, "rate_rule": p.rate_rule, "trace": detector.trace}, indent=2))
