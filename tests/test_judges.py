"""The judges' models (CLIP, DPT, rembg, LPIPS) load through their real loaders from tiny models
saved on disk in their real formats; missing models give one ModelNotFoundError."""
import numpy as np
import pytest
import torch
from PIL import Image

from core.errors import ModelNotFoundError
from core.params import load_params
from core.testmodels.judges import ensure_tiny_judges


@pytest.fixture(scope="module")
def judges(tmp_path_factory):
    return ensure_tiny_judges(tmp_path_factory.mktemp("judges"))


def test_tiny_judges_are_cached_on_disk(judges):
    for p in (judges.dpt / "config.json", judges.dpt / "preprocessor_config.json", judges.clip_config,
              judges.clip_checkpoint, judges.rembg_onnx):
        assert p.is_file(), p
    stamp_time = judges.clip_checkpoint.stat().st_mtime_ns
    again = ensure_tiny_judges(judges.root)
    assert again == judges and judges.clip_checkpoint.stat().st_mtime_ns == stamp_time


def test_clip_loads_saved_weights_via_open_clip(judges):
    import open_clip

    from core.evaluation.clip import load_clip
    from core.stages.detector import ClipScorer

    clip = load_clip(str(judges.clip_config), str(judges.clip_checkpoint))
    saved = torch.load(judges.clip_checkpoint, weights_only=True)["state_dict"]
    for k, v in clip.model.state_dict().items():
        assert torch.equal(v.cpu(), saved[k]), k  # the checkpoint's weights, not a fresh random init
    fresh = open_clip.create_model(judges.clip_config.stem, pretrained=None)
    assert not torch.equal(fresh.state_dict()["text_projection"], saved["text_projection"])
    imgs = torch.rand(3, 3, 40, 50)
    e = clip.encode_images(imgs)
    assert e.shape == (3, 32) and torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    scorer = ClipScorer(clip, "a red apple")
    # eq. 5 by hand with the same encoders
    t = clip.encode_text(["a red apple"])[0]
    assert scorer(imgs) == pytest.approx(float((e @ t).mean()), abs=1e-5)


def test_clip_missing_weights_is_one_clear_error(tmp_path, monkeypatch):
    from core.evaluation.clip import load_clip

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="ViT-B-32.*laion2b_s34b_b79k"):
        load_clip("ViT-B-32", "laion2b_s34b_b79k", cache_dir=str(tmp_path), offline=True)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_clip("ViT-B-32", str(tmp_path / "nope.pt"))


def test_dpt_loads_via_from_pretrained_folder(judges):
    from transformers import DPTForDepthEstimation

    from core.inputs.depth import estimate_depth, load_depth_model
    from core.models.loader import load_pretrained

    params = load_params("smoke")
    model, processor = load_depth_model(str(judges.dpt), params.models)
    ref = load_pretrained(DPTForDepthEstimation, str(judges.dpt), key="depth.model")
    assert type(model.backbone).__name__ == "BeitBackbone"  # the default model's architecture
    for (k, v), (k2, v2) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    rgba = Image.new("RGBA", (48, 40), (255, 255, 255, 0))
    rgba.paste((200, 30, 30, 255), (10, 8, 30, 32))
    d = np.asarray(estimate_depth(rgba, model, processor))
    assert d.shape == (40, 48)
    fg = np.asarray(rgba.getchannel("A")) > 127
    assert d[~fg].max() == 0 and d[fg].min() == 0 and d[fg].max() == 255  # min–max over the mask


def test_dpt_missing_model_is_one_clear_error(tmp_path, monkeypatch):
    from core.inputs.depth import load_depth_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    params = load_params(None, {"models.cache_dir": str(tmp_path), "models.offline": True})
    with pytest.raises(ModelNotFoundError, match="Intel/dpt-beit-large-512"):
        load_depth_model("Intel/dpt-beit-large-512", params.models)


def test_rembg_custom_onnx_via_u2net_custom_session(judges):
    from core.inputs.segment import rembg_mask, rembg_session

    session = rembg_session(str(judges.rembg_onnx))
    assert type(session).__name__ == "U2netCustomSession"
    im = Image.new("RGB", (300, 200), (255, 255, 255))
    im.paste((30, 90, 200), (100, 50, 200, 150))
    m = np.asarray(rembg_mask(im, session))
    assert m.shape == (200, 300)
    assert m[60:140, 110:190].min() > 200 and m[:40].max() < 50  # the object, not the white


def test_rembg_missing_model_is_one_clear_error(tmp_path, monkeypatch):
    from core.inputs.segment import rembg_session

    monkeypatch.setenv("U2NET_HOME", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="'u2net'.*U2NET_HOME"):
        rembg_session("u2net", offline=True)
    with pytest.raises(ModelNotFoundError, match="no file"):
        rembg_session(str(tmp_path / "missing.onnx"))


def test_lpips_trunk_loads_from_torchvision_file(tmp_path):
    import torchvision

    from core.evaluation.evaluate import build_lpips, lpips_trunk_file

    torch.manual_seed(1)
    tv = torchvision.models.alexnet(weights=None)
    f = tmp_path / lpips_trunk_file("alex").name
    torch.save(tv.state_dict(), f)
    model = build_lpips("alex", trunk=f)
    assert torch.equal(model.net.slice1[0].weight, tv.features[0].weight)
    assert torch.equal(dict(model.net.slice5.named_children())["10"].weight, tv.features[10].weight)
    with pytest.raises(ModelNotFoundError, match="TORCH_HOME"):
        build_lpips("alex", trunk=tmp_path / "absent.pth")
