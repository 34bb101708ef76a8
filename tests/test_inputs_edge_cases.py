"""Input photos that `lift3d prepare` and `load_reference` (the `coarse` command on a photo) must read
alike (issue 14): 16-bit / float photos, EXIF orientation, a fully opaque alpha, and the tiny
segmentation model under the smoke preset. Tiny models are built on the fly, as in test_prepare."""
import logging

import numpy as np
import pytest
from PIL import Image

from core.inputs.images import load_reference
from core.inputs.segment import segment
from core.params import load_params


@pytest.fixture()
def tiny_env(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.getbasetemp() / "tiny-root"  # shared by the tests of this worker
    monkeypatch.setenv("LIFT3D_TINY_DIR", str(root))
    # the real u2net is never fetched here: asked for it, rembg_session fails at once
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("U2NET_HOME", str(tmp_path_factory.getbasetemp() / "no-u2net"))
    return root


def bbox(a):
    ys, xs = np.nonzero(np.asarray(a) > 0.5 * np.asarray(a).max())
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def wh(a):
    l, t, r, b = bbox(a)
    return r - l, b - t


def test_eight_bit_scales_the_value_range():
    from core.inputs.images import eight_bit

    u16 = np.array([[0, 257, 65535]], np.uint16)
    assert np.asarray(eight_bit(Image.fromarray(u16))).tolist() == [[0, 1, 255]]
    i32 = Image.fromarray(np.array([[0, 1000, 4000]], np.int32))
    assert i32.mode == "I" and np.asarray(eight_bit(i32)).tolist() == [[0, 64, 255]]
    f = Image.fromarray(np.array([[0.0, 0.25, 0.5]], np.float32))
    assert np.asarray(eight_bit(f)).tolist() == [[0, 128, 255]]
    rgb = Image.new("RGB", (2, 2))
    assert eight_bit(rgb) is rgb


def _gray16(path, size=(160, 120), box=(40, 30, 120, 100)):
    """A 16-bit grey photo: a near-white background (62000 → 241) and a dark object (12000 → 47)."""
    a = np.full(size[::-1], 62000, np.uint16)
    a[box[1]:box[3], box[0]:box[2]] = 12000
    Image.fromarray(a).save(path)
    assert Image.open(path).mode == "I;16"
    return path


def test_16bit_photo_is_segmented_in_prepare_and_load_reference(tiny_env, tmp_path):
    path = _gray16(tmp_path / "gray16.png")  # an 80×70 object
    p = load_params("smoke", {"segment.recenter": False})
    seg = segment(path, p)
    assert not seg.used_input_alpha and bbox(seg.mask) == (40, 30, 120, 100)
    assert np.asarray(seg.rgba)[60, 80, 0] == 47  # 12000 / 257
    ref = load_reference(path, size=64, params=load_params("smoke"))
    w, h = wh(ref.mask[0].numpy())
    assert w == pytest.approx(0.8 * 64, abs=2) and h == pytest.approx(0.8 * 64 * 70 / 80, abs=2)
    # a 16-bit photo over max_input_pixels is downscaled too (Pillow cannot `reduce` 16-bit images)
    seg = segment(path, load_params("smoke", {"segment.max_input_pixels": 4800}))
    assert not seg.used_input_alpha and seg.framing.work_size == (80, 60)


def _exif_rotated_rgba(path):
    """Stored 160×80 with an object 100 wide, 40 high; EXIF orientation 6: upright it is 80×160, the
    object 40 wide and 100 high."""
    a = np.zeros((80, 160, 4), np.uint8)
    a[20:60, 10:110] = (200, 30, 30, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(path, exif=exif)
    return path


def test_exif_orientation_is_applied_by_prepare_and_load_reference(tiny_env, tmp_path):
    path = _exif_rotated_rgba(tmp_path / "turned.png")
    seg = segment(path, load_params("smoke", {"segment.recenter": False}))
    assert seg.rgba.size == (80, 160) and seg.source_size == (80, 160)
    assert wh(seg.mask) == (40, 100)
    ref = load_reference(path, size=50)
    w, h = wh(ref.mask[0].numpy())
    assert h == pytest.approx(40, abs=1) and w == pytest.approx(16, abs=1)  # upright: tall, not wide


def test_exif_jpeg_photo_is_upright_in_load_reference(tiny_env, tmp_path):
    im = Image.new("RGB", (160, 80), (255, 255, 255))
    im.paste((200, 30, 30), (10, 20, 110, 60))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(tmp_path / "turned.jpg", exif=exif, quality=95)
    ref = load_reference(tmp_path / "turned.jpg", size=50, params=load_params("smoke"))
    w, h = wh(ref.mask[0].numpy())
    assert h == pytest.approx(40, abs=1) and w == pytest.approx(16, abs=2)


def test_load_reference_segments_with_the_tiny_model_under_smoke(tiny_env, tmp_path):
    """As `prepare`, through core.models.sources.segment_model: no real u2net is asked for."""
    im = Image.new("RGB", (160, 120), (255, 255, 255))
    im.paste((20, 20, 200), (40, 20, 80, 100))  # 40 wide, 80 high
    im.save(tmp_path / "photo.jpg", quality=95)
    ref = load_reference(tmp_path / "photo.jpg", size=64, params=load_params("smoke"))
    w, h = wh(ref.mask[0].numpy())
    assert h == pytest.approx(0.8 * 64, abs=2) and w == pytest.approx(0.4 * 64, abs=2)
    assert ref.rgb[2, 32, 32] > 0.6 and ref.rgb[0, 32, 32] < 0.3  # the object's blue


def _opaque_rgba(path):
    """An RGBA photo whose alpha is 255 everywhere: a green object on white, 40 wide, 80 high."""
    im = Image.new("RGBA", (160, 120), (255, 255, 255, 255))
    im.paste((30, 160, 60, 255), (60, 20, 100, 100))
    im.save(path)
    return path


def test_fully_opaque_alpha_is_segmented_like_a_photo(tiny_env, tmp_path, caplog):
    path = _opaque_rgba(tmp_path / "opaque.png")
    with caplog.at_level(logging.INFO):
        seg = segment(path, load_params("smoke", {"segment.recenter": False}))
    assert not seg.used_input_alpha and bbox(seg.mask) == (60, 20, 100, 100)
    assert sum("fully opaque" in r.getMessage() for r in caplog.records) == 1
    caplog.clear()
    with caplog.at_level(logging.INFO):
        ref = load_reference(path, size=64, params=load_params("smoke"))
    w, h = wh(ref.mask[0].numpy())
    assert h == pytest.approx(0.8 * 64, abs=2) and w == pytest.approx(0.4 * 64, abs=2)  # not the whole frame
    assert sum("fully opaque" in r.getMessage() for r in caplog.records) == 1


def test_prepare_cli_on_a_16bit_photo_and_an_opaque_rgba(tiny_env, tmp_path):
    import json

    from flows.cli import main

    # the object framed at 0.8 of 128 px (the whole 160×120 frame would be 102×77)
    for path, size in ((_gray16(tmp_path / "gray16.png"), (102, 90)), (_opaque_rgba(tmp_path / "opaque.png"), (51, 102))):
        out = tmp_path / path.stem
        assert main(["prepare", str(path), "--out", str(out), "--preset", "tiny"]) == 0
        assert json.loads((out / "prepare.json").read_text())["alpha"] == "tiny rembg"
        w, h = wh(Image.open(out / "mask.png"))
        assert abs(w - size[0]) <= 2 and abs(h - size[1]) <= 2
