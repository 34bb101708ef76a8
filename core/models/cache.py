"""The priors of this process, loaded once and reused by every asset that runs here.

A benchmark or `generate-many` runs many assets in one process (or one Dask worker per GPU); each
asset's textual inversion, coarse and fine steps build the same Stable Diffusion and Zero-1-to-3.
Loading them is seconds per prior at full size, so they are kept here, keyed by what decides the
loaded weights: the model's folder or hub id, the dtype, the device (and the model cache folder).
Plain Python, no orchestration: a worker reuses them because it is the same process.

What a caller may change stays its own: `core.guidance.factory` hands out a new parts object per
use, with its own copy of the tokenizer and text encoder (textual inversion and a learned token
change them); the UNets, VAEs, image encoder and schedulers are shared read-only.

`LIFT3D_PRIOR_CACHE=0` turns the cache off (every use loads afresh); `LIFT3D_PRIOR_CACHE=N` keeps at
most N models (default 4: two priors in two precisions, say), the least recently used going first.
`stats()` counts loads and reuses in this process: how often the priors were loaded.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Hashable

log = logging.getLogger(__name__)

DEFAULT_ENTRIES = 4


def _capacity() -> int:
    raw = os.environ.get("LIFT3D_PRIOR_CACHE", "").strip().lower()
    if raw in ("", "1", "on", "true", "yes"):
        return DEFAULT_ENTRIES
    if raw in ("0", "off", "false", "no"):
        return 0
    try:
        return max(0, int(raw))
    except ValueError:
        return DEFAULT_ENTRIES


class ModelCache:
    """A small LRU of loaded models with counts of loads and reuses (thread-safe: one lock per
    key, so two threads asking for the same model load it once)."""

    def __init__(self, capacity: int | None = None):
        self._capacity = capacity
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[Hashable, threading.Lock] = {}
        self.loads: dict[str, int] = {}
        self.reuses: dict[str, int] = {}
        self.load_seconds: dict[str, float] = {}

    @property
    def capacity(self) -> int:
        return _capacity() if self._capacity is None else self._capacity

    def get(self, key: Hashable, load: Callable[[], Any], label: str | None = None) -> Any:
        """The model under `key`, loading it with `load()` when it is not here. `label` names it in
        the counts (default: str(key))."""
        label = label or str(key)
        if self.capacity == 0:
            return self._load(label, load)
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._items:
                    self._items.move_to_end(key)
                    self.reuses[label] = self.reuses.get(label, 0) + 1
                    return self._items[key]
            value = self._load(label, load)
            with self._lock:
                self._items[key] = value
                while len(self._items) > self.capacity:
                    old, _ = self._items.popitem(last=False)
                    log.info("prior cache: dropped %s (holds at most %d)", old, self.capacity)
            return value

    def _load(self, label: str, load: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        value = load()
        dt = time.perf_counter() - t0
        with self._lock:
            self.loads[label] = self.loads.get(label, 0) + 1
            self.load_seconds[label] = self.load_seconds.get(label, 0.0) + dt
        log.info("prior cache: loaded %s in %.1f s (load %d of it in this process)", label, dt, self.loads[label])
        return value

    def stats(self) -> dict:
        """{"loads": n, "reuses": n, "load_seconds": s, "by_model": {label: {"loads", "reuses"}}}."""
        with self._lock:
            labels = sorted(set(self.loads) | set(self.reuses))
            return {
                "loads": sum(self.loads.values()),
                "reuses": sum(self.reuses.values()),
                "load_seconds": round(sum(self.load_seconds.values()), 3),
                "by_model": {k: {"loads": self.loads.get(k, 0), "reuses": self.reuses.get(k, 0)} for k in labels},
            }

    def clear(self) -> None:
        """Forget the models and the counts."""
        with self._lock:
            self._items.clear()
            self._key_locks.clear()
            self.loads.clear()
            self.reuses.clear()
            self.load_seconds.clear()


PRIORS = ModelCache()  # the priors of this process (core.guidance.factory)


def prior_stats() -> dict:
    return PRIORS.stats()
