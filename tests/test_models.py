"""core.models.loader / core.testmodels.priors: tiny random priors saved with save_pretrained, loaded back through the
loader real hub ids use (a local folder, and a hub id resolved offline from a cache), and one clear
ModelNotFoundError for a missing model."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from core.errors import ModelNotFoundError
from core.guidance.sd import load_stable_diffusion
from core.guidance.zero123 import load_zero123
from core.models.loader import load_pretrained
from core.models.sources import prior_model as model_name
from core.params import load_params
from core.testmodels.priors import build_tiny_sd, build_tiny_zero123


@pytest.fixture(scope="module")
def fresh_tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return build_tiny_sd(root / "sd"), build_tiny_zero123(root / "zero123")


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


def test_tiny_models_load_from_local_folder(fresh_tiny):
    from diffusers import UNet2DConditionModel

    sd_dir, z_dir = fresh_tiny
    sd = load_stable_diffusion(str(sd_dir), "cpu", torch.float32)
    assert type(sd.unet).__name__ == "UNet2DConditionModel" and sd.unet.config.in_channels == 4
    assert type(sd.text_encoder).__name__ == "CLIPTextModel" and sd.text_encoder.config.hidden_size == 768
    assert type(sd.vae).__name__ == "AutoencoderKL" and 2 ** (len(sd.vae.config.block_out_channels) - 1) == 8
    ids = sd.tokenizer("a photo of a chair").input_ids
    assert ids[0] == sd.tokenizer.bos_token_id and ids[-1] == sd.tokenizer.eos_token_id and len(ids) > 3
    # the weights that come back are the saved ones, read by the plain diffusers class too
    direct = UNet2DConditionModel.from_pretrained(sd_dir / "unet")
    assert _same_weights(direct, sd.unet)

    z = load_zero123(str(z_dir), "cpu", torch.float32)
    assert z.unet.config.in_channels == 8 and z.unet.config.cross_attention_dim == 768
    assert type(z.image_encoder).__name__ == "CLIPVisionModelWithProjection"
    assert z.image_encoder.config.projection_dim == 768
    assert tuple(z.cc_projection.projection.weight.shape) == (768, 768 + 4)


def test_hub_id_resolves_offline_from_cache(fresh_tiny, tmp_path, monkeypatch):
    """A hub id in a hub-layout cache folder loads with HF_HUB_OFFLINE=1 (what a shared cache is)."""
    sd_dir, _ = fresh_tiny
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--lift3d-test--tiny-sd"
    shutil.copytree(sd_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    params = load_params("smoke", {"models.cache_dir": str(cache), "models.tiny": False})
    parts = load_stable_diffusion("lift3d-test/tiny-sd", "cpu", torch.float32, params.models)
    local = load_stable_diffusion(str(sd_dir), "cpu", torch.float32)
    assert _same_weights(parts.unet, local.unet) and _same_weights(parts.text_encoder, local.text_encoder)


def test_missing_hub_model_names_it(tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    params = load_params("magic123", {"models.cache_dir": str(tmp_path)})
    with pytest.raises(ModelNotFoundError) as e:
        load_pretrained(UNet2DConditionModel, "runwayml/stable-diffusion-v1-5", subfolder="unet", key="sd.model",
                        models_params=params.models)
    msg = str(e.value)
    assert "runwayml/stable-diffusion-v1-5" in msg and "--set sd.model=PATH" in msg and str(tmp_path) in msg
    assert "\n" not in msg
    with pytest.raises(ModelNotFoundError, match="nobody/zero123"):
        load_zero123("nobody/zero123", "cpu", torch.float32, params.models)


def test_missing_local_folder(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_stable_diffusion(str(tmp_path / "no" / "such" / "model"), "cpu", torch.float32)
    (tmp_path / "half").mkdir()
    with pytest.raises(ModelNotFoundError, match="'unet'|'tokenizer'"):
        load_stable_diffusion(str(tmp_path / "half"), "cpu", torch.float32)


def test_zero123_loader_rejects_a_plain_sd_unet(fresh_tiny, tmp_path):
    sd_dir, z_dir = fresh_tiny
    mixed = tmp_path / "mixed"
    shutil.copytree(z_dir, mixed)
    shutil.rmtree(mixed / "unet")
    shutil.copytree(sd_dir / "unet", mixed / "unet")
    with pytest.raises(ModelNotFoundError, match="not a Zero-1-to-3 UNet"):
        load_zero123(str(mixed), "cpu", torch.float32)


def test_tiny_flag_points_the_factory_at_tiny_models(tmp_path, monkeypatch):
    monkeypatch.setenv("LIFT3D_TINY_DIR", str(tmp_path))
    p = load_params("smoke")
    assert p.models.tiny
    sd, z = model_name(p, "sd"), model_name(p, "zero123")
    assert Path(sd).parent == tmp_path and (Path(z) / "cc_projection").is_dir()
    assert model_name(load_params("magic123"), "sd") == "runwayml/stable-diffusion-v1-5"


class _Recorder:
    """A `from_pretrained` class that records how the loader called it (what a hub class is given)
    and finds nothing, as transformers does for a missing model."""

    calls: list = []

    @classmethod
    def from_pretrained(cls, name, **kwargs):
        cls.calls.append(kwargs)
        raise OSError(f"{name} is not in the cache")


@pytest.fixture()
def hub_probe(monkeypatch):
    """The hub check with a given answer (the network is never asked); counts the probes."""
    import core.models.loader as loader

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(loader, "_hub_answer", None)
    probes = []

    def answer(reachable: bool):
        monkeypatch.setattr(loader, "probe_hub", lambda: probes.append(reachable) or reachable)
        return probes

    _Recorder.calls = []
    return answer


def test_unreachable_hub_loads_from_the_cache_only(hub_probe, fresh_tiny, tmp_path):
    from transformers import CLIPTextModel

    probes = hub_probe(False)
    for _ in range(2):
        with pytest.raises(ModelNotFoundError, match="nobody/nothing-here.*unreachable"):
            load_pretrained(_Recorder, "nobody/nothing-here", key="sd.model")
    assert [c["local_files_only"] for c in _Recorder.calls] == [True, True]
    assert probes == [False]  # asked once per process
    # a real class: a hub id missing from the cache fails at once, one found in it loads
    with pytest.raises(ModelNotFoundError, match="unreachable"):
        load_pretrained(CLIPTextModel, "nobody/nothing-here", subfolder="text_encoder", key="sd.model")
    sd_dir, _ = fresh_tiny
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--lift3d-test--tiny-sd"
    shutil.copytree(sd_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    params = load_params("smoke", {"models.cache_dir": str(tmp_path / "hub"), "models.tiny": False})
    te = load_pretrained(CLIPTextModel, "lift3d-test/tiny-sd", subfolder="text_encoder", models_params=params.models)
    assert te.config.hidden_size == 768 and probes == [False]


def test_reachable_hub_may_download(hub_probe):
    probes = hub_probe(True)
    with pytest.raises(ModelNotFoundError) as e:
        load_pretrained(_Recorder, "nobody/nothing-here", key="sd.model")
    assert "unreachable" not in str(e.value) and _Recorder.calls[0]["local_files_only"] is False
    assert probes == [True]


def test_offline_mode_never_probes(hub_probe, monkeypatch):
    probes = hub_probe(True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="offline mode"):
        load_pretrained(_Recorder, "nobody/nothing-here", key="sd.model")
    assert probes == [] and _Recorder.calls[0]["local_files_only"] is True


def test_probe_of_a_closed_endpoint_is_quick(monkeypatch):
    """The real probe, pointed at a local port nobody listens on (no traffic leaves the machine)."""
    import socket
    import time

    from huggingface_hub import constants

    import core.models.loader as loader

    with socket.socket() as s:  # a free local port, closed again
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    t = time.perf_counter()
    assert loader.probe_hub() is False
    assert time.perf_counter() - t < loader.HUB_PROBE_TIMEOUT + 1
