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
@pytest.mark.timeout(1800)  # six stage runs with the tiny priors and CLIP: minutes on a busy 2-core machine
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


class _ZeroPrior:
    """A stand-in prior: zero loss that keeps the graph (the schedule is what is tested)."""

    def __call__(self, batch):
        from core.guidance.base import GuidanceOutput

        return GuidanceOutput(loss=batch.rgb.sum() * 0.0, diagnostics={"grad_norm": 0.0})


def _oracle_ref(p):
    from core.oracle.bench import oracle_reference
    from core.oracle.objects import make_object

    return oracle_reference(make_object("torus"), p)


TINY_NERF = {"coarse.resolution": 16, "coarse.samples_per_ray": 8, "coarse.grid.levels": 2,
             "coarse.grid.log2_table_size": 8, "coarse.grid.max_resolution": 32, "coarse.mlp.hidden": 8,
             "coarse.occupancy_resolution": 8, "fine.resolution": 16, "fine.tet_resolution": 8,
             "fine.texture_size": 16, "evaluate.novel_views": 1, "detector.enabled": False}


@pytest.mark.parametrize("schedule", ["exp", "linear", "log"])
def test_trace_weights_stay_in_unit_interval_and_run_on_into_the_fine_stage(tmp_path, schedule):
    """Consistent123's trace.csv: w_2D, w_3D in [0, 1], summing to 1, and one continuous schedule
    from the last coarse row to the first fine row (the switch made in the coarse stage)."""
    import pandas as pd

    from core.guidance.priors import DynamicPrior
    from core.stages.coarse import run_coarse
    from core.stages.fine import run_fine

    p = load_params("tiny", {**C123, **TINY_NERF, "guidance.dynamic_schedule": schedule, "coarse.iters": 20,
                             "fine.iters": 10})
    ref = _oracle_ref(p)
    prior = DynamicPrior(_ZeroPrior(), _ZeroPrior(), 1.0, 1.0, schedule=schedule)
    prior.start_stage2(5)  # as the detector would
    coarse = run_coarse(p, ref, tmp_path / "c", guidance=prior, progress=False)
    fprior = DynamicPrior(_ZeroPrior(), _ZeroPrior(), 1.0, 1.0, schedule=schedule)
    run_fine(p, ref, coarse.rep.field, tmp_path / "f", coarse=coarse.snapshot(), guidance=fprior, progress=False,
             turntable_frames=1)
    c, f = pd.read_csv(tmp_path / "c" / "trace.csv"), pd.read_csv(tmp_path / "f" / "trace.csv")
    both = pd.concat([c, f])
    assert list(both["clock"]) == list(range(30))  # every step traced at this length, one clock
    assert ((both.w_2d >= 0) & (both.w_2d <= 1) & (both.w_3d >= 0) & (both.w_3d <= 1)).all()
    assert ((both.w_2d + both.w_3d - 1).abs() < 1e-9).all()
    assert (c.w_2d[c.clock < 5] == 0).all() and both.w_2d.is_monotonic_increasing
    # continuous: the step from the last coarse row to the first fine row is an ordinary step
    steps = both.w_2d.diff().iloc[1:]
    assert float(f.w_2d.iloc[0] - c.w_2d.iloc[-1]) <= float(steps.max()) + 1e-12
    assert float(both.w_2d.iloc[-1]) > 0.5 if schedule != "exp" else float(both.w_2d.iloc[-1]) > 0.6


def test_a_non_finite_loss_stops_the_stage_and_keeps_the_last_good_checkpoint(tmp_path):
    from core.errors import Lift3DError
    from core.stages.coarse import run_coarse

    class NaNAt:
        def __init__(self, step):
            self.step = step

        def __call__(self, batch):
            from core.guidance.base import GuidanceOutput

            bad = batch.step >= self.step
            return GuidanceOutput(loss=batch.rgb.sum() * (float("nan") if bad else 0.0), diagnostics={})

    p = load_params("tiny", {**TINY_NERF, "coarse.iters": 12, "coarse.checkpoint_every": 4, "camera.ref_every": 4})
    with pytest.raises(Lift3DError, match=r"coarse stage, step 9: the loss term 'guidance' is not finite.*step 8\)"):
        run_coarse(p, _oracle_ref(p), tmp_path, guidance=NaNAt(9), progress=False)
    assert read_state(tmp_path / "checkpoint.pt").step == 8 and not (tmp_path / "result.json").exists()


