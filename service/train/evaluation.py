"""Held-out loss of a base model, with or without a LoRA adapter: `evaluate(spec, adapter, data)`.

The same pipeline as training, so the numbers compare with a job's validation loss: the base
model is loaded as `spec` says (quantisation, compute dtype, device) by `load_base_model`, the
data goes through `build_dataset` (same rendering, masking, over-long policy and cache), and
the loss is the mean next-token cross-entropy over the label tokens (assistant/completion
tokens unless `spec.loss_on == "all"`). Perplexity is exp(loss).

Pure library: no Ray, no HTTP, no database. The adapter folder must hold safetensors weights;
a pickle (`adapter_model.bin`) is refused, never unpickled.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .data import DataSource, build_dataset, collate
from .errors import ModelLoadError
from .model import load_base_model, select_compute_dtype, select_device
from .spec import TrainSpec

IGNORE_INDEX = -100
# exp() of a loss above this overflows a float: report an infinite perplexity instead.
_MAX_LOG = 700.0


def _attach_adapter(model: Any, adapter_dir: Path) -> Any:
    from peft import PeftModel

    if not (adapter_dir / "adapter_model.safetensors").is_file():
        pickled = [p.name for p in adapter_dir.glob("*.bin")]
        why = (f"its weights are a pickle ({pickled[0]}); only safetensors are read"
               if pickled else "no adapter_model.safetensors")
        raise ModelLoadError(f"cannot load adapter {adapter_dir.name}: {why}",
                             code="invalid_adapter")
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except Exception as exc:  # a mismatched adapter (other base, other modules) lands here
        raise ModelLoadError(f"cannot load adapter {adapter_dir.name} onto the base model: "
                             f"{exc}", code="invalid_adapter") from exc


@torch.no_grad()
def evaluate(spec: TrainSpec, adapter_dir: Optional[str | Path], data: DataSource, *,
             cache_dir: Optional[str | Path] = None) -> dict[str, Any]:
    """Mean token loss of `spec.base_model` (+ the adapter in `adapter_dir`, when given) on
    `data`, in micro-batches of `spec.micro_batch_size`.

    Returns {"loss", "perplexity", "tokens" (label tokens scored), "examples", "seconds"}.
    Raises `DataError` for bad data and `ModelLoadError` for a base model or adapter that
    does not load.
    """
    started = time.perf_counter()
    device = select_device(spec)
    model, tokenizer = load_base_model(spec, device, cache_dir=cache_dir)
    if adapter_dir is not None:
        model = _attach_adapter(model, Path(adapter_dir))
    model.eval()
    tokenized = build_dataset(data, tokenizer, spec, cache_dir=cache_dir)
    # Eager attention adds a float mask to its scores; SDPA takes the boolean one (as in training).
    attn = getattr(model.config, "_attn_implementation", None)
    mask_dtype = select_compute_dtype(spec, device) if attn == "eager" else None

    ds = tokenized.dataset
    keys = [k for k in ("input_ids", "labels", "position_ids") if k in ds.column_names]
    lengths = [len(ids) for ids in ds["input_ids"]]
    # Longest first, so each micro-batch pads little; the mean does not depend on the grouping.
    order = sorted(range(len(ds)), key=lambda i: -lengths[i])
    size = max(1, spec.micro_batch_size)
    total, count = 0.0, 0
    for start in range(0, len(order), size):
        cols = ds[order[start:start + size]]
        rows = [dict(zip(keys, vals)) for vals in zip(*(cols[k] for k in keys))]
        batch = {k: v.to(device) for k, v in collate(rows, tokenizer.pad_token_id,
                                                     mask_dtype=mask_dtype).items()}
        labels = batch.pop("labels")
        logits = model(**batch, use_cache=False).logits[:, :-1, :].float()
        target = labels[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
        total += float(loss)
        count += int((target != IGNORE_INDEX).sum())
    mean = total / max(1, count)
    return {
        "loss": mean,
        "perplexity": math.exp(mean) if mean < _MAX_LOG else math.inf,
        "tokens": count,
        "examples": tokenized.stats.n_examples,
        "seconds": time.perf_counter() - started,
    }
