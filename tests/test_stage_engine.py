"""The stage engine: a killed and resumed run ends where an uninterrupted one ends (Consistent123's
detector and prior clock included), the fine stage continues the coarse run (same token, same clock),
a changed parameter is never resumed, and each stage reads only what STEP_READS says."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.params import STEP_READS, Params, load_params, recording_reads
from core.pipeline import coarse_stage, fine_stage
from core.stages.engine import read_state

BENCH = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
CHAIR = BENCH / "nerf4" / "chair"

# Consistent123 at the tiny preset's sizes, with a detector window inside a 12-iteration coarse stage
C123 = {
    "method": "consistent123", "camera.ref_prob": 0.25, "guidance.kind": "dynamic", "textual_inversion.enabled": False,
    "prompt.template": "{text}", "prompt.text": "a chair", "detector.enabled": True, "detector.every": 2,
    "detector.window": 2, "detector.views": 2, "detector.earliest": 6, "detector.latest": 10, "detector.delta": 0.02,
    "coarse.iters": 12, "coarse.checkpoint_every": 3, "fine.iters": 6, "fine.checkpoint_every": 2,
}


@pytest.fixture(scope="module")
def chair(tmp_path_factory):
    if not CHAIR.is_file() and not (CHAIR / "rgba.png").is_file():
        pytest.skip("../shared/benchmarks not present")
    return CHAIR


def _tensors(state) -> dict[str, torch.Tensor]:
    """Every tensor of a StageState's representation and optimiser, by a flat name."""
    out: dict[str, torch.Tensor] = {}

    def walk(x, name):
        if torch.is_tensor(x):
            out[name] = x
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{name}.{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{name}.{i}")

    walk(state.representation, "rep")
    walk(state.optimizer, "opt")
    return out


def _same_tensors(a, b) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.slow
def test_consistent123_killed_and_resumed_ends_as_uninterrupted(chair, tmp_path):
    p = load_params("tiny", C123)
    img, depth = chair / "rgba.png", chair / "depth.png"
    full = coarse_stage(img, tmp_path / "a", p, depth, progress=False)
    assert coarse_stage(img, tmp_path / "b", p, depth, progress=False, stop_after=7) == {}
    assert read_state(tmp_path / "b" / "checkpoint.pt").step == 6  # the last save before the "kill"
    resumed = coarse_stage(img, tmp_path / "b", p, depth, progress=False)
    # the detector switched inside its window, at the same step, with the same trace
    det_a = json.loads((tmp_path / "a" / "detector.json").read_text())
    det_b = json.loads((tmp_path / "b" / "detector.json").read_text())
    assert full["switch_step"] is not None and 6 <= full["switch_step"] <= 10
    assert resumed["switch_step"] == full["switch_step"] == det_a["switch_step"]
    assert det_b["trace"] == det_a["trace"] and det_a["trace"][0]["step"] < 6  # checks from before the kill kept
    sa, sb = read_state(tmp_path / "a" / "checkpoint.pt"), read_state(tmp_path / "b" / "checkpoint.pt")
    assert sa.prior == sb.prior and sa.detector == sb.detector and sa.step == sb.step == 12
    assert _same_tensors(sa, sb)

    # control: the same resume without the detector's saved state (the old bug) ends elsewhere
    assert coarse_stage(img, tmp_path / "c", p, depth, progress=False, stop_after=7) == {}
    ck = torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=False)
    ck["detector"] = None
    torch.save(ck, tmp_path / "c" / "checkpoint.pt")
    coarse_stage(img, tmp_path / "c", p, depth, progress=False)
    det_c = json.loads((tmp_path / "c" / "detector.json").read_text())
    assert det_c["trace"] != det_a["trace"]

    # the fine stage, killed and resumed, ends as an uninterrupted one; its prior clock continues
    fa = fine_stage(tmp_path / "a" / "checkpoint.pt", tmp_path / "fa", p, progress=False)
    assert fine_stage(tmp_path / "a" / "checkpoint.pt", tmp_path / "fb", p, progress=False, stop_after=3) == {}
    fb = fine_stage(tmp_path / "a" / "checkpoint.pt", tmp_path / "fb", p, progress=False)
    assert fa["switch_step"] == fb["switch_step"] == full["switch_step"]  # inherited from the coarse stage
    fsa, fsb = read_state(tmp_path / "fa" / "checkpoint.pt"), read_state(tmp_path / "fb" / "checkpoint.pt")
    assert fsa.clock == fsb.clock == {"offset": 12, "total": 18}
    assert _same_tensors(fsa, fsb)
    # control: a fine run of another seed differs, so the comparison can fail
    other = load_params("tiny", {**C123, "seed": 1})
    fine_stage(tmp_path / "a" / "checkpoint.pt", tmp_path / "fc", other, progress=False)
    assert not _same_tensors(fsa, read_state(tmp_path / "fc" / "checkpoint.pt"))


