"""Batching: a `Collator` turns the rows of one micro-batch into the model's input tensors.

Rows are dicts with `input_ids` and `labels` (IGNORE_INDEX = no loss) and, for packed rows,
`position_ids` that restart at 0 at every example. Two collators:

- `PaddedCollator` (the reference path): right-pads to the longest row. Unpacked rows get a 2D
  0/1 attention mask; packed rows get a 4D block-causal mask (no token attends across
  examples).
- `FlatCollator` (`fast.padding_free`): concatenates the micro-batch into ONE row
  `{"input_ids": (1, T), "labels": (1, T), "position_ids": (1, T)}` with position_ids restarting
  at 0 at every example start and no attention mask at all: document boundaries are exactly
  where position_ids == 0, and the attention the fast path installs (service/train/fast)
  derives the documents from them. No padding, no seq^2 mask. Every example's first label is
  IGNORE_INDEX (data.py guarantees it), so the shifted loss never crosses a boundary.

Count loss tokens with `labels != IGNORE_INDEX`, never with a mask.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from .resolve import IGNORE_INDEX

__all__ = ["Collator", "FlatCollator", "PaddedCollator", "collate", "packed_mask_dtype",
           "n_input_tokens"]


class Collator(Protocol):
    """Rows of one micro-batch -> the model's keyword tensors (+ `labels`)."""

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]: ...


def _segments(position_ids: torch.Tensor) -> torch.Tensor:
    """Example index of each position: a new example starts wherever positions do not count
    up by one (the rule transformers uses to detect packed sequences)."""
    diff = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    return (diff != 1).cumsum(-1)


def packed_mask_dtype(model: Any) -> torch.dtype | None:
    """The `mask_dtype` `collate` should use for packed rows on `model`: None (boolean) for
    SDPA, the model's dtype for eager attention. Kernels that take no 4D mask (flash attention,
    flex) cannot run padded packed rows: use "sdpa" or "eager", or `FlatCollator`."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl == "sdpa":
        return None
    if impl == "eager":
        return model.dtype
    raise ValueError(f"packing needs attn_implementation 'sdpa' or 'eager', not {impl!r}")


def collate(rows: list[dict], pad_token_id: int, *,
            mask_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch into tensors: input_ids (pad_token_id), labels (IGNORE_INDEX),
    attention_mask.

    Unpacked rows get the usual 2D 0/1 attention_mask. Packed rows (with position_ids) also get
    position_ids and a 4D mask (batch, 1, seq, seq) that is causal *within* each example and
    blocks attention across examples; transformers passes a 4D mask to the attention kernels
    as is. By default it is boolean (True = may attend), which SDPA (transformers' default
    attention) takes directly on CPU and CUDA, whatever the compute dtype. Eager attention adds
    the mask to its scores, so it needs an additive 0 / finfo.min mask: pass `mask_dtype` =
    the model's compute dtype exactly (`packed_mask_dtype(model)` picks it). A float32 mask on
    a bf16 model gave NaN logits under SDPA on an H100 (transformers 5.17, torch 2.11).
    Padding forms its own segment so no row is fully masked (which would give NaN).
    """
    if not rows:
        raise ValueError("collate needs at least one row")
    packed = "position_ids" in rows[0]
    lengths = [len(r["input_ids"]) for r in rows]
    batch, seq = len(rows), max(lengths)
    input_ids = torch.full((batch, seq), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, seq), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((batch, seq), dtype=torch.long)
    positions = torch.zeros((batch, seq), dtype=torch.long)
    for b, (row, n) in enumerate(zip(rows, lengths)):
        input_ids[b, :n] = torch.as_tensor(row["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.as_tensor(row["labels"], dtype=torch.long)
        attention[b, :n] = 1
        if packed:
            positions[b, :n] = torch.as_tensor(row["position_ids"], dtype=torch.long)
            positions[b, n:] = torch.arange(seq - n)  # padding: one more "example"
    out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention}
    if not packed:
        return out
    seg = _segments(positions)
    causal = torch.ones((seq, seq), dtype=torch.bool).tril()
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal  # (batch, q, kv)
    mask = allowed[:, None, :, :]
    if mask_dtype is not None and mask_dtype != torch.bool:
        mask = torch.zeros(mask.shape, dtype=mask_dtype).masked_fill(
            ~mask, torch.finfo(mask_dtype).min)
    out["attention_mask"] = mask
    out["position_ids"] = positions
    return out


class PaddedCollator:
    """The reference batching: `collate` with a fixed pad id and mask dtype."""

    def __init__(self, pad_token_id: int, *, mask_dtype: torch.dtype | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.mask_dtype = mask_dtype

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return collate(rows, self.pad_token_id, mask_dtype=self.mask_dtype)


class FlatCollator:
    """Padding-free batching: the micro-batch's examples concatenated into one (1, T) row
    (or, when every row has the same length, stacked as a (B, T) batch: nothing to pad).

    A packed row already holds several examples with their own position_ids; they are kept.
    An unpacked row is one example, whose positions are 0..n-1.
    """

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("FlatCollator needs at least one row")
        ids, labels, positions = [], [], []
        for row in rows:
            n = len(row["input_ids"])
            ids.append(torch.as_tensor(row["input_ids"], dtype=torch.long))
            labels.append(torch.as_tensor(row["labels"], dtype=torch.long))
            pos = row.get("position_ids")
            positions.append(torch.as_tensor(pos, dtype=torch.long) if pos is not None
                             else torch.arange(n, dtype=torch.long))
        if len(rows) > 1 and len({len(t) for t in ids}) == 1:
            # Rows of one length need no padding: kept as a (B, T) batch, each row its own
            # documents, so attention runs batched instead of document by document.
            return {"input_ids": torch.stack(ids), "labels": torch.stack(labels),
                    "position_ids": torch.stack(positions)}
        return {"input_ids": torch.cat(ids)[None], "labels": torch.cat(labels)[None],
                "position_ids": torch.cat(positions)[None]}


def n_input_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens of a collated batch, for throughput numbers."""
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2:  # flat rows and 4D-masked packed rows have no padding
        return int(batch["input_ids"].numel())  # ... beyond what packing left, counted as before
    return int(mask.sum())
