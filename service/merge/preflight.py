"""Cheap checks of a merge request from adapter headers alone, before any tensor is loaded.

The service runs merges as pool tasks; this lets it refuse up front, with a 4xx, what
`merge_adapters` would refuse anyway: bad parameters, adapters of different base models,
other target modules, other shapes, unequal ranks for the methods that need equal ones,
weights that do not fit. It reads only `adapter_config.json`, `lorapool.json` and the
safetensors header (a few kilobytes at the front of the weights file), never the tensors.

`merge_adapters` repeats every check on the real tensors when it runs; this module narrows
what can fail late, it does not replace those checks.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Optional

from . import methods as M
from .adapter_io import PEFT_PREFIX, _check_config, _pattern_value, _split_key
from .errors import MergeError
from .merge import _check_params

# A safetensors header is JSON of tensor names, dtypes, shapes and offsets: kilobytes for an
# adapter. A larger claim means a damaged or hostile file.
MAX_HEADER_BYTES = 64 * 1024 * 1024
# The first word of `_check_params` messages names the argument at fault.
_PARAM_PREFIXES = ("method", "adapters", "density", "majority_sign", "target_rank", "weights")


class MergeRequestError(MergeError):
    """A refused merge request; `param` names the argument at fault (None: the adapters)."""

    def __init__(self, message: str, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class AdapterHeader:
    """What preflight knows of one adapter: its config, its metadata and its tensor shapes."""

    label: str  # how messages name it (an adapter id in the service)
    config: dict[str, Any]
    metadata: dict[str, Any]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # tensor key → shape


def read_safetensors_shapes(fh: BinaryIO) -> dict[str, tuple[int, ...]]:
    """Tensor key → shape from a safetensors file's header (reads only the header)."""
    raw = fh.read(8)
    if len(raw) != 8:
        raise MergeError("the weights file is too short to be safetensors")
    size = int.from_bytes(raw, "little")
    if size <= 0 or size > MAX_HEADER_BYTES:
        raise MergeError(f"the weights file claims a {size}-byte safetensors header")
    try:
        header = json.loads(fh.read(size))
    except ValueError as exc:
        raise MergeError(f"the weights file's safetensors header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise MergeError("the weights file's safetensors header is not a JSON object")
    out: dict[str, tuple[int, ...]] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        shape = info.get("shape") if isinstance(info, dict) else None
        if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
            raise MergeError(f"the weights file's header has no shape for tensor {key!r}")
        out[key] = tuple(shape)
    return out


@dataclass
class _Module:
    rank: int
    shape: tuple[int, int]  # (out, in) of B·A
    embedding: bool


def _modules(h: AdapterHeader) -> dict[str, _Module]:
    """The LoRA modules an adapter's header describes, with the same rules as `load_adapter`."""
    _check_config(Path(h.label), h.config)
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    kinds: dict[str, bool] = {}
    for key, shape in h.shapes.items():
        parts = _split_key(key)
        if parts is None:
            if "lora_" in key:
                raise MergeError(f"{h.label}: unsupported LoRA tensor {key!r} (only lora_A/"
                                 "lora_B factors can be merged)")
            continue
        module, which, embedding = parts
        pairs.setdefault(module, {})[which] = shape
        kinds[module] = embedding
    if not pairs:
        raise MergeError(f"{h.label}: no LoRA tensors (lora_A/lora_B) in its weights")
    out: dict[str, _Module] = {}
    for key_module, pair in pairs.items():
        name = key_module[len(PEFT_PREFIX):] if key_module.startswith(PEFT_PREFIX) else key_module
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise MergeError(f"{h.label}: module {name!r} has no {missing} tensor")
        A, B = pair["A"], pair["B"]
        if len(A) != 2 or len(B) != 2:
            raise MergeError(f"{h.label}: module {name!r} has {len(A)}-d factors (only linear "
                             "and embedding layers can be merged)")
        if A[0] != B[1]:
            raise MergeError(f"{h.label}: module {name!r}: lora_A has rank {A[0]} but lora_B "
                             f"has rank {B[1]}")
        expected = int(_pattern_value(h.config.get("rank_pattern"), name, h.config["r"]))
        if A[0] != expected:
            raise MergeError(f"{h.label}: module {name!r} has rank {A[0]} but its "
                             f"adapter_config.json says r={expected}")
        out[name] = _Module(rank=int(A[0]), shape=(int(B[0]), int(A[1])),
                            embedding=kinds[key_module])
    return out


def _short(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{', …' if len(names) > limit else ''}]"


def _compatible(headers: Sequence[AdapterHeader], method: str) -> None:
    first = headers[0]
    for h in headers:
        if not h.metadata.get("base_model_sha256"):
            raise MergeError(f"{h.label}: its lorapool.json has no base_model_sha256, so it "
                             "cannot be checked to share a base model with the others")
    for h in headers[1:]:
        if h.metadata["base_model_sha256"] != first.metadata["base_model_sha256"]:
            raise MergeError(
                f"adapters are for different base models: {first.label} "
                f"({first.metadata.get('base_model')}, sha256 "
                f"{first.metadata['base_model_sha256'][:12]}…) vs {h.label} "
                f"({h.metadata.get('base_model')}, sha256 {h.metadata['base_model_sha256'][:12]}…)")
    mods = [_modules(h) for h in headers]
    needs_equal_ranks = method == "naive" or method in M.TASK_METHODS
    for h, m in zip(headers[1:], mods[1:]):
        names, ref = set(m), set(mods[0])
        if names != ref:
            parts = []
            if ref - names:
                parts.append(f"{first.label} adapts {_short(sorted(ref - names))} which "
                             f"{h.label} does not")
            if names - ref:
                parts.append(f"{h.label} adapts {_short(sorted(names - ref))} which "
                             f"{first.label} does not")
            raise MergeError("incompatible target modules: " + "; ".join(parts))
        for name, mod in m.items():
            r = mods[0][name]
            if mod.shape != r.shape or mod.embedding != r.embedding:
                raise MergeError(f"module {name!r}: {h.label} has shape {mod.shape} but "
                                 f"{first.label} has {r.shape}")
            if needs_equal_ranks and mod.rank != r.rank:
                hint = "exact or svd" if method == "naive" else f"exact, svd or {method}_svd"
                raise MergeRequestError(
                    f"method {method!r} needs equal ranks, but module {name!r} has rank "
                    f"{r.rank} in {first.label} and {mod.rank} in {h.label}; use {hint}",
                    param="method")


def _check_weights(headers: Sequence[AdapterHeader], weights: Optional[Sequence[float]],
                   normalize: bool) -> None:
    if weights is None:
        if not normalize:
            raise MergeRequestError("weights: normalize_weights=false needs explicit weights "
                                    "(raw sample counts are not merge coefficients)", "weights")
        for h in headers:
            n = h.metadata.get("n_examples")
            if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                raise MergeRequestError(
                    f"weights: {h.label} records no training-sample count (n_examples is "
                    f"{n!r}), and the default weights are those counts; pass weights",
                    "weights")
        return
    if len(weights) != len(headers):
        raise MergeRequestError(f"weights: {len(weights)} given for {len(headers)} adapters",
                                "weights")
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise MergeRequestError(f"weights[{i}]: must be a finite number, got {w!r}",
                                    f"weights[{i}]")
    if normalize and sum(weights) <= 0:
        raise MergeRequestError(f"weights: their sum must be positive to normalise them, got "
                                f"{sum(weights)}", "weights")


def check_merge_request(headers: Sequence[AdapterHeader], method: str, *,
                        weights: Optional[Sequence[float]] = None,
                        target_rank: Optional[int] = None, density: Optional[float] = None,
                        majority_sign: str = "total", normalize_weights: bool = True) -> None:
    """Raise `MergeRequestError` (with `param`) or `MergeError` (the adapters) when
    `merge_adapters(...)` with these arguments would refuse these adapters; else None."""
    try:
        _check_params(method, len(headers), target_rank, density, majority_sign)
    except MergeError as exc:
        prefix = str(exc).split(":", 1)[0]
        raise MergeRequestError(str(exc), prefix if prefix in _PARAM_PREFIXES else None) \
            from None
    labels = [h.label for h in headers]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise MergeRequestError(f"adapters: listed more than once: {dupes}", "adapters")
    _compatible(headers, method)
    _check_weights(headers, weights, normalize_weights)
