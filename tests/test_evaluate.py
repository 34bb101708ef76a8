"""The papers' metrics on known pairs, `lift3d evaluate` on a stage folder, and the report."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from core.evaluation.evaluate import build_lpips, clip_similarity, lpips_distance
from core.evaluation.metrics import psnr
from core.params import load_params
from core.testmodels.judges import ensure_tiny_judges
from flows.cli import main


@pytest.fixture(scope="module")
def judges(tmp_path_factory):
    return ensure_tiny_judges(tmp_path_factory.getbasetemp() / "tiny-root" / "judges")


@pytest.fixture()
def tiny_env(judges, monkeypatch):
    monkeypatch.setenv("LIFT3D_TINY_DIR", str(judges.root.parent))


@pytest.fixture(scope="module")
def clip(judges):
    from core.evaluation.clip import load_clip

    return load_clip(str(judges.clip_config), str(judges.clip_checkpoint))


@pytest.fixture(scope="module")
def lp():
    return build_lpips("alex", random_trunk=True)


def image(seed=0, size=64):
    g = torch.Generator().manual_seed(seed)
    return 0.3 + 0.4 * torch.rand(3, size, size, generator=g)  # in [0.3, 0.7]: noise below never clips


def test_identical_images(clip, lp):
    x = image()
    assert psnr(x, x, cap=100.0) == 100.0
    assert lpips_distance(lp, x, x) == pytest.approx(0.0, abs=1e-7)
    assert clip_similarity(clip, x.unsqueeze(0).repeat(4, 1, 1, 1), x) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("sigma", [0.01, 0.05, 0.1])
def test_psnr_of_known_noise(sigma):
    x = image(1, 256)
    noisy = x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    assert psnr(noisy, x) == pytest.approx(20 * math.log10(1 / sigma), abs=0.1)


def test_a_random_trunk_is_the_same_in_every_run():
    """The smoke preset's LPIPS (random trunk) is reproducible: the trunk is drawn from a fixed seed,
    not from whatever the global stream holds (session 13: two main jobs with equal renders gave
    LPIPS 0.0093 and 0.0111), and building it leaves the caller's stream where it was."""
    from core.evaluation import evaluate

    a, b = image(3), image(4)
    values = []
    for seed in (1, 2):
        evaluate._LPIPS.clear()
        torch.manual_seed(seed)
        before = torch.random.get_rng_state()
        values.append(lpips_distance(build_lpips("alex", random_trunk=True), a, b))
        assert torch.equal(torch.random.get_rng_state(), before)
    evaluate._LPIPS.clear()
    assert values[0] == values[1] and values[0] > 0


def test_different_images_score_worse(clip, lp):
    a, b = image(3), image(4)
    assert lpips_distance(lp, a, b) > 0.0 and psnr(a, b) < 30
    sim = clip_similarity(clip, b.unsqueeze(0), a)
    # eq.: cosine of unit embeddings, computed by hand
    ea, eb = clip.encode_images(a[None]), clip.encode_images(b[None])
    assert sim == pytest.approx(float(torch.nn.functional.cosine_similarity(ea, eb)), abs=1e-5) and sim < 1 - 1e-4


def write_stage(folder, ref_rgba, render_rgba, novel, result=None):
    (folder / "renders").mkdir(parents=True)
    Image.fromarray(ref_rgba, "RGBA").save(folder / "reference_rgba.png")
    Image.fromarray(render_rgba, "RGBA").save(folder / "renders" / "reference.png")
    for i, n in enumerate(novel):
        Image.fromarray(n, "RGB").save(folder / "renders" / f"novel_{i:03d}.png")
    (folder / "result.json").write_text(json.dumps(result or {"stage": folder.name}))


def rgba_object(color, size=64):
    a = np.zeros((size, size, 4), np.uint8)
    a[..., :3] = 255
    a[16:48, 20:44] = (*color, 255)
    return a


