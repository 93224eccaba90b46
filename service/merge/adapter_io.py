"""Read and write lorapool adapter folders for merging: LoRA factors per module, safetensors only.

An adapter folder is what lorapool's trainer writes (see `lorapool.service.train.output`): a
PEFT folder (`adapter_config.json` + `adapter_model.safetensors`) plus `lorapool.json` (base model
id and sha256, `n_examples`, spec, metrics, job id). `load_adapter` turns it into one
`LoraModule` per adapted module, each with its factors and peft's scaling, so that the module's
update is exactly ΔW = scaling · B · A. It refuses, with the reason, anything whose update is not
that: other PEFT types, DoRA, LoRA biases, variants with their own forward, pickle (`.bin`)
weights, missing metadata.

Conventions: A has shape (r, in), B has shape (out, r); embeddings (peft's `lora_embedding_A/B`)
keep peft's layout, A (r, num_embeddings) and B (dim, r): every merge only combines B·A products
of the same module, so the frame is the same for all inputs and is written back unchanged.
Tensors are read as float32 (peft itself upcasts adapter weights to float32 when it loads them).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import MergeError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
METADATA_FILE = "lorapool.json"
PICKLE_FILES = ("adapter_model.bin", "pytorch_model.bin")
# peft's key prefix for a PeftModel's adapter state (task type or not).
PEFT_PREFIX = "base_model.model."

_LINEAR_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}
_EMBED_SUFFIXES = {".lora_embedding_A": "A", ".lora_embedding_B": "B"}

# Config switches whose adapters do not compute ΔW = scaling·B·A (or change the base weights at
# init), so averaging their factors or products would not mean what it says.
_REFUSED_FLAGS = {
    "use_dora": "DoRA adapters carry a magnitude vector; their update is not scaling·B·A",
    "lora_bias": "adapters with LoRA biases (lora_bias=true) add a bias term to B",
    "use_qalora": "QA-LoRA pools its input; its update is not scaling·B·A",
    "target_parameters": "adapters on nn.Parameter targets (target_parameters) are not supported",
    "use_bdlora": "BD-LoRA adapters are not supported",
    "arrow_config": "Arrow routing adapters are not supported",
    "kasa_config": "KaSA adapters are not supported",
    "monteclora_config": "MonteCLoRA adapters are not supported",
}
# init_lora_weights values that rewrite the base weights: the adapter only makes sense with them.
_BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq")


@dataclass
class LoraModule:
    """One adapted module: its update is `scaling * B @ A` (in peft's frame for that layer)."""

    name: str
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    embedding: bool = False

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the product B·A."""
        return int(self.B.shape[0]), int(self.A.shape[1])

    def delta(self) -> torch.Tensor:
        # Same operation order as peft's get_delta_weight: (B @ A) * scaling.
        return (self.B @ self.A) * self.scaling


@dataclass
class LoadedAdapter:
    """An adapter folder read for merging."""

    path: Path
    config: dict[str, Any]
    metadata: dict[str, Any]
    modules: dict[str, LoraModule]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # non-LoRA tensors, by key
    key_prefix: str = PEFT_PREFIX
    weights_sha256: str = ""

    @property
    def base_model(self) -> str | None:
        return self.metadata.get("base_model") or self.config.get("base_model_name_or_path")

    @property
    def base_model_sha256(self) -> str | None:
        return self.metadata.get("base_model_sha256")

    @property
    def n_examples(self) -> int | None:
        return self.metadata.get("n_examples")

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules.values())


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise MergeError(f"{path.parent}: no {path.name} ({what})") from None
    except (OSError, ValueError) as e:
        raise MergeError(f"{path}: unreadable {what}: {e}") from None
    if not isinstance(data, dict):
        raise MergeError(f"{path}: {what} must be a JSON object, got {type(data).__name__}")
    return data


def _pattern_value(pattern: dict[str, Any] | None, name: str, default: Any) -> Any:
    """peft's lookup of a per-module override (rank_pattern / alpha_pattern) for module `name`."""
    if not pattern:
        return default
    from peft.utils.other import get_pattern_key

    key = get_pattern_key(pattern.keys(), name)
    return pattern.get(key, default)


def lora_scaling(config: dict[str, Any], name: str, rank: int) -> float:
    """peft's scaling for module `name`: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    alpha = float(_pattern_value(config.get("alpha_pattern"), name, config["lora_alpha"]))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _check_config(path: Path, config: dict[str, Any]) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise MergeError(f"{path}: not a LoRA adapter (adapter_config.json peft_type={peft_type!r})")
    for flag, why in _REFUSED_FLAGS.items():
        if config.get(flag):
            raise MergeError(f"{path}: cannot merge: {why} ({flag}={config[flag]!r})")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_MUTATING_INITS):
        raise MergeError(
            f"{path}: cannot merge: init_lora_weights={init!r} changes the base weights; "
            "convert it to a plain LoRA adapter first")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise MergeError(f"{path}: adapter_config.json {key} must be a positive number, "
                             f"got {config.get(key)!r}")


def _split_key(key: str) -> tuple[str, str, bool] | None:
    """(module name, "A" | "B", is_embedding) for a LoRA factor key, else None."""
    for table, embedding in ((_LINEAR_SUFFIXES, False), (_EMBED_SUFFIXES, True)):
        for suffix, which in table.items():
            if key.endswith(suffix):
                return key[: -len(suffix)], which, embedding
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_adapter(path: str | Path) -> LoadedAdapter:
    """Read the adapter folder `path` (config, safetensors weights, `lorapool.json`).

    Raises `MergeError` naming the file, key or field when it is not a plain LoRA adapter that
    lorapool can merge (see the module docstring).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise MergeError(f"{path}: not an adapter folder (no such directory)")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        pickles = [p for p in PICKLE_FILES if (path / p).exists()]
        if pickles:
            raise MergeError(f"{path}: weights are a pickle file ({pickles[0]}); lorapool reads "
                             f"only safetensors ({WEIGHTS_FILE}) — pickle can run code on load")
        raise MergeError(f"{path}: no {WEIGHTS_FILE}")
    config = _read_json(path / CONFIG_FILE, "PEFT adapter config")
    _check_config(path, config)
    metadata = _read_json(path / METADATA_FILE, "lorapool adapter metadata")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise MergeError(f"{weights}: unreadable safetensors file: {e}") from None
    if not state:
        raise MergeError(f"{weights}: holds no tensors")

    factors: dict[str, dict[str, torch.Tensor]] = {}
    kinds: dict[str, bool] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        parts = _split_key(key)
        if parts is None:
            if "lora_" in key:  # a LoRA tensor of a variant: magnitude vector, bias, …
                raise MergeError(f"{path}: unsupported LoRA tensor {key!r} (only lora_A/lora_B "
                                 "factors can be merged)")
            extra[key] = tensor  # modules_to_save or a saved embedding base layer
            continue
        module, which, embedding = parts
        factors.setdefault(module, {})[which] = tensor
        kinds[module] = embedding

    prefixes = {PEFT_PREFIX if m.startswith(PEFT_PREFIX) else "" for m in factors}
    if len(prefixes) > 1:
        raise MergeError(f"{weights}: LoRA keys mix prefixes (some start with {PEFT_PREFIX!r})")
    prefix = prefixes.pop() if prefixes else PEFT_PREFIX

    modules: dict[str, LoraModule] = {}
    for key_module, pair in factors.items():
        name = key_module[len(prefix):]
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise MergeError(f"{path}: module {name!r} has no {missing} tensor")
        A, B = pair["A"], pair["B"]
        if A.dim() != 2 or B.dim() != 2:
            raise MergeError(f"{path}: module {name!r} has {A.dim()}-d factors (convolution "
                             "adapters are not supported; only linear and embedding layers)")
        if A.shape[0] != B.shape[1]:
            raise MergeError(f"{path}: module {name!r}: lora_A has rank {A.shape[0]} but lora_B "
                             f"has rank {B.shape[1]}")
        rank = int(A.shape[0])
        expected = int(_pattern_value(config.get("rank_pattern"), name, config["r"]))
        if rank != expected:
            raise MergeError(f"{path}: module {name!r} has rank {rank} but adapter_config.json "
                             f"says r={expected}")
        A32, B32 = A.float(), B.float()
        if not (torch.isfinite(A32).all() and torch.isfinite(B32).all()):
            raise MergeError(f"{path}: module {name!r} has non-finite values (NaN or inf)")
        modules[name] = LoraModule(name=name, A=A32, B=B32, scaling=lora_scaling(config, name, rank),
                                   embedding=kinds[key_module])
    if not modules:
        raise MergeError(f"{path}: no LoRA tensors (lora_A/lora_B) in {WEIGHTS_FILE}")
    return LoadedAdapter(path=path, config=config, metadata=metadata, modules=modules,
                         extra=extra, key_prefix=prefix, weights_sha256=_sha256(weights))


def adapter_state(modules: dict[str, tuple[torch.Tensor, torch.Tensor, bool]], *,
                  key_prefix: str = PEFT_PREFIX,
                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """peft's state-dict keys for `modules` = {name: (A, B, is_embedding)}."""
    state: dict[str, torch.Tensor] = {}
    for name, (A, B, embedding) in modules.items():
        suffix_a, suffix_b = ((".lora_embedding_A", ".lora_embedding_B") if embedding
                              else (".lora_A.weight", ".lora_B.weight"))
        state[f"{key_prefix}{name}{suffix_a}"] = A.detach().to("cpu", dtype).contiguous()
        state[f"{key_prefix}{name}{suffix_b}"] = B.detach().to("cpu", dtype).contiguous()
    return state


def save_adapter(dest: str | Path, *, config: dict[str, Any],
                 modules: dict[str, tuple[torch.Tensor, torch.Tensor, bool]],
                 metadata: dict[str, Any], extra: dict[str, torch.Tensor] | None = None,
                 key_prefix: str = PEFT_PREFIX, dtype: torch.dtype = torch.float32) -> Path:
    """Write a PEFT adapter folder plus `lorapool.json` to `dest`, all or nothing.

    `modules` maps module name → (A, B, is_embedding); `extra` holds non-LoRA tensors to carry
    over by key. `dest` must not exist or be an empty folder: a merge never overwrites an
    adapter. The files are written to a temporary sibling folder that is renamed into place, so
    a failure leaves nothing behind.
    """
    from safetensors.torch import save_file

    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise MergeError(f"output_dir {dest} already exists and is not empty")
    state = adapter_state(modules, key_prefix=key_prefix, dtype=dtype)
    for key, tensor in (extra or {}).items():
        state[key] = tensor.detach().to("cpu").contiguous()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    try:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str))
        if dest.exists():
            dest.rmdir()  # empty (checked above); rename needs the name free on every OS
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
