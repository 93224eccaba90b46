"""Base models in Ray's object store, put there once and shared by every job and task.

A base model is the largest thing a job needs (hundreds of MB to GBs). The scheduler and the
merge/evaluation task loop both ship models to nodes; they share one `ModelObjects`, so a model
is read from the head's disk and put into the object store once, and the least recently used
ones are let go beyond `max_models` (objects still referenced by a starting job stay alive in
Ray until that job has them).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import ray

from .transfer import read_folder


class ModelObjects:
    """{model sha256 → {relative path: ObjectRef}}, least recently used first out."""

    def __init__(self, max_models: int = 4) -> None:
        if max_models < 1:
            raise ValueError(f"max_models must be at least 1, got {max_models}")
        self.max_models = max_models
        self._refs: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def payload(self, model: Any) -> dict[str, Any]:
        """What a runner or task receives for a registered model (`.path`, `.sha256`): its
        content id, its files as ObjectRefs, and the file to open when it is a single .gguf."""
        path = Path(model.path)
        with self._lock:
            refs = self._refs.get(model.sha256)
            if refs is None:
                refs = {name: ray.put(data) for name, data in read_folder(path).items()}
                self._refs[model.sha256] = refs
                while len(self._refs) > self.max_models:
                    self._refs.popitem(last=False)
            self._refs.move_to_end(model.sha256)
        return {"key": model.sha256, "files": refs,
                "entry": path.name if path.is_file() else None}

    def __len__(self) -> int:
        return len(self._refs)
