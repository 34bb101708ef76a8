"""Input photos that `lift3d prepare` and `load_reference` (the `coarse` command on a photo) must read
alike (issue 14): EXIF orientation and the tiny
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