def test_consistent123_clock_runs_on_through_the_fine_stage():
    """Consistent123's released code: t counts from the switch through the DMTet stage, T spans
    both stages (docs/fidelity.md item 10)."""
    from core.guidance.priors import DynamicPrior, dynamic_prior_weights
    from core.stages.coarse import coarse_spec
    from core.stages.fine import fine_spec

    p = load_params("tiny", C123)
    cs, fs = coarse_spec(p), fine_spec(p, clock_offset=12)
    assert (cs.clock_offset, cs.clock_total) == (0, 18) and (fs.clock_offset, fs.clock_total) == (12, 18)

    class Z:  # a stand-in 3D prior: the weights are what is tested here
        pass

    prior = DynamicPrior(None, Z(), 0.0, 1.0)
    prior.start_stage2(8)
    # the last coarse iteration and the first fine one are neighbours on one schedule
    assert prior.weights(11, 18) == dynamic_prior_weights(3, 10)
    assert prior.weights(12, 18) == dynamic_prior_weights(4, 10)
    assert prior.weights(17, 18) == dynamic_prior_weights(9, 10)


@pytest.mark.slow
@pytest.mark.parametrize("given", [True, False], ids=["embeds-file", "learned-in-coarse"])
def test_refine_guides_with_the_coarse_token_and_learns_none(chair, tmp_path, monkeypatch, given):
    from core.guidance.textual_inversion import read_learned_embeds
    from flows.cli import main

    args = ["--preset", "tiny", "--set", "fine.iters=2"]
    coarse_args = ["coarse", str(chair / "rgba.png"), "--out", str(tmp_path / "c"), *args]
    if given:
        coarse_args += ["--embeds", str(chair / "learned_embeds.bin")]
    assert main(coarse_args) == 0
    coarse = read_state(tmp_path / "c" / "checkpoint.pt", "coarse")
    assert coarse.token is not None
    if given:
        want = read_learned_embeds(chair / "learned_embeds.bin")
        assert coarse.token.keys() == want.keys()
        assert all(torch.equal(coarse.token[k], want[k]) for k in want)

    import core.guidance.textual_inversion as ti

    def no_second_inversion(*a, **k):
        raise AssertionError("refine ran textual inversion again")

    monkeypatch.setattr(ti, "learn_token", no_second_inversion)
    assert main(["refine", str(tmp_path / "c" / "checkpoint.pt"), "--out", str(tmp_path / "f")]) == 0
    fine = read_state(tmp_path / "f" / "checkpoint.pt", "fine")
    assert fine.token.keys() == coarse.token.keys()
    assert all(torch.equal(fine.token[k], coarse.token[k]) for k in coarse.token)


def test_the_token_goes_into_the_text_encoder_unchanged():
    """resolve_token with an earlier stage's token: that exact row in the text encoder."""
    from core.guidance.factory import resolve_token
    from core.guidance.sd import load_stable_diffusion
    from core.models.sources import prior_model

    p = load_params("tiny")
    parts = load_stable_diffusion(prior_model(p, "sd"), torch.device("cpu"), torch.float32, p.models)
    width = parts.text_encoder.get_input_embeddings().weight.shape[1]
    token = {"<e>": torch.randn(width, generator=torch.Generator().manual_seed(3))}
    used = resolve_token(p, parts, None, token)
    row = parts.text_encoder.get_input_embeddings().weight[parts.tokenizer.convert_tokens_to_ids("<e>")]
    assert torch.equal(row.detach(), token["<e>"]) and torch.equal(used["<e>"], token["<e>"])


@pytest.mark.slow
def test_a_changed_parameter_is_not_resumed(chair, tmp_path, caplog):
    p = load_params("tiny", {"guidance.kind": "none"})
    img = chair / "rgba.png"
    first = coarse_stage(img, tmp_path, p, progress=False)
    s1 = read_state(tmp_path / "checkpoint.pt")
    same = coarse_stage(img, tmp_path, p, progress=False)  # resumes at the last step: nothing to do
    assert same["steps"] == first["steps"] and _same_tensors(s1, read_state(tmp_path / "checkpoint.pt"))
    changed = load_params("tiny", {"guidance.kind": "none", "coarse.lr": 0.003})
    with caplog.at_level("WARNING"):
        coarse_stage(img, tmp_path, changed, progress=False)
    assert "other parameters; starting the stage afresh" in caplog.text
    s2 = read_state(tmp_path / "checkpoint.pt")
    assert s2.params_digest != s1.params_digest and s2.step == p.coarse.iters
    assert not _same_tensors(s1, s2)  # trained again, with the new lr


@pytest.mark.slow
def test_each_stage_reads_only_its_step_reads(chair, tmp_path):
    """STEP_READS is what the stages really read: every key read while they run is covered."""
    p = load_params("tiny", {**C123, "coarse.iters": 4, "fine.iters": 2})

    def covered(key: str, sections) -> bool:
        return any(key == s or key.startswith(s + ".") or s.startswith(key + ".") for s in sections)

    for stage, run in (("coarse", lambda q: coarse_stage(chair / "rgba.png", tmp_path / "c", q, progress=False)),
                       ("fine", lambda q: fine_stage(tmp_path / "c" / "checkpoint.pt", tmp_path / "f", q,
                                                     progress=False))):
        q = Params.model_validate(p.to_dict())
        with recording_reads(q) as reads:
            run(q)
        stray = sorted(k for k in reads if not covered(k, STEP_READS[stage]))
        assert not stray, f"{stage} reads {stray}, which STEP_READS['{stage}'] leaves out"
        assert reads, stage
