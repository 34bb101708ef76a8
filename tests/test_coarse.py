"""The coarse loop: resume = uninterrupted, outputs, bad inputs through the CLI, a small oracle run."""
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from core.stages.coarse import run_coarse
from core.errors import InputError
from core.oracle.guidance import OracleGuidance
from core.inputs.images import load_reference
from core.oracle.objects import make_object
from core.params import load_params
from core.oracle.bench import evaluate_field, oracle_reference
from flows.cli import main

TINY = {
    "coarse.iters": 12, "coarse.resolution": 16, "coarse.samples_per_ray": 16, "coarse.checkpoint_every": 4,
    "coarse.grid.levels": 4, "coarse.grid.log2_table_size": 12, "coarse.grid.max_resolution": 64,
    "coarse.mlp.hidden": 16, "coarse.occupancy_resolution": 16, "coarse.occupancy_every": 4,
    "coarse.mesh_resolution": 16, "evaluate.novel_views": 2, "coarse.shading.normal_only": 0.25,
}


def tiny_params(**extra):
    return load_params("smoke", {**TINY, **extra})


def test_resumed_run_ends_where_an_uninterrupted_run_ends(tmp_path):
    p = tiny_params()
    obj = make_object("snowman")
    ref = oracle_reference(obj, p)
    a = run_coarse(p, ref, tmp_path / "a", guidance=OracleGuidance(obj, p), device="cpu", progress=False)
    killed = run_coarse(p, ref, tmp_path / "b", guidance=OracleGuidance(obj, p), device="cpu", progress=False,
                        stop_after=8)
    assert killed.step_no == 8 and not (tmp_path / "b" / "result.json").exists()
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["step"] == 8
    assert killed.record is None
    b = run_coarse(p, ref, tmp_path / "b", guidance=OracleGuidance(obj, p), device="cpu", progress=False)
    assert b.step_no == a.step_no == 12
    sa, sb = a.rep.field.state_dict(), b.rep.field.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert torch.equal(a.rep.occupancy.occupied, b.rep.occupancy.occupied)
    # and a run from scratch with another seed does differ (the comparison can fail)
    c = run_coarse(tiny_params(seed=1), ref, tmp_path / "c", guidance=OracleGuidance(obj, p), device="cpu",
                   progress=False)
    assert not torch.equal(c.rep.field.state_dict()["encoding.table"], sa["encoding.table"])
    # the outputs of a completed run, result.json last
    out = tmp_path / "b"
    res = json.loads((out / "result.json").read_text())
    assert res["stage"] == "coarse" and res["steps"] == 12
    for f in res["files"]:
        assert (out / f).is_file(), f
    assert (out / "renders" / "novel_001.png").is_file() and (out / "mesh.ply").read_bytes().startswith(b"ply")
    assert Image.open(out / "renders" / "reference.png").mode == "RGBA"
    from core.stages.coarse import load_coarse_field

    field, state = load_coarse_field(out / "checkpoint.pt")
    params = load_params("smoke").model_validate(state.params)
    assert params.coarse.iters == 12
    x = torch.zeros(3, 3)
    assert torch.allclose(field.density(x), b.rep.field.density(x))


def test_callback_gets_metrics(tmp_path):
    p = tiny_params(**{"coarse.iters": 3})
    obj = make_object("torus")
    seen = []
    run_coarse(p, oracle_reference(obj, p), tmp_path, guidance=OracleGuidance(obj, p), device="cpu",
               progress=False, callback=lambda s, m: seen.append((s, m)))
    assert [s for s, _ in seen] == [0, 1, 2]
    assert seen[0][1]["reference"] == 1.0 and seen[1][1]["reference"] == 0.0
    assert all(np.isfinite(m["loss"]) for _, m in seen)


def test_small_oracle_reconstruction_reaches_a_psnr(tmp_path):
    p = load_params("smoke", {"coarse.iters": 80, "coarse.resolution": 24, "coarse.samples_per_ray": 20,
                              "coarse.checkpoint_every": 1000, "coarse.mesh_resolution": 16})
    obj = make_object("snowman")
    t = run_coarse(p, oracle_reference(obj, p), tmp_path, guidance=OracleGuidance(obj, p), device="cpu",
                   progress=False)
    m = evaluate_field(t.rep.field, obj, p, t.rep.occupancy)
    # an untrained blob scores ~12 dB / IoU ~0.5 (seen); 80 oracle-guided steps must do much better
    assert m["psnr_novel"] >= 16.0 and m["mask_iou"] >= 0.75, m


# --------------------------------------------------------------------------------------- bad inputs
def _rgba(path, size=(40, 30), alpha=255):
    arr = np.zeros((size[1], size[0], 4), np.uint8)
    arr[..., 0] = 200
    arr[8:20, 10:30, 3] = alpha
    Image.fromarray(arr).save(path)
    return path


