"""Progress a person can follow: every long step ends with one printed line of its cost (seconds,
iterations per second, peak memory) that its record file holds too, and the export says where it is."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from core.params import load_params
from core.perf import peak_memory, summary, summary_line

BENCH = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
TINY_NERF = {"coarse.resolution": 16, "coarse.samples_per_ray": 8, "coarse.grid.levels": 2,
             "coarse.grid.log2_table_size": 8, "coarse.grid.max_resolution": 32, "coarse.mlp.hidden": 8,
             "coarse.occupancy_resolution": 8, "fine.resolution": 16, "fine.tet_resolution": 8,
             "fine.texture_size": 16, "evaluate.novel_views": 1, "detector.enabled": False,
             "guidance.kind": "none", "coarse.iters": 6, "fine.iters": 4}
KEYS = {"seconds", "iterations", "it_per_s", "peak_memory_gib", "memory_kind"}
LINE = r"{} stage: {} iterations in [\d.]+ s \([\d.]+ it/s\), outputs [\d.]+ s, peak memory [\d.]+ GiB \(process max RSS\)"


def test_summary_on_cpu_is_the_process_max_rss():
    import resource

    gib, kind = peak_memory("cpu")
    assert kind == "process max RSS"
    assert gib == pytest.approx(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, rel=0.05)
    rec = summary("cpu", 10.0, 25, outputs_seconds=1.5)
    assert KEYS <= rec.keys() and rec["it_per_s"] == 2.5 and rec["outputs_seconds"] == 1.5
    assert summary_line("coarse stage", rec).startswith("coarse stage: 25 iterations in 10.0 s (2.50 it/s), outputs 1.5 s")
    assert summary("cpu", 3.0)["it_per_s"] is None and summary_line("prepare", summary("cpu", 3.0)).startswith(
        "prepare: 3.0 s, peak memory")


def test_each_stage_prints_and_records_its_cost_and_the_export_its_parts(tmp_path, caplog, capfd):
    from core.oracle.bench import oracle_reference
    from core.oracle.objects import make_object
    from core.stages.coarse import run_coarse
    from core.stages.fine import run_fine

    p = load_params("tiny", TINY_NERF)
    ref = oracle_reference(make_object("torus"), p)
    with caplog.at_level(logging.INFO, logger="core"):
        coarse = run_coarse(p, ref, tmp_path / "c", progress=False)
        run_fine(p, ref, coarse.rep.field, tmp_path / "f", coarse=coarse.snapshot(), progress=False,
                 turntable_frames=3)
    text = caplog.text
    for stage, iters, folder in (("coarse", 6, "c"), ("fine", 4, "f")):
        assert len(re.findall(LINE.format(stage, iters), text)) == 1, text
        r = json.loads((tmp_path / folder / "result.json").read_text())
        assert KEYS | {"outputs_seconds"} <= r["summary"].keys() and r["summary"]["iterations"] == iters
        assert r["summary"]["peak_memory_gib"] > 0.05 and r["summary"]["it_per_s"] > 0
        # the numbers at the top level too: the tasks log those to MLflow
        assert r["it_per_s"] == r["summary"]["it_per_s"] and r["peak_memory_gib"] == r["summary"]["peak_memory_gib"]
    assert "coarse stage: writing renders and the mesh" in text
    assert "export: UV atlas" in text and "turntable: 3 frames" in text and "exported mesh.obj" in text
    assert "turntable" in capfd.readouterr().err  # the bar over the turntable's frames


@pytest.fixture()
def tiny_env(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.getbasetemp() / "tiny-root"
    monkeypatch.setenv("LIFT3D_TINY_DIR", str(root))
    return root


def test_textual_inversion_and_prepare_print_and_record_their_cost(tiny_env, tmp_path, caplog, capfd):
    from core.inputs.prepare import prepare_inputs
    from core.pipeline import textual_inversion_stage

    photo = BENCH / "nerf4" / "chair" / "rgba.png"
    if not photo.is_file():
        pytest.skip("../shared/benchmarks not present")
    p = load_params("tiny", {"depth.use_sibling": False})  # the depth step runs (no depth.png taken from beside it)
    with caplog.at_level(logging.INFO, logger="core"):
        rec = prepare_inputs(photo, tmp_path / "inputs", p)
        textual_inversion_stage(tmp_path / "inputs" / "rgba.png", tmp_path / "ti", p)
    assert KEYS <= rec["summary"].keys()
    assert json.loads((tmp_path / "inputs" / "prepare.json").read_text())["summary"] == rec["summary"]
    assert re.search(r"prepare: [\d.]+ s, peak memory [\d.]+ GiB \(process max RSS\)", caplog.text)
    assert "prepare: estimating the reference depth (tiny DPT)" in caplog.text
    ti = json.loads((tmp_path / "ti" / "result.json").read_text())
    steps = p.textual_inversion.steps
    assert ti["summary"]["iterations"] == steps and KEYS <= ti["summary"].keys()
    assert re.search(rf"textual inversion: {steps} iterations in [\d.]+ s \([\d.]+ it/s\), peak memory", caplog.text)
    assert "textual inversion" in capfd.readouterr().err  # its tqdm bar
