"""Segmentation, framing and `lift3d prepare` (smoke preset: the tiny judges through their loaders)."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.errors import InputError
from core.params import load_params
from core.inputs.segment import segment, segment_image
from flows.cli import main

BENCH = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"


@pytest.fixture()
def tiny_env(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.getbasetemp() / "tiny-root"  # shared by the tests of this worker
    monkeypatch.setenv("LIFT3D_TINY_DIR", str(root))
    return root


def bbox(a):
    ys, xs = np.nonzero(np.asarray(a) > 127)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def test_rgb_photo_is_segmented_recentred_and_scaled(tiny_env):
    p = load_params("smoke", {"segment.size": 128, "segment.object_scale": 0.5})
    im = Image.new("RGB", (400, 300), (255, 255, 255))
    im.paste((180, 40, 40), (20, 30, 120, 230))  # a 100×200 object near the left edge
    seg = segment(im, p)
    assert not seg.used_input_alpha and seg.rgba.size == (128, 128) and seg.rgba.mode == "RGBA"
    l, t, r, b = bbox(seg.mask)
    # longer side (200 px) → 0.5·128 = 64 px, centred; the shorter scales alike (100 → 32)
    assert (b - t) == pytest.approx(64, abs=2) and (r - l) == pytest.approx(32, abs=2)
    assert (l + r) / 2 == pytest.approx(64, abs=1.5) and (t + b) / 2 == pytest.approx(64, abs=1.5)
    px = np.asarray(seg.rgba)[64, 64]
    assert px[3] == 255 and px[0] > 150 and px[1] < 80  # the object's colour kept


def test_input_alpha_is_used_as_is(tiny_env, monkeypatch):
    import core.inputs.segment as seg_mod

    def no_rembg(*a, **k):
        raise AssertionError("rembg must not run for an RGBA input")

    monkeypatch.setattr(seg_mod, "rembg_session", no_rembg)
    p = load_params("smoke", {"segment.size": 64, "segment.recenter": False})
    a = np.zeros((64, 64, 4), np.uint8)
    a[..., :3] = 255  # white object on ... a white photo: only the alpha can tell
    a[10:40, 20:30, 3] = 255
    a[40:42, 20:30, 3] = 90  # soft edge is kept as is
    seg = segment(Image.fromarray(a, "RGBA"), p)
    assert segment_image(Image.fromarray(a, "RGBA"), p).tobytes() == seg.rgba.tobytes()  # the RGBA alone
    assert seg.used_input_alpha
    assert np.array_equal(np.asarray(seg.rgba.getchannel("A")), a[..., 3])
    assert bbox(seg.mask) == (20, 10, 30, 40)


def test_empty_alpha_is_an_input_error(tiny_env):
    p = load_params("smoke")
    with pytest.raises(InputError, match="no foreground"):
        segment(Image.new("RGBA", (32, 32), (0, 0, 0, 0)), p)


def test_prepare_uses_given_depth_aligned_and_downscales_big_inputs(tiny_env, tmp_path):
    # a 3000×2000 RGBA "photo" with a depth.png beside it (a gradient inside the object)
    W, H = 3000, 2000
    a = np.zeros((H, W, 4), np.uint8)
    a[500:1500, 1000:2500] = (40, 160, 60, 255)
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(a, "RGBA").save(src / "rgba.png")
    d = np.zeros((H, W), np.uint8)
    d[500:1500, 1000:2500] = np.linspace(10, 250, 1500, dtype=np.float32).astype(np.uint8)[None, :]
    Image.fromarray(d, "L").save(src / "depth.png")
    out = tmp_path / "out"
    rc = main(["prepare", str(src / "rgba.png"), "--out", str(out), "--preset", "smoke",
               "--set", "segment.max_input_pixels=1000000"])
    assert rc == 0
    rgba, mask, depth = (Image.open(out / n) for n in ("rgba.png", "mask.png", "depth.png"))
    assert rgba.size == mask.size == depth.size == (256, 256) and depth.mode == "L"
    rec = json.loads((out / "prepare.json").read_text())
    assert rec["alpha"] == "input" and rec["depth_given"] and rec["source_size"] == [W, H]
    assert rec["framing"]["work_size"][0] * rec["framing"]["work_size"][1] <= 1_000_000
    m = np.asarray(mask) > 127
    dv = np.asarray(depth).astype(float)
    assert bbox(mask) == bbox((np.asarray(depth) > 0) * 255)  # the given depth framed exactly like the image
    cols = dv[128][m[128]]
    assert cols[0] < 30 and cols[-2] > 230 and np.all(np.diff(cols[:-1]) > 0)  # its values kept (a ramp)


def test_prepare_estimates_depth_without_one(tiny_env, tmp_path):
    im = Image.new("RGB", (160, 120), (255, 255, 255))
    im.paste((20, 20, 200), (40, 30, 120, 100))
    im.save(tmp_path / "photo.jpg", quality=95)
    out = tmp_path / "out"
    assert main(["prepare", str(tmp_path / "photo.jpg"), "--out", str(out), "--preset", "smoke"]) == 0
    rec = json.loads((out / "prepare.json").read_text())
    assert rec["depth"] == "tiny DPT" and not rec["depth_given"] and rec["alpha"] == "tiny rembg"
    d = np.asarray(Image.open(out / "depth.png"))
    m = np.asarray(Image.open(out / "mask.png")) > 127
    assert d[~m].max() == 0 and d[m].max() == 255


def test_missing_model_message_from_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("U2NET_HOME", str(tmp_path))
    Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp_path / "p.png")
    rc = main(["prepare", str(tmp_path / "p.png"), "--out", str(tmp_path / "o"),
               "--set", "models.offline=true", "--set", "device=cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "lift3d: error: segmentation model 'u2net'" in err and "U2NET_HOME" in err
    assert len(err.strip().splitlines()) == 1


BIG = ["realfusion15/blue_bird", "realfusion15/banana", "nerf4/chair"]


@pytest.mark.skipif(not BENCH.is_dir(), reason="../shared/benchmarks not present")
@pytest.mark.parametrize("name", BIG)
def test_prepare_benchmark_inputs(tiny_env, tmp_path, name):
    """A few of the 19 (the largest, 4844×3234, among them); scripts/prepare_benchmarks.py runs all."""
    out = tmp_path / "o"
    assert main(["prepare", str(BENCH / name / "rgba.png"), "--out", str(out), "--preset", "smoke"]) == 0
    rec = json.loads((out / "prepare.json").read_text())
    assert rec["alpha"] == "input" and rec["depth"].endswith(f"{name}/depth.png")
    src_a = Image.open(BENCH / name / "rgba.png").getchannel("A")
    assert rec["framing"]["box"] == list(src_a.point(lambda v: 255 if v > 127 else 0).getbbox())
