"""Loading pretrained models: one loader for a hub id or a local folder in the same format.

Every prior enters through the ordinary `from_pretrained` of diffusers / transformers (DESIGN.md,
"Pretrained models"); nothing is hand-rolled and nothing is fetched at import time. A model name is
either

* a local folder laid out like the hub repository (`unet/`, `vae/`, `tokenizer/`, …), or
* a hub id (`runwayml/stable-diffusion-v1-5`), looked up in `params.models.cache_dir` (or the
  default hub cache) and, unless offline, downloaded there.

Offline mode (`params.models.offline: true` or `HF_HUB_OFFLINE=1`) never touches the network.
Otherwise the hub is asked once per process whether it answers (`hub_reachable`, a HEAD request of
`HUB_PROBE_TIMEOUT` seconds); when it does not, models are looked up in the cache only, so that a
missing one is reported at once instead of after minutes of download retries. A model that cannot
be found raises `ModelNotFoundError` with one message naming the model and how to provide it.
Tests use the very same function with folders written by `core.testmodels`; which folder a params
set names is decided in one place, `core.models.sources`.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Optional

from core.errors import ModelNotFoundError

log = logging.getLogger(__name__)

_TRUE = {"1", "true", "yes", "on"}
HUB_PROBE_TIMEOUT = 2.0  # seconds
_hub_lock = threading.Lock()
_hub_answer: Optional[bool] = None  # hub_reachable's answer, once asked


def hub_offline(models_params: Any = None) -> bool:
    """True when nothing may be downloaded: params.models.offline or HF_HUB_OFFLINE=1."""
    if models_params is not None and getattr(models_params, "offline", False):
        return True
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def probe_hub(timeout: float = HUB_PROBE_TIMEOUT) -> bool:
    """Whether the hub endpoint answers a HEAD request (any HTTP status) within `timeout` seconds,
    through huggingface_hub's own HTTP session (its proxies and certificates). A name lookup that
    hangs counts as no answer: the request runs in a thread that is waited for at most `timeout`."""
    from huggingface_hub.utils import get_session

    answer: list[bool] = []

    def ask() -> None:
        try:
            get_session().head(hub_endpoint(), timeout=timeout)
            answer.append(True)
        except Exception:  # noqa: BLE001 - any failure to get a response means unreachable
            answer.append(False)

    t = threading.Thread(target=ask, name="lift3d-hub-probe", daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(answer and answer[0])


def hub_reachable() -> bool:
    """`probe_hub()`, asked once per process (the answer is kept); logged once when the hub is down."""
    global _hub_answer
    with _hub_lock:
        if _hub_answer is None:
            _hub_answer = probe_hub()
            if not _hub_answer:
                log.warning("the model hub %s is unreachable (no answer within %.0f s): models are looked up in "
                            "the local cache only (models.offline=true or HF_HUB_OFFLINE=1 skips this check)",
                            hub_endpoint(), HUB_PROBE_TIMEOUT)
        return _hub_answer


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1) or Path(name).expanduser().exists()


def missing_model_message(name: str, key: str, cache_dir: Optional[str], offline: bool, detail: str = "",
                          unreachable: bool = False) -> str:
    where = f"the model cache {cache_dir}" if cache_dir else "the Hugging Face cache (HF_HOME / ~/.cache/huggingface)"
    mode = (" (offline mode: nothing is downloaded)" if offline else
            f" (the hub {hub_endpoint()} was unreachable: nothing is downloaded)" if unreachable else "")
    why = f" [{detail}]" if detail else ""
    return (
        f"model '{name}' ({key}) is neither a local folder nor in {where}{mode}{why}. "
        f"Provide it by downloading it into the cache (e.g. `huggingface-cli download {name}"
        f"{' --cache-dir ' + cache_dir if cache_dir else ''}` on a machine with internet) or by passing a "
        f"local folder in the same format with --set {key}=PATH"
    )


def lift3d_class(cls: Any, folder: Path, subfolder: Optional[str]) -> Any:
    """The class to load `folder/subfolder` with: `cls`, unless the folder's model_index.json names
    one of lift3d's own classes (a module of the `core` package) for that part — as diffusers'
    pipelines read model_index.json. This is how a folder of analytic priors
    (core.testmodels.analytic) puts its UNet where the real UNet goes; hub ids and other folders
    load with `cls` as always."""
    index = folder / "model_index.json"
    if not subfolder or not index.is_file():
        return cls
    try:
        entry = json.loads(index.read_text()).get(subfolder)
    except (OSError, ValueError):
        return cls
    if not (isinstance(entry, list) and len(entry) == 2 and str(entry[0]).split(".")[0] == "core"
            and entry[1] != cls.__name__):
        return cls
    import importlib

    named = getattr(importlib.import_module(entry[0]), entry[1], None)
    if named is None or not hasattr(named, "from_pretrained"):
        raise ModelNotFoundError(f"model folder '{folder}': model_index.json names {entry[0]}.{entry[1]} for "
                                 f"'{subfolder}', which lift3d does not have")
    log.info("%s/%s: loading lift3d's %s (model_index.json) where a %s goes", folder.name, subfolder,
             entry[1], cls.__name__)
    return named


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
    unreachable = False
    local = Path(name).expanduser()
    if local.is_dir():
        target = local / subfolder if subfolder else local
        if not target.exists():
            raise ModelNotFoundError(
                f"model folder '{name}' ({key}) has no '{subfolder}' part: it must be laid out like the hub "
                f"repository (unet/, vae/, …); pass such a folder with --set {key}=PATH"
            )
        src, extra = str(local), {}
        cls = lift3d_class(cls, local, subfolder)
    elif _looks_like_path(name):
        raise ModelNotFoundError(
            f"model folder '{name}' ({key}) does not exist: pass an existing local folder with --set {key}=PATH "
            f"or a hub id that is in the cache"
        )
    else:
        src = name
        unreachable = not offline and not hub_reachable()
        extra = {"local_files_only": offline or unreachable}
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
        raise ModelNotFoundError(missing_model_message(name, key, cache_dir, offline, first, unreachable)) from None
    except Exception as e:  # network errors of requests/httpx that are not OSErrors
        if type(e).__module__.split(".")[0] in {"requests", "httpx", "huggingface_hub", "urllib3"}:
            raise ModelNotFoundError(missing_model_message(name, key, cache_dir, offline, type(e).__name__,
                                                           unreachable)) from None
        raise
    log.debug("loaded %s%s from %s", cls.__name__, f"/{subfolder}" if subfolder else "", name)
    return obj