def _cli_error(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


@pytest.mark.parametrize("case", ["missing", "not_an_image", "no_foreground", "unknown_key", "missing_depth"])
def test_bad_inputs_give_one_line_and_no_output(tmp_path, capsys, case):
    out = tmp_path / "out"
    img = tmp_path / "img.png"
    args = ["coarse", str(img), "--out", str(out), "--preset", "smoke", "--set", "guidance.kind=none"]
    if case == "missing":
        img = tmp_path / "nope.png"
        args[1] = str(img)
    elif case == "not_an_image":
        img.write_text("this is not a png\n")
    elif case == "no_foreground":
        _rgba(img, alpha=0)
    elif case == "unknown_key":
        _rgba(img)
        args += ["--set", "coarse.bogus=1"]
    elif case == "missing_depth":
        _rgba(img)
        args += ["--depth", str(tmp_path / "nodepth.png")]
    rc, err = _cli_error(capsys, args)
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("lift3d: error:"), err
    assert not out.exists()


def test_depth_of_another_size_is_resized_with_a_notice(tmp_path, caplog):
    img = _rgba(tmp_path / "img.png", size=(40, 30))
    depth = tmp_path / "depth.png"
    Image.fromarray((np.linspace(0, 255, 20 * 15).reshape(15, 20)).astype(np.uint8)).save(depth)
    with caplog.at_level(logging.INFO):
        ref = load_reference(img, depth, size=24)
    assert ref.depth.shape == (1, 24, 24) and ref.rgb.shape == (3, 24, 24)
    assert any("resized" in r.getMessage() for r in caplog.records)
    # the object is recentred: its mask spans ~object_scale of the frame, centred
    ys, xs = np.nonzero(ref.mask[0].numpy())
    assert abs((xs.min() + xs.max()) / 2 - 11.5) <= 1.0 and abs((ys.min() + ys.max()) / 2 - 11.5) <= 2.0
    assert 0.7 * 24 <= xs.max() - xs.min() + 1 <= 0.9 * 24
    assert torch.all(ref.rgb[:, 0, :] > 0.99) and torch.all(ref.rgb[:, -1, :] > 0.99)  # background white


def test_huge_photo_is_downscaled_not_a_crash(tmp_path, caplog):
    w, h = 4844, 3234
    arr = np.zeros((h, w, 4), np.uint8)
    arr[1000:2200, 1500:3300] = (30, 160, 90, 255)
    path = tmp_path / "huge.png"
    Image.fromarray(arr).save(path, compress_level=1)
    del arr
    with caplog.at_level(logging.INFO):
        ref = load_reference(path, size=32)
    assert ref.rgb.shape == (3, 32, 32) and ref.mask.sum() > 100
    assert any("downscaled" in r.getMessage() for r in caplog.records)


def test_rgb_without_alpha_names_the_prepare_command(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "core.inputs.segment", None)  # as if segmentation were not installed
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (20, 20), (10, 20, 30)).save(path)
    with pytest.raises(InputError, match="lift3d prepare"):
        load_reference(path, size=16)


def test_cli_coarse_on_a_benchmark_image(tmp_path):
    from pathlib import Path

    bench = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "nerf4" / "mic"
    if not (bench / "rgba.png").is_file():
        pytest.skip("../shared/benchmarks not present")
    out = tmp_path / "mic"
    argv = ["coarse", str(bench / "rgba.png"), "--depth", str(bench / "depth.png"), "--out", str(out),
            "--preset", "smoke", "--set", "guidance.kind=none"]
    for k, v in {**TINY, "coarse.iters": 4}.items():
        argv += ["--set", f"{k}={v}"]
    assert main(argv) == 0
    res = json.loads((out / "result.json").read_text())
    assert res["guidance"] == "none" and (out / "mesh.obj").is_file() and (out / "reference_rgba.png").is_file()


def test_lr_decays_exponentially_to_lr_final():
    from core.stages.coarse import NeRFRepresentation, coarse_spec
    from core.stages.engine import Stage

    p = tiny_params(**{"coarse.iters": 5, "coarse.lr_final": 0.1})
    obj = make_object("torus")
    tr = Stage(coarse_spec(p), NeRFRepresentation(p, torch.device("cpu")), p, oracle_reference(obj, p),
               guidance=OracleGuidance(obj, p))
    seen = []
    for _ in range(5):
        tr.step()
        seen.append([g["lr"] for g in tr.optimizer.param_groups])
    c = p.coarse
    for k, (grid_lr, mlp_lr) in enumerate(seen):
        f = 0.1 ** (k / 4)
        assert grid_lr == pytest.approx(c.lr * c.grid_lr_scale * f) and mlp_lr == pytest.approx(c.lr * f)
