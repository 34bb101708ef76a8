"""The benchmark report as one HTML page: its structure always (table rows, pictures, 3D views, every
path resolving inside the report folder), and a screenshot in headless Chromium where one is installed."""
import importlib.util
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.evaluation.report import write_report
from core.evaluation.report_html import VIEWER_FILE

ROOT = Path(__file__).resolve().parents[1]


class Page(HTMLParser):
    """Tags with their attributes, and the text of table rows by table class."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.rows: dict[str, int] = {}
        self._table = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "table":
            self._table.append(a.get("class") or "")
        if tag == "tr" and self._table:
            self.rows[self._table[-1]] = self.rows.get(self._table[-1], 0) + 1

    def handle_endtag(self, tag):
        if tag == "table" and self._table:
            self._table.pop()

    def find(self, tag):
        return [a for t, a in self.tags if t == tag]


def fake_run(root: Path, asset: str, psnr: float, glb: bool = True) -> Path:
    """A generate run's folder as the report reads it: inputs/rgba.png, fine/{result.json, renders,
    turntable.gif, mesh.glb}, coarse/result.json, metrics.json."""
    import imageio.v2 as imageio
    import trimesh

    run = root / "nerf4" / asset
    fine = run / "fine"
    (fine / "renders").mkdir(parents=True)
    (run / "inputs").mkdir()
    (run / "coarse").mkdir()
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[8:24, 8:24] = (200, 80, 40, 255)
    Image.fromarray(rgba).save(run / "inputs" / "rgba.png")
    Image.fromarray(rgba).save(fine / "renders" / "reference.png")
    imageio.mimsave(fine / "turntable.gif", [np.full((16, 16, 3), 60 * i, np.uint8) for i in range(3)])
    if glb:
        (fine / "mesh.glb").write_bytes(trimesh.creation.box().export(file_type="glb"))
    summary = {"seconds": 12.5, "it_per_s": 0.8, "peak_memory_gib": 1.25, "memory_kind": "process max RSS",
               "outputs_seconds": 100.0}
    for s, steps in (("coarse", 10), ("fine", 4)):
        (run / s / "result.json").write_text(json.dumps({"stage": s, "steps": steps, "summary": summary}))
    (run / "metrics.json").write_text(json.dumps(
        {"clip_similarity": 0.5, "psnr": psnr, "lpips": 0.3, "method": "magic123", "asset": asset,
         "dataset": "nerf4", "priors": "tiny random", "stage": "fine", "stage_dir": str(fine)}))
    return run


@pytest.fixture
def viewer_js(tmp_path, monkeypatch):
    js = tmp_path / "viewer" / VIEWER_FILE
    js.parent.mkdir()
    js.write_text("/* a stand-in for model-viewer */")
    monkeypatch.setenv("LIFT3D_MODEL_VIEWER_JS", str(js))
    return js


def build(tmp_path, glb_for=("chair", "drums")):
    res = tmp_path / "runs"
    for i, a in enumerate(("chair", "drums", "ficus")):
        fake_run(res, a, 10.0 + i, glb=a in glb_for)
    out = tmp_path / "report"
    written = write_report(res, out, failures=[{"asset": "mic", "step": "coarse", "reason": "boom"}])
    page = Path(written["html"])
    p = Page()
    p.feed(page.read_text())
    return out, page, p


def resolves(out: Path, src: str) -> bool:
    if src.startswith("data:"):
        return True
    target = (out / src).resolve()
    return target.is_file() and out.resolve() in target.parents


def test_html_report_structure(tmp_path, viewer_js):
    out, page, p = build(tmp_path)
    assert page == out / "report.html"
    assert p.rows["assets"] == 1 + 3  # header + one row per asset
    assert p.rows["papers"] == 1 + 3  # header + CLIP, PSNR, LPIPS (NeRF4 only: the one dataset with runs)
    text = page.read_text()
    assert "Magic123 [Magic123" in text and "(ours, tiny random priors" in text
    assert "boom" in text  # the failure is listed
    assert "coarse 12 s" in text  # stage seconds, formatted
    # a suspect transcription is struck out only in its own dataset (RealFusion's PSNR on RealFusion15)
    assert 'class="suspect"' not in text
    assert "0.80 it/s, outputs 100 s, peak 1.25 GiB RSS" in text
    imgs = [a["src"] for a in p.find("img")]
    assert sum("turntable.gif" in s for s in imgs) >= 3 and sum("photo.png" in s for s in imgs) == 3
    assert any(s.endswith("metrics_NeRF4.png") for s in imgs)
    for s in imgs:
        assert resolves(out, s), s
    viewers = p.find("model-viewer")
    assert len(viewers) == 2  # ficus has no GLB: its card shows the turntable there
    for v in viewers:
        assert v["src"].startswith("data:model/gltf-binary;base64,")
        assert resolves(out, v["poster"])
    scripts = [a["src"] for a in p.find("script")]
    assert scripts == [VIEWER_FILE] and (out / VIEWER_FILE).is_file()
    for a in p.find("a"):
        href = a.get("href", "")
        if href and not href.startswith("#"):
            assert resolves(out, href), href
    # nothing points outside the report folder: it can be moved or archived whole
    assert not re.search(r'(src|href|poster)="(/|\.\./|file:)', text)


def test_html_report_large_glb_is_linked(tmp_path, viewer_js):
    from core.evaluation import report_html

    res = tmp_path / "runs"
    fake_run(res, "chair", 12.0)
    out = tmp_path / "report"
    ours = __import__("core.evaluation.report", fromlist=["collect_metrics"]).collect_metrics(res)
    views = report_html.collect_assets(ours, out, embed_limit=10)
    assert views[0].glb_src == "assets/chair/mesh.glb" and resolves(out, views[0].glb_src)


def test_html_report_without_viewer_degrades_to_turntables(tmp_path, monkeypatch):
    monkeypatch.setenv("LIFT3D_MODEL_VIEWER_JS", "")
    out, page, p = build(tmp_path)
    assert p.find("model-viewer") == [] and p.find("script") == []
    assert not (out / VIEWER_FILE).exists()
    assert "install_model_viewer.py" in page.read_text()
    # each card still shows the mesh turning: the 3D cell falls back to the turntable
    assert sum("turntable.gif" in a["src"] for a in p.find("img")) == 6


def _screenshot_module():
    spec = importlib.util.spec_from_file_location("report_screenshot", ROOT / "scripts" / "report_screenshot.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_html_report_screenshot(tmp_path, monkeypatch):
    shot = _screenshot_module()
    if shot.find_chromium() is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    monkeypatch.setenv("LIFT3D_MODEL_VIEWER_JS", "")  # the page alone: no 3D to wait for
    out, page, _ = build(tmp_path)
    png = shot.screenshot(page, tmp_path / "shot.png", width=1000, height=1200, wait_ms=3000)
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[:2] == (1200, 1000)
    # a drawn page, not a blank one: dark text and the orange 'ours' column on white
    assert (img.mean(-1) < 100).mean() > 0.002
    assert ((img[..., 0] > 200) & (img[..., 1] > 220) & (img[..., 2] > 200)).mean() > 0.5
    orange = (img[..., 0] > 220) & (img[..., 1] > 90) & (img[..., 1] < 150) & (img[..., 2] < 80)
    assert orange.any()
