"""The run's product: a PEFT adapter folder plus `lorapool.json`, written atomically.

`output_dir/adapter/` holds `adapter_config.json` and `adapter_model.safetensors` exactly as peft
writes them (so `PeftModel.from_pretrained(base, folder)` loads it unchanged) and `lorapool.json`
with what the service records next to it: base model id and sha256, the spec, final metrics,
and the resolved fast-path plan (`"fast"`: which pieces ran, and why the others did not);
a run split over several devices adds `"split"` (its devices and decoder-layer ranges).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .checkpoint import atomic_dir, save_adapter_weights
from .spec import TrainSpec

METADATA_FILE = "lorapool.json"
ADAPTER_DIRNAME = "adapter"


def adapter_metadata(spec: TrainSpec, *, base_model_sha256: str, metrics: dict[str, Any],
                     n_examples: int, fast: dict[str, Any] | None = None,
                     split: dict[str, Any] | None = None) -> dict[str, Any]:
    meta = {
        "format": "lorapool-adapter/1",
        "base_model": spec.base_model_id or spec.base_model,
        "base_model_sha256": base_model_sha256,
        "spec": spec.model_dump(mode="json"),
        "metrics": metrics,
        "n_examples": n_examples,
        "fast": fast,  # the resolved fast-path plan the adapter was trained with
        "created_at": int(time.time()),
    }
    if split is not None:  # only a split run says so: one card's metadata stays as it was
        meta["split"] = split  # devices, decoder-layer ranges, predicted peaks (model_split.py)
    return meta


def save_adapter(model, dest: str | Path, spec: TrainSpec, *, base_model_sha256: str,
                 metrics: dict[str, Any], n_examples: int,
                 fast: dict[str, Any] | None = None,
                 split: dict[str, Any] | None = None) -> Path:
    """Write the adapter of peft `model` and its metadata to `dest` (atomically); returns `dest`."""
    dest = Path(dest)
    with atomic_dir(dest) as tmp:
        save_adapter_weights(model, tmp)
        # peft records the local path the base was loaded from; the id is what travels.
        cfg_path = tmp / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = spec.base_model_id or cfg.get("base_model_name_or_path")
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        meta = adapter_metadata(spec, base_model_sha256=base_model_sha256, metrics=metrics,
                                n_examples=n_examples, fast=fast, split=split)
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str))
    return dest


def read_metadata(adapter_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(adapter_dir) / METADATA_FILE).read_text())
