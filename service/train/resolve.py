"""The one place each trainer-wide default is decided: IGNORE_INDEX, compute dtype, cache folder.

Torch-free on purpose: the scheduler's memory estimate (memory.py) and the data renderer import
this module in processes that never load torch. The torch side (model.py's
`select_compute_dtype`) maps the name chosen here to a `torch.dtype` and adds the one check that
needs a live GPU (bf16 asked on a card without bf16 units).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

# The label of a token that carries no loss (PyTorch's cross-entropy default, and what
# transformers' data collators use).
IGNORE_INDEX = -100

DtypeName = Literal["bf16", "fp16", "fp32"]
CacheKind = Literal["models", "datasets"]


def resolve_dtype_name(requested: str, *, device_kind: str, bf16_ok: bool) -> DtypeName:
    """"bf16" / "fp16" / "fp32" for a spec's `compute_dtype` on a device.

    An explicit choice wins (whether the card can run it is the loader's check). "auto" means
    fp32 on the CPU (bf16/fp16 matmuls there are slow or emulated), bf16 on CUDA cards with
    compute capability >= 8.0 and fp16 (with loss scaling, see scaling.py) on older ones.
    """
    if requested != "auto":
        return requested  # type: ignore[return-value]
    if device_kind != "cuda":
        return "fp32"
    return "bf16" if bf16_ok else "fp16"


def resolve_cache_dir(cache_dir: str | Path | None = None, kind: CacheKind = "models") -> Path:
    """The folder that caches dequantised GGUF models ("models") or tokenized data ("datasets").

    An explicit `cache_dir` is used as is for both kinds (their entries have distinct prefixes,
    `gguf-` and `tok-`). Otherwise: `$LORAPOOL_CACHE` or `~/.cache/lorapool` for models, and
    `$LORAPOOL_DATA_CACHE` or `<that folder>/datasets` for data.
    """
    if cache_dir is not None:
        return Path(cache_dir)
    root = Path(os.environ.get("LORAPOOL_CACHE") or Path.home() / ".cache" / "lorapool")
    if kind == "datasets":
        data = os.environ.get("LORAPOOL_DATA_CACHE")
        return Path(data) if data else root / "datasets"
    return root
