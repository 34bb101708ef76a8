"""models.compile_ahead (core.stages.compile_ahead): the coarse stage's first guided iterations run in a
side process while the textual inversion runs, so that on a GPU the coarse stage finds its priors'
compiled code in the machine's caches. Here on a CPU with the tiny priors ('on' forces it): the side
process builds and runs the coarse stage as the stage would, reports, and never holds the asset up."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from core.params import load_params
from core.stages.compile_ahead import CompileAhead, why_not

BENCH = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
PHOTO = BENCH / "nerf4" / "chair" / "rgba.png"


@pytest.fixture()
def tiny_env(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.getbasetemp() / "tiny-root"
    monkeypatch.setenv("LIFT3D_TINY_DIR", str(root))
    return root


def test_auto_runs_it_only_where_the_coarse_priors_compile():
    p = load_params("tiny")
    assert why_not(p, "cpu") == "the coarse stage's priors do not compile here"
    assert why_not(p.model_copy(update={"models": p.models.model_copy(update={"compile_ahead": "off"})}), "cpu") \
        == "models.compile_ahead is off"
    assert why_not(load_params("tiny", ["models.compile_ahead=on"]), "cpu") == ""
    assert "guidance.kind" in why_not(load_params("tiny", ["guidance.kind=none"]), "cuda")
    assert "do not compile" in why_not(load_params("tiny", ["sd.compile=none", "sd.vae_compile=none",
                                                            "zero123.compile=none", "zero123.vae_compile=none"]), "cuda")


def test_the_textual_inversion_runs_the_coarse_stage_ahead_in_a_side_process_and_waits_for_it(tiny_env, tmp_path):
    from core.pipeline import textual_inversion_stage

    if not PHOTO.is_file():
        pytest.skip("../shared/benchmarks not present")
    p = load_params("tiny", ["models.compile_ahead=on", "coarse.iters=40", "coarse.ref_warmup=3", "fine.iters=40",
                             "cpu_threads=1"])
    textual_inversion_stage(PHOTO, tmp_path / "ti", p, progress=False)
    rec = json.loads((tmp_path / "ti" / "result.json").read_text())
    side = rec["compile_ahead"]
    assert "error" not in side, side
    # from the coarse stage's first guided iteration, as many guided iterations as asked, reference ones between
    assert side["from_iteration"] == 3 and side["guided_iterations"] == 4 and side["iterations"] >= 4
    assert side["pid"] != os.getpid() and side["device"] == "cpu" and side["waited_s"] >= 0
    assert side["seconds"] > 0 and side["compiles"] == {}  # nothing compiles on a CPU
    # then the fine stage's, from that field
    assert side["fine"] == {"iterations": side["fine"]["iterations"], "guided_iterations": 4,
                            "from_iteration": p.fine.ref_warmup}, side
    assert "compile ahead" in (tmp_path / "ti" / "compile_ahead.log").read_text()
    assert (tmp_path / "ti" / "learned_embeds.bin").is_file()  # the asset's own output, as without it


def test_a_failed_side_process_is_reported_not_raised_and_a_running_one_is_stopped(tiny_env, tmp_path):
    p = load_params("tiny", ["models.compile_ahead=on"])
    rec = CompileAhead(p, tmp_path / "missing.png", tmp_path / "a").start().finish()
    assert rec["error"].startswith("exit 1: ") and "missing.png" in rec["error"], rec
    assert not (tmp_path / "a" / "compile_ahead.json").exists()
    with pytest.raises(KeyboardInterrupt):
        with CompileAhead(p, PHOTO, tmp_path / "b").start() as ahead:
            proc = ahead.proc
            raise KeyboardInterrupt  # the textual inversion stopped: so does the side process
    assert proc.poll() is not None and not (tmp_path / "b" / "compile_ahead.json").exists()
