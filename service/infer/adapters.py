"""Adapter folders this library loads: a PEFT folder with safetensors weights, never pickle."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import AdapterRefused

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
# Files torch.load would unpickle: their presence alone refuses the folder, so that no code
# path (peft's own fallbacks included) can ever open one.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@dataclass(frozen=True)
class AdapterSource:
    """An adapter to attach: `key` identifies its content (same key, same weights), `folder`
    is a PEFT folder on this machine."""

    key: str
    folder: Path

    @property
    def name(self) -> str:
        # peft uses the adapter name as a module-dict key: no dots.
        return "a_" + re.sub(r"[^0-9A-Za-z_]", "_", self.key)


def check_adapter_folder(folder: str | Path) -> Path:
    """`folder` if it is a loadable safetensors PEFT folder, else `AdapterRefused`."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file():
        raise AdapterRefused(f"the adapter has no {CONFIG}", param="model")
    if not (folder / WEIGHTS).is_file():
        raise AdapterRefused(f"the adapter has no {WEIGHTS} (only safetensors adapters are "
                             "loaded)", param="model")
    pickles = [p.name for p in folder.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        raise AdapterRefused(f"the adapter holds pickle files ({', '.join(sorted(pickles))}); "
                             "only safetensors adapters are loaded", param="model")
    return folder