def test_a_non_finite_gradient_of_a_finite_loss_stops_the_stage_before_the_optimiser(tmp_path):
    """The loss and the gradients are checked together after the backward (one read of the device a
    step): a finite loss whose gradient is not (√ at 0: an infinite slope times 0) stops the stage
    at that step with 'a gradient', and the last good checkpoint is kept."""
    from core.errors import Lift3DError
    from core.stages.coarse import run_coarse

    class InfiniteSlopeAt:
        def __call__(self, batch):
            from core.guidance.base import GuidanceOutput

            if batch.step >= 9:  # value 0 (finite), gradient (1 / 2√0) · 0 = NaN
                return GuidanceOutput(loss=torch.sqrt(batch.rgb.sum() * 0.0), diagnostics={})
            return GuidanceOutput(loss=batch.rgb.sum() * 0.0, diagnostics={})

    p = load_params("tiny", {**TINY_NERF, "coarse.iters": 12, "coarse.checkpoint_every": 4, "camera.ref_every": 4})
    with pytest.raises(Lift3DError, match=r"coarse stage, step 9: a gradient is not finite.*step 8\)"):
        run_coarse(p, _oracle_ref(p), tmp_path, guidance=InfiniteSlopeAt(), progress=False)
    assert read_state(tmp_path / "checkpoint.pt").step == 8 and not (tmp_path / "result.json").exists()


def test_with_fused_adam_the_host_reads_the_check_later_and_the_bad_step_changes_nothing(tmp_path, monkeypatch):
    """With torch's fused Adam (the default on a GPU; here on the CPU) the finiteness check does not
    stop the host: the flag goes to the optimiser as GradScaler's found_inf, so the step whose
    gradient is not finite changes no parameter, moment or step count, and the host reads the flag
    at the next step, then stops naming the bad step. The loop as a whole stops as without it: the
    same messages, the last good checkpoint kept."""
    from core.errors import Lift3DError
    from core.guidance.base import GuidanceOutput
    from core.stages import optim
    from core.stages.coarse import make_coarse_stage, run_coarse
    from core.stages.engine import NonFiniteError

    monkeypatch.setattr(optim, "_all_cuda", lambda groups: True)  # build_optimizer fuses as on a GPU

    class BadFrom:
        def __init__(self, step, kind):
            self.step, self.kind = step, kind

        def __call__(self, batch):
            if batch.step < self.step:
                return GuidanceOutput(loss=batch.rgb.sum() * 0.0, diagnostics={})
            if self.kind == "nan":
                return GuidanceOutput(loss=batch.rgb.sum() * float("nan"), diagnostics={})
            return GuidanceOutput(loss=torch.sqrt(batch.rgb.sum() * 0.0), diagnostics={})  # finite, gradient NaN

    p = load_params("tiny", {**TINY_NERF, "coarse.iters": 12, "coarse.checkpoint_every": 4, "camera.ref_every": 4})
    stage = make_coarse_stage(p, _oracle_ref(p), guidance=BadFrom(5, "slope"))
    assert stage._skips_on_device() and stage.optimizer.defaults["fused"]
    for _ in range(5):
        stage.step()
    params = [q.detach().clone() for g in stage.optimizer.param_groups for q in g["params"]]
    moments = [stage.optimizer.state[q]["exp_avg"].clone() for g in stage.optimizer.param_groups for q in g["params"]]
    stage.step()  # step 5: its gradient is NaN; the host does not look yet
    assert stage.state.step == 6 and [u.step for u in stage._unchecked] == [5]
    now = [q.detach() for g in stage.optimizer.param_groups for q in g["params"]]
    assert all(torch.equal(a, b) for a, b in zip(params, now))  # the optimiser skipped the step
    assert all(torch.equal(a, stage.optimizer.state[q]["exp_avg"])
               for a, q in zip(moments, (q for g in stage.optimizer.param_groups for q in g["params"])))
    assert all(float(stage.optimizer.state[q]["step"]) == 5 for g in stage.optimizer.param_groups for q in g["params"])
    with pytest.raises(NonFiniteError, match=r"coarse stage, step 5: a gradient is not finite"):
        stage.step()

    for kind, what in (("nan", "the loss term 'guidance'"), ("slope", "a gradient")):
        out = tmp_path / kind
        with pytest.raises(Lift3DError, match=rf"coarse stage, step 9: {what} is not finite.*step 8\)"):
            run_coarse(p, _oracle_ref(p), out, guidance=BadFrom(9, kind), progress=False)
        assert read_state(out / "checkpoint.pt").step == 8 and not (out / "result.json").exists()


