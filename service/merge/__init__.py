"""Adapter arithmetic: merge LoRA adapters of one base model into one PEFT adapter (pure library).

No Ray, no server, no database: folders in, a folder out. See `merge.merge_adapters` for the
entry point, `methods.METHODS` for what each method does and `adapter_io` for the folder format.
"""

from .adapter_io import LoadedAdapter, LoraModule, load_adapter, save_adapter
from .errors import MergeError
from .merge import MergeResult, merge_adapters
from .methods import METHODS

__all__ = [
    "METHODS",
    "LoadedAdapter",
    "LoraModule",
    "MergeError",
    "MergeResult",
    "load_adapter",
    "merge_adapters",
    "save_adapter",
]
