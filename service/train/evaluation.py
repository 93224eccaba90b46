"""Held-out loss of a base model, with or without a LoRA adapter: `evaluate(spec, adapter, data)`.

The same pipeline as training, so the numbers compare with a job's validation loss: the model
comes from the trainer's own builder (`build_model(..., for_training=False)`: quantisation,
compute dtype, device, fast plan), the data goes through `build_dataset` (same rendering,
masking, over-long policy and cache) and the batches through the plan's collator, and the loss
is loss.py's `token_loss_sum`, the very function training uses (chunked: no full logits). The
result is the mean next-token cross-entropy over the label tokens (assistant/completion tokens
unless `spec.loss_on == "all"`). Perplexity is exp(loss).

Pure library: no Ray, no HTTP, no database. The adapter folder must hold safetensors weights;
a pickle (`adapter_model.bin`) is refused, never unpickled.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Optional

import torch

from .data import DataSource, build_dataset
from .loss import token_loss_sum
from .model import build_model, select_device
from .spec import TrainSpec

# exp() of a loss above this overflows a float: report an infinite perplexity instead.
_MAX_LOG = 700.0


@torch.no_grad()
def evaluate(spec: TrainSpec, adapter_dir: Optional[str | Path], data: DataSource, *,
             cache_dir: Optional[str | Path] = None) -> dict[str, Any]:
    """Mean token loss of `spec.base_model` (+ the adapter in `adapter_dir`, when given) on
    `data`, in micro-batches of `spec.micro_batch_size`.

    Returns {"loss", "perplexity", "tokens" (label tokens scored), "examples", "seconds"}. Raises `DataError` for bad data and `ModelLoadError` for a
    base model or adapter that does not load.
    """
    started = time.perf_counter()
    device = select_device(spec)
    built = build_model(spec, device, cache_dir=cache_dir, for_training=False,
                        adapter_dir=adapter_dir)
    model = built.model
    model.eval()
    tokenized = build_dataset(data, built.tokenizer, spec, cache_dir=cache_dir)
    collator = built.collator()

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
        batch = {k: v.to(device) for k, v in collator(rows).items()}
        loss, n = token_loss_sum(model, batch, chunked=built.chunked_loss)
        total += float(loss)
        count += n
    mean = total / max(1, count)
    return {
        "loss": mean,
        "perplexity": math.exp(mean) if mean < _MAX_LOG else math.inf,
        "tokens": count,
        "examples": tokenized.stats.n_examples,
        "seconds": time.perf_counter() - started,
    }
