"""Loaded bases kept in memory, least recently used out, bounded by count and by bytes; and
the adapters attached to each (peft's `load_adapter` / `set_adapter`), bounded per base.

A base costs seconds to load and most of a node's memory; an adapter costs milliseconds and a
few MB. So a node keeps its bases and swaps adapters on them rather than loading a base per
adapter.
"""

from __future__ import annotations

import gc
import threading
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Optional

from .adapters import AdapterSource, check_adapter_folder

Loader = Callable[[], tuple[Any, Any]]  # () -> (model, tokenizer)


def model_bytes(model: Any) -> int:
    """Bytes of a model's parameters and buffers (packed 4-bit weights count as packed)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class LoadedBase:
    """One base in memory. `lock` serialises everything that touches its active adapter:
    attaching, selecting and generating."""

    key: str
    model: Any
    tokenizer: Any
    nbytes: int
    max_adapters: int = 8
    adapters: OrderedDict = field(default_factory=OrderedDict)  # adapter name → key
    lock: threading.RLock = field(default_factory=threading.RLock)

    def attach(self, adapter: AdapterSource) -> None:
        """Load `adapter` onto this base unless it is there already (call under `lock`)."""
        name = adapter.name
        if name in self.adapters:
            self.adapters.move_to_end(name)
            return
        folder = check_adapter_folder(adapter.folder)
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            self.model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
        else:
            self.model = PeftModel.from_pretrained(self.model, str(folder), adapter_name=name,
                                                   is_trainable=False)
            self.model.eval()
        self.adapters[name] = adapter.key
        while len(self.adapters) > self.max_adapters:
            old, _ = self.adapters.popitem(last=False)
            if self.model.active_adapter == old:  # never the one just loaded (it is newest)
                self.model.set_adapter(name)
            self.model.delete_adapter(old)

    def select(self, adapter: Optional[AdapterSource]) -> ContextManager:
        """A context in which the model runs with `adapter` (None: the bare base)."""
        from peft import PeftModel

        if adapter is None:
            return (self.model.disable_adapter() if isinstance(self.model, PeftModel)
                    else nullcontext())
        self.attach(adapter)
        self.model.set_adapter(adapter.name)
        return nullcontext()


class BaseCache:
    """{base key → LoadedBase}, at most `max_models` of them and, when `max_bytes` is set, at
    most that many bytes (the newest base always stays, even alone over the limit)."""

    def __init__(self, max_models: int = 2, max_bytes: Optional[int] = None,
                 max_adapters: int = 8) -> None:
        if max_models < 1:
            raise ValueError(f"max_models must be at least 1, got {max_models}")
        self.max_models = max_models
        self.max_bytes = max_bytes
        self.max_adapters = max_adapters
        self._bases: OrderedDict[str, LoadedBase] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self.loads = 0  # how many bases were loaded (tests, benches: cold vs warm)

    def get(self, key: str, load: Loader) -> LoadedBase:
        """The base for `key`, loaded with `load()` when it is not in memory."""
        with self._lock:
            entry = self._bases.get(key)
            if entry is not None:
                self._bases.move_to_end(key)
                return entry
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:  # one load per key at a time; others wait for it rather than load twice
            with self._lock:
                entry = self._bases.get(key)
                if entry is not None:
                    self._bases.move_to_end(key)
                    return entry
            model, tokenizer = load()
            entry = LoadedBase(key, model, tokenizer, model_bytes(model),
                               max_adapters=self.max_adapters)
            with self._lock:
                self._bases[key] = entry
                self.loads += 1
                self._loading.pop(key, None)
                evicted = self._evict()
        if evicted:
            del evicted
            gc.collect()
            _empty_cuda_cache()
        return entry

    def _evict(self) -> list[LoadedBase]:
        out = []
        while len(self._bases) > 1 and (
                len(self._bases) > self.max_models
                or (self.max_bytes is not None and self.total_bytes > self.max_bytes)):
            _, entry = self._bases.popitem(last=False)
            out.append(entry)
        return out

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self._bases.values())

    def keys(self) -> list[str]:
        """Loaded base keys, least recently used first."""
        with self._lock:
            return list(self._bases)

    def clear(self) -> None:
        with self._lock:
            self._bases.clear()
        gc.collect()
        _empty_cuda_cache()


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