def test_evaluate_command_prefers_fine_and_writes_metrics(tiny_env, tmp_path, capsys):
    run = tmp_path / "realfusion15" / "teapot"
    ref = rgba_object((200, 40, 40))
    on_white = ref[..., :3]
    write_stage(run / "coarse", ref, rgba_object((40, 40, 200)), [np.full((64, 64, 3), 30, np.uint8)] * 2)
    write_stage(run / "fine", ref, ref, [on_white] * 3)  # a perfect fine stage
    assert main(["evaluate", str(run), "--preset", "smoke"]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["stage"] == "fine" and m["novel_views"] == 3
    assert m["psnr"] == 100.0 and m["lpips"] == pytest.approx(0, abs=1e-7)
    assert m["clip_similarity"] == pytest.approx(1, abs=1e-5)
    assert m["dataset"] == "realfusion15" and m["asset"] == "teapot"
    # the coarse folder alone: worse numbers
    assert main(["evaluate", str(run / "coarse"), "--preset", "smoke"]) == 0
    mc = json.loads((run / "coarse" / "metrics.json").read_text())
    assert mc["psnr"] < 30 and mc["lpips"] > 0


def test_evaluate_without_completed_stage_is_an_error(tmp_path, capsys):
    (tmp_path / "coarse").mkdir()
    assert main(["evaluate", str(tmp_path), "--preset", "smoke"]) == 2
    assert "no completed stage" in capsys.readouterr().err


def test_report_tables_plots_gallery(tmp_path):
    import imageio.v2 as imageio

    from core.stages.detector import StageDetector, write_trace
    from core.params import DetectorParams
    from core.evaluation.report import load_published, write_report

    res = tmp_path / "results"
    vals = {"a": (0.70, 20.0, 0.20), "b": (0.80, 24.0, 0.10), "c": (0.10, 5.0, 0.90)}
    for asset, (c, p, l) in vals.items():
        d = res / "realfusion15" / asset
        (d / "fine").mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps(
            {"clip_similarity": c, "psnr": p, "lpips": l, "method": "consistent123", "asset": asset,
             "dataset": "realfusion15", "priors": "tiny random" if asset == "c" else "pretrained"}))
        imageio.mimsave(d / "fine" / "turntable.gif", [np.full((8, 8, 3), 100 * i, np.uint8) for i in range(3)])
    det = StageDetector(DetectorParams(enabled=True, every=10, earliest=20, latest=100),
                        lambda imgs: 0.3)
    for s in range(0, 101):
        if det.due(s) and det.update(s, None):
            break
    write_trace(det, res / "realfusion15" / "a" / "detector.json")
    out = write_report(res, tmp_path / "reports")
    md = (tmp_path / "reports" / "report.md").read_text()
    assert "## RealFusion15" in md and "## NeRF4" in md
    rf = md.split("## RealFusion15")[1].split("##")[0]
    row = next(line for line in rf.splitlines() if line.startswith("| CLIP-Similarity"))
    assert "0.750" in row  # our mean (0.70 + 0.80)/2
    pub = load_published()
    m123 = pub[(pub.dataset == "RealFusion15") & (pub.method == "Magic123")]
    assert len(m123) == 2  # both papers report Magic123 on RealFusion15
    assert "consistent123 (ours, n=2)" in md and "Consistent123 [Consistent123 Table 1]" in md
    # a run with the tiny random priors is its own column, labelled as such, out of the mean
    assert "consistent123 (ours, tiny random priors: not comparable, n=1)" in md
    for k in ("metrics_RealFusion15", "detector_traces", "gallery"):
        assert k in out
    assert Image.open(out["metrics_RealFusion15"]).size[0] > 100
    assert (tmp_path / "reports" / "gallery.html").read_text().count("<img") == 3


def test_evaluate_reads_a_real_coarse_stage_folder(tiny_env, tmp_path):
    """The stage-folder contract end to end: the coarse stage writes it, evaluate reads it."""
    pytest.importorskip("core.stages.coarse")
    from core.stages.coarse import run_coarse
    from core.inputs.images import Reference

    p = load_params("smoke", {
        "coarse.iters": 3, "coarse.resolution": 16, "coarse.samples_per_ray": 8, "coarse.mesh_resolution": 16,
        "coarse.grid.levels": 2, "coarse.grid.log2_table_size": 8, "coarse.grid.max_resolution": 32,
        "coarse.losses.normal_smooth": 0, "coarse.losses.orientation": 0, "coarse.shading.normal_only": 0,
        "coarse.shading.diffuse_prob": 0, "coarse.shading.textureless_prob": 0,
        "guidance.kind": "none", "evaluate.novel_views": 2})
    ref = Reference(rgb=torch.ones(3, 16, 16), mask=torch.zeros(1, 16, 16), depth=None)
    ref.rgb[:, 4:12, 4:12] = 0.2
    ref.mask[:, 4:12, 4:12] = 1.0
    run = tmp_path / "nerf4" / "box"
    run_coarse(p, ref, run / "coarse", device="cpu", progress=False)
    assert main(["evaluate", str(run), "--preset", "smoke"]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["stage"] == "coarse" and m["novel_views"] == 2 and m["resolution"] == [16, 16]
    assert 0 < m["psnr"] < 100 and m["lpips"] > 0 and -1 <= m["clip_similarity"] <= 1


def test_the_priors_label_names_analytic_tiny_or_pretrained():
    from core.evaluation.evaluate import _priors_label
    from core.params import load_params

    assert _priors_label(load_params("magic123")) == "pretrained"
    assert _priors_label(load_params("smoke")) == "tiny random"
    assert _priors_label(load_params("smoke", ["sd.model=analytic", "zero123.model=analytic:torus"])) == "analytic"
    assert _priors_label(load_params("smoke", ["zero123.model=analytic"])) == "sd tiny random, zero123 analytic"