def test_a_truncated_checkpoint_is_one_line_and_fresh_starts_over(chair, tmp_path, capsys):
    from flows.cli import main

    out = tmp_path / "c"
    args = ["coarse", str(chair / "rgba.png"), "--out", str(out), "--preset", "tiny", "--set", "guidance.kind=none"]
    assert main(args) == 0
    (out / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes()[:1000])
    assert main(args) == 2
    assert not (out / "result.json").exists()  # the earlier run's outputs no longer look complete
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("lift3d: error")]
    assert len(lines) == 1 and "not a readable lift3d checkpoint" in lines[0] and "--fresh" in lines[0]
    assert "Traceback" not in err
    assert main(args + ["--fresh"]) == 0 and read_state(out / "checkpoint.pt").step == 8


def test_an_unwritable_out_fails_first_with_one_line(chair, tmp_path, capsys):
    from flows.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("")
    rc = main(["coarse", str(chair / "rgba.png"), "--out", str(blocker / "sub"), "--preset", "tiny"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("lift3d: error")]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("lift3d: error: cannot write to --out")
    assert "Traceback" not in err and "coarse:" not in err  # failed before any iteration


def test_a_fresh_start_clears_the_earlier_outputs(tmp_path):
    from core.stages.coarse import run_coarse

    p = load_params("tiny", {**TINY_NERF, "guidance.kind": "none"})
    (tmp_path / "renders").mkdir()
    (tmp_path / "renders" / "novel_007.png").write_bytes(b"old")
    (tmp_path / "mesh.glb").write_bytes(b"old")
    run_coarse(p, _oracle_ref(p), tmp_path, resume=False, progress=False)
    assert not (tmp_path / "renders" / "novel_007.png").exists() and not (tmp_path / "mesh.glb").exists()
    assert (tmp_path / "renders" / "novel_000.png").is_file() and (tmp_path / "trace.csv").is_file()


def test_the_loop_marks_its_clock_every_25_steps_across_a_resume(tmp_path):
    """result.json's `marks`: [step, elapsed s] where each run of the loop starts (step 0 at 0 s; a
    resumed run at its checkpoint's step and clock) and at steps 25, 50, …, those before a kill kept
    over the resume (the checkpoint holds them), elapsed increasing; bench speed reads its steady
    ms/iter from them, speed_plot.py --timeline the pace of the first iterations too."""
    from core.stages.coarse import run_coarse
    from flows.bench_asset import steady_ms_per_iter

    p = load_params("tiny", {**TINY_NERF, "coarse.iters": 50, "coarse.checkpoint_every": 10})
    ref = _oracle_ref(p)
    run_coarse(p, ref, tmp_path / "c", progress=False, stop_after=30)  # killed after step 30 (saved at 30)
    record = run_coarse(p, ref, tmp_path / "c", progress=False).record
    marks = record["marks"]
    assert [m[0] for m in marks] == [0, 25, 30, 50]
    assert marks[0][1] == 0 < marks[1][1] < marks[2][1] < marks[3][1] <= record["seconds"] + 1e-3  # ms rounding
    assert steady_ms_per_iter(marks, 25) == pytest.approx(1000 * (marks[3][1] - marks[1][1]) / 25, abs=0.06)


def test_a_checkpoint_written_on_a_thread_is_the_one_written_in_line(tmp_path, monkeypatch):
    """params.checkpoint_background (default on): the coarse stage's checkpoints are written on the
    writer's thread, and a run stopped after step 30 leaves the same state, tensor for tensor, as
    one that wrote them in line; the write is finished when run_coarse returns."""
    import threading

    import core.stages.engine as engine
    from core.stages.coarse import run_coarse

    writers: list[str] = []
    save = engine.atomic_torch_save

    def spy(obj, path):  # the real writer, noting the thread it ran on
        writers.append(threading.current_thread().name)
        return save(obj, path)

    monkeypatch.setattr(engine, "atomic_torch_save", spy)
    states = {}
    for background in (True, False):
        p = load_params("tiny", {**TINY_NERF, "coarse.iters": 40, "coarse.checkpoint_every": 10,
                                 "checkpoint_background": background})
        run_coarse(p, _oracle_ref(p), tmp_path / str(background), progress=False, stop_after=30)
        states[background] = read_state(tmp_path / str(background) / "checkpoint.pt")
    assert writers == ["lift3d-coarse-checkpoint"] * 3 + [threading.current_thread().name] * 3
    assert states[True].step == states[False].step == 30
    assert _same_tensors(states[True], states[False])
    assert [m[0] for m in states[True].marks] == [m[0] for m in states[False].marks] == [0, 25]


def test_the_background_writer_copies_first_writes_in_order_and_hands_its_error_back(tmp_path):
    """core.io: host_copy's tensors keep the values of the moment they were copied (a later in-place
    update of the original does not reach the file); writes run one at a time in order; a write's
    error comes back at the next wait (and is dropped when the caller is failing already)."""
    from core.io import BackgroundWriter, host_copy

    live = {"w": torch.zeros(3), "opt": [torch.ones(2), (torch.full((1,), 5.0), "x")]}
    copied = host_copy(live)
    live["w"].add_(1.0)
    live["opt"][0].mul_(0.0)
    assert copied["w"].tolist() == [0.0, 0.0, 0.0] and copied["opt"][0].tolist() == [1.0, 1.0]
    assert copied["opt"][1][1] == "x" and copied["opt"][1][0].tolist() == [5.0]

    order: list[int] = []
    w = BackgroundWriter()
    for k in range(3):
        w.submit(lambda k=k: (torch.save({"k": k}, tmp_path / "f.pt"), order.append(k)))
    w.wait()
    assert order == [0, 1, 2] and torch.load(tmp_path / "f.pt")["k"] == 2

    def fail():
        raise OSError("disk full")

    w.submit(fail)
    with pytest.raises(OSError, match="disk full"):
        w.wait()
    w.wait()  # handed back once
    w.submit(fail)
    w.wait(raise_error=False)
    w.wait()


def test_steady_ms_per_iter_by_hand():
    from flows.bench_asset import steady_ms_per_iter

    marks = [[25, 5.0], [50, 6.0], [75, 6.5], [100, 7.0]]
    assert steady_ms_per_iter(marks, 50) == 20.0  # (7.0 - 6.0) s / 50 steps
    assert steady_ms_per_iter(marks, 0) == 26.7  # (7.0 - 5.0) / 75, rounded
    assert steady_ms_per_iter(marks, 90) is None and steady_ms_per_iter([], 0) is None


def _sync_here():
    import warnings

    from core.perf import SYNC_WARNING

    warnings.warn(SYNC_WARNING)  # what torch warns under set_sync_debug_mode("warn")


def test_sync_audit_counts_each_sync_at_the_line_that_caused_it():
    """`bench speed --sync-audit` (issue 15): every synchronisation counted (not once per line, as
    Python's default filter would), attributed to lift3d's innermost frame; other warnings pass."""
    import inspect
    import warnings

    from core.perf import SyncAudit

    line = inspect.getsourcelines(_sync_here)[1] + 5
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with SyncAudit() as audit:
            for _ in range(3):
                _sync_here()
            warnings.warn("something else")
        _sync_here()  # after the block: not counted, shown as usual
    assert dict(audit.counts) == {f"tests/test_stage_engine.py:{line} (_sync_here)": 3}
    assert [str(w.message) for w in seen] == ["something else", "called a synchronizing CUDA operation"]
    assert audit.summary(iterations=2) == {"total": 3, "per_iteration": 1.5, "sites": dict(audit.counts)}
    with SyncAudit(enabled=False) as off:
        with warnings.catch_warnings(record=True):
            _sync_here()
    assert off.summary(1)["total"] == 0


def test_metrics_reach_the_host_in_one_read_with_floats_values():
    """The loop's metrics for the callback and trace.csv (issue 15, session 21): the tensors read in
    one copy per device, the numbers float() gives each, in the same order, strings kept."""
    from core.stages.engine import _to_host

    metrics = {"loss": torch.tensor(0.1234567, dtype=torch.float32), "faces": 12.0, "shading": "albedo",
               "half": torch.tensor(0.3333, dtype=torch.float16), "flag": torch.tensor(True), "n": 3,
               "one": torch.tensor([2.5e-8])}
    host = _to_host(metrics)
    assert list(host) == list(metrics)
    assert host["shading"] == "albedo" and host["n"] == 3.0 and host["faces"] == 12.0
    for k in ("loss", "half", "flag", "one"):
        assert host[k] == float(metrics[k]) and isinstance(host[k], float)


def test_the_metrics_queue_hands_every_iterations_metrics_over_in_order_and_late():
    """A stage's callback on a GPU gets each iteration's metrics two iterations late (the host does
    not wait for the device to read them), in order, with the values _to_host reads; the rest at the
    flush. Here on CPU tensors with the GPU's lag."""
    from core.stages.engine import _MetricsQueue, _to_host

    seen = []
    q = _MetricsQueue(lambda s, m: seen.append((s, m)), lag=2)
    metrics = [{"loss": torch.tensor(0.5 + k, dtype=torch.float32), "shading": "albedo", "n": k,
                "half": torch.tensor(1 / (k + 3), dtype=torch.float16)} for k in range(5)]
    for k, m in enumerate(metrics):
        q.push(k, m)
        assert [s for s, _ in seen] == list(range(max(0, k - 1)))  # two behind
    q.flush()
    assert [s for s, _ in seen] == [0, 1, 2, 3, 4]
    for (s, got), m in zip(seen, metrics):
        want = {k: v for k, v in _to_host(m).items() if not isinstance(v, str)}
        assert got == want and list(got) == ["loss", "n", "half"]


def test_a_step_only_callback_is_called_every_iteration_without_metrics(tmp_path):
    """bench speed's profiler steps through a callback marked `metrics = False`: every iteration, at
    once, with nothing read to the host; a plain callback gets every iteration's metrics."""
    from core.oracle.guidance import OracleGuidance
    from core.oracle.objects import make_object
    from core.stages.coarse import run_coarse
    from core.oracle.bench import oracle_reference

    p = load_params("smoke", {"coarse.iters": 4, "coarse.checkpoint_every": 1000})
    obj = make_object("torus")
    calls = []

    def step(s, m):
        calls.append((s, m))
    step.metrics = False
    run_coarse(p, oracle_reference(obj, p), tmp_path / "a", guidance=OracleGuidance(obj, p), device="cpu",
               progress=False, callback=step)
    assert calls == [(0, {}), (1, {}), (2, {}), (3, {})]


def test_with_the_gpus_lag_the_callback_still_gets_every_iteration_in_order(tmp_path, monkeypatch):
    """The stage loop with the metrics two iterations late (as on a GPU) across the 25th iteration's
    read, a stop_after and a resumed run: the callback gets every iteration once, in order, with the
    values of a run that hands them over at once."""
    import core.stages.engine as engine
    from core.oracle.bench import oracle_reference
    from core.oracle.guidance import OracleGuidance
    from core.oracle.objects import make_object
    from core.stages.coarse import run_coarse

    p = load_params("smoke", {"coarse.iters": 27, "coarse.checkpoint_every": 10, "coarse.resolution": 12,
                              "coarse.samples_per_ray": 8})
    obj = make_object("torus")
    runs = {}
    for lag in (0, 2):
        monkeypatch.setitem(engine.METRICS_LAG, "cpu", lag)
        seen = []
        kw = dict(guidance=OracleGuidance(obj, p), device="cpu", progress=False,
                  callback=lambda s, m: seen.append((s, m["loss"])))
        run_coarse(p, oracle_reference(obj, p), tmp_path / f"lag{lag}", stop_after=22, **kw)
        run_coarse(p, oracle_reference(obj, p), tmp_path / f"lag{lag}", **kw)  # resumes from iteration 20
        runs[lag] = seen
    assert [s for s, _ in runs[2]] == list(range(22)) + list(range(20, 27))
    assert runs[2] == runs[0]
