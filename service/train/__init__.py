"""lorapool's trainer as a library: QLoRA fine-tuning with no Ray, HTTP or database inside.

    from lorapool.service.train import TrainSpec, train
    result = train(TrainSpec(base_model="/models/llama"), "data.jsonl", "out/")

The names below are imported lazily (PEP 562): `from lorapool.service.train.spec import ...`
or `...errors` must not pull in torch, transformers and datasets for the API process that only
validates a spec.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "TrainSpec": "spec",
    "FastSpec": "spec",
    "LoraSpec": "spec",
    "DeviceInfo": "spec",
    "MemoryBudget": "spec",
    "SplitSpec": "spec",
    "TrainError": "errors",
    "DataError": "errors",
    "LineError": "errors",
    "ModelLoadError": "errors",
    "NonFiniteLossError": "errors",
    "OutOfMemoryError": "errors",
    "TrainEvent": "events",
    "TrainResult": "events",
    "train": "loop",
    "Trainer": "loop",
    "load_base_model": "model",
    "resolve_base_model": "model",
    "attach_lora": "model",
    "build_model": "model",
    "BuiltModel": "model",
    "token_loss_sum": "loss",
    "RunState": "runstate",
    "validate_dataset": "data",
    "build_dataset": "data",
    "estimate_memory": "memory",
    "evaluate": "evaluation",
    "MemoryEstimate": "memory",
}

__all__ = [
    "BuiltModel",
    "DataError",
    "DeviceInfo",
    "FastSpec",
    "LineError",
    "LoraSpec",
    "MemoryBudget",
    "SplitSpec",
    "MemoryEstimate",
    "ModelLoadError",
    "NonFiniteLossError",
    "OutOfMemoryError",
    "RunState",
    "TrainError",
    "TrainEvent",
    "TrainResult",
    "TrainSpec",
    "Trainer",
    "attach_lora",
    "build_dataset",
    "build_model",
    "estimate_memory",
    "evaluate",
    "load_base_model",
    "resolve_base_model",
    "token_loss_sum",
    "train",
    "validate_dataset",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from .data import build_dataset, validate_dataset
    from .errors import (
        DataError,
        LineError,
        ModelLoadError,
        NonFiniteLossError,
        OutOfMemoryError,
        TrainError,
    )
    from .evaluation import evaluate
    from .events import TrainEvent, TrainResult
    from .loop import Trainer, train
    from .loss import token_loss_sum
    from .memory import MemoryEstimate, estimate_memory
    from .model import BuiltModel, attach_lora, build_model, load_base_model, resolve_base_model
    from .runstate import RunState
    from .spec import DeviceInfo, FastSpec, LoraSpec, MemoryBudget, SplitSpec, TrainSpec
