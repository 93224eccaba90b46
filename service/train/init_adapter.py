"""Start a run's LoRA modules from an existing adapter (`TrainSpec.init_adapter`).

A federated round starts every participant from the round's global adapter; a user may also
continue from a finished adapter with a fresh optimizer. The adapter is a PEFT folder
(`adapter_config.json` + `adapter_model.safetensors`; never pickle) on the machine that trains.

Its update per module is ΔW = s·B·A with s its own peft scaling (alpha/r, alpha patterns,
rsLoRA). The run's modules have their own scaling s' (from the spec's r and alpha), so B is
loaded as B·s/s': the run starts from exactly the adapter's ΔW whatever alpha either used — a
merged adapter written with scaling 1 (lora_alpha = r) loads into an alpha=32 run unchanged in
effect. Ranks and adapted modules must match the run's; anything else is refused by name.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from .errors import TrainError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}


class InitAdapterError(TrainError):
    """The adapter to start from cannot be loaded into this run's LoRA modules."""

    code = "invalid_init_adapter"


def _scaling(config: dict[str, Any], name: str, rank: int) -> float:
    """peft's scaling for module `name` of an adapter with this config."""
    alpha = float(config["lora_alpha"])
    pattern = config.get("alpha_pattern") or {}
    if pattern:
        from peft.utils.other import get_pattern_key

        alpha = float(pattern.get(get_pattern_key(pattern.keys(), name), alpha))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _read(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    cfg_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not cfg_path.is_file() or not weights_path.is_file():
        raise InitAdapterError(f"init_adapter {folder}: needs {CONFIG_FILE} and {WEIGHTS_FILE} "
                               "(safetensors only)")
    try:
        config = json.loads(cfg_path.read_text())
    except ValueError as exc:
        raise InitAdapterError(f"init_adapter {folder}: {CONFIG_FILE} is not JSON: {exc}") from None
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        raise InitAdapterError(f"init_adapter {folder}: only plain LoRA adapters can start a run "
                               f"(peft_type={config.get('peft_type')!r}, "
                               f"use_dora={config.get('use_dora')!r})")
    from safetensors.torch import load_file

    return config, load_file(str(weights_path))


def load_init_adapter(model: Any, path: str | Path) -> int:
    """Copy the adapter at `path` into peft `model`'s LoRA modules; returns how many modules."""
    from peft.tuners.lora import LoraLayer

    folder = Path(path)
    config, weights = _read(folder)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        for suffix, which in _SUFFIXES.items():
            if key.endswith(suffix):
                factors.setdefault(key[: -len(suffix)], {})[which] = tensor
                break
        else:
            raise InitAdapterError(f"init_adapter {folder}: tensor {key!r} is not a LoRA A/B "
                                   "factor of a linear layer; such adapters cannot start a run")
    layers = {name: m for name, m in model.named_modules()
              if isinstance(m, LoraLayer) and "default" in getattr(m, "lora_A", {})}
    missing, extra = sorted(set(layers) - set(factors)), sorted(set(factors) - set(layers))
    if missing or extra:
        raise InitAdapterError(
            f"init_adapter {folder}: its modules differ from this run's (lora.target_modules): "
            f"{len(missing)} missing (e.g. {missing[:2]}), {len(extra)} extra (e.g. {extra[:2]})")
    with torch.no_grad():
        for name, layer in layers.items():
            pair = factors[name]
            if set(pair) != {"A", "B"}:
                raise InitAdapterError(f"init_adapter {folder}: module {name!r} lacks its "
                                       f"lora_{'B' if 'A' in pair else 'A'} factor")
            A_dst, B_dst = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            A, B = pair["A"], pair["B"]
            if A.shape != A_dst.shape or B.shape != B_dst.shape:
                raise InitAdapterError(
                    f"init_adapter {folder}: module {name!r} has A {tuple(A.shape)}, B "
                    f"{tuple(B.shape)} but this run's are {tuple(A_dst.shape)}, "
                    f"{tuple(B_dst.shape)} (lora.r must match the adapter's rank)")
            rank = A.shape[0]
            ratio = _scaling(config, name.removeprefix(PEFT_PREFIX), rank) / layer.scaling["default"]
            A_dst.copy_(A.to(A_dst.dtype))
            B_dst.copy_((B.double() * ratio).to(B_dst.dtype))
    return len(layers)
