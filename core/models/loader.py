"""Loading pretrained models: one loader for a hub id or a local folder in the same format.

Every prior enters through the ordinary `from_pretrained` of diffusers / transformers (DESIGN.md,
"Pretrained models"); nothing is hand-rolled and nothing is fetched at import time. A model name is
either

* a local folder laid out like the hub repository (`unet/`, `vae/`, `tokenizer/`, …), or
* a hub id (`runwayml/stable-diffusion-v1-5`), looked up in `params.models.cache_dir` (or the
  default hub cache) and, unless offline, downloaded there.

Offline mode (`params.models.offline: true` or `HF_HUB_OFFLINE=1`) never touches the network. A
model that cannot be found raises `ModelNotFoundError` with one message naming the model and how to
provide it. Tests use the very same function with folders written by `core.testmodels`; which folder a
params set names is decided in one place, `core.models.sources`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

from core.errors import ModelNotFoundError

log = logging.getLogger(__name__)

_TRUE = {"1", "true", "yes", "on"}


def hub_offline(models_params: Any = None) -> bool:
    """True when nothing may be downloaded: params.models.offline or HF_HUB_OFFLINE=1."""
    if models_params is not None and getattr(models_params, "offline", False):
        return True
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1) or Path(name).expanduser().exists()


def missing_model_message(name: str, key: str, cache_dir: Optional[str], offline: bool, detail: str = "") -> str:
    where = f"the model cache {cache_dir}" if cache_dir else "the Hugging Face cache (HF_HOME / ~/.cache/huggingface)"
    mode = " (offline mode: nothing is downloaded)" if offline else ""
    why = f" [{detail}]" if detail else ""
    return (
        f"model '{name}' ({key}) is neither a local folder nor in {where}{mode}{why}. "
        f"Provide it by downloading it into the cache (e.g. `huggingface-cli download {name}"
        f"{' --cache-dir ' + cache_dir if cache_dir else ''}` on a machine with internet) or by passing a "
        f"local folder in the same format with --set {key}=PATH"
    )


def load_pretrained(
    cls: Any,
    name: str,
    *,
    subfolder: Optional[str] = None,
    key: str = "model",
    models_params: Any = None,
    **kwargs: Any,
):
    """`cls.from_pretrained(name, subfolder=…)` for a hub id or a local folder.

    `cls` is any diffusers / transformers class with `from_pretrained` (UNet2DConditionModel,
    AutoencoderKL, CLIPTextModel, CLIPTokenizer, DDPMScheduler, …). `key` is the params key that
    names the model (e.g. 'sd.model'), used in the error message. `models_params` is
    params.models (cache_dir, offline). Extra kwargs go to from_pretrained (torch_dtype, …).
    """
    cache_dir = getattr(models_params, "cache_dir", None) if models_params is not None else None
    offline = hub_offline(models_params)
    local = Path(name).expanduser()
    if local.is_dir():
        target = local / subfolder if subfolder else local
        if not target.exists():
            raise ModelNotFoundError(
                f"model folder '{name}' ({key}) has no '{subfolder}' part: it must be laid out like the hub "
                f"repository (unet/, vae/, …); pass such a folder with --set {key}=PATH"
            )
        src, extra = str(local), {}
    elif _looks_like_path(name):
        raise ModelNotFoundError(
            f"model folder '{name}' ({key}) does not exist: pass an existing local folder with --set {key}=PATH "
            f"or a hub id that is in the cache"
        )
    else:
        src = name
        extra = {"local_files_only": offline}
        if cache_dir:
            extra["cache_dir"] = str(Path(cache_dir).expanduser())
    if subfolder:
        extra["subfolder"] = subfolder
    try:
        obj = cls.from_pretrained(src, **extra, **kwargs)
    except ModelNotFoundError:
        raise
    except (OSError, ValueError, EnvironmentError) as e:  # hub / file errors all derive from these
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ModelNotFoundError(missing_model_message(name, key, cache_dir, offline, first)) from None
    except Exception as e:  # network errors of requests/httpx that are not OSErrors
        if type(e).__module__.split(".")[0] in {"requests", "httpx", "huggingface_hub", "urllib3"}:
            raise ModelNotFoundError(missing_model_message(name, key, cache_dir, offline, type(e).__name__)) from None
        raise
    log.debug("loaded %s%s from %s", cls.__name__, f"/{subfolder}" if subfolder else "", name)
    return obj
