"""collate.py: the padded (reference) and flat (padding-free) collators."""

from __future__ import annotations

import pytest
import torch

from lorapool.service.train.collate import FlatCollator, PaddedCollator, collate, n_input_tokens
from lorapool.service.train.resolve import IGNORE_INDEX

X = IGNORE_INDEX


def _rows():
    return [{"input_ids": [5, 6, 7], "labels": [X, 6, 7]},
            {"input_ids": [8, 9], "labels": [X, 9]},
            {"input_ids": [1, 2, 3, 4], "labels": [X, X, 3, 4]}]


def test_flat_collator_concatenates_with_restarting_positions():
    out = FlatCollator()(_rows())
    assert set(out) == {"input_ids", "labels", "position_ids"}  # no attention mask
    assert all(t.shape == (1, 9) and t.dtype == torch.long for t in out.values())
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4]]
    assert out["labels"].tolist() == [[X, 6, 7, X, 9, X, X, 3, 4]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    # Document boundaries are exactly where position_ids == 0, and no label sits on one.
    starts = (out["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert starts == [0, 3, 5]
    assert all(out["labels"][0, s] == X for s in starts)
    assert n_input_tokens(out) == 9


def test_flat_collator_keeps_packed_rows_positions():
    packed = [{"input_ids": [5, 6, 7, 8], "labels": [X, 6, X, 8], "position_ids": [0, 1, 0, 1]},
              {"input_ids": [1, 2], "labels": [X, 2], "position_ids": [0, 1]}]
    out = FlatCollator()(packed)
    assert out["position_ids"].tolist() == [[0, 1, 0, 1, 0, 1]]
    assert out["input_ids"].shape == (1, 6)


def test_padded_collator_is_collate():
    rows = _rows()
    a, b = PaddedCollator(0)(rows), collate(rows, 0)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["input_ids"].shape == (3, 4) and n_input_tokens(a) == 9


@pytest.mark.parametrize("collator", [FlatCollator(), PaddedCollator(0)])
def test_empty_micro_batch_is_refused(collator):
    with pytest.raises(ValueError, match="at least one row"):
        collator([])


def test_flat_collator_stacks_rows_of_one_length():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
            {"input_ids": [8, 9, 10], "labels": [-100, -100, 10]}]
    out = FlatCollator()(rows)
    assert out["input_ids"].shape == (2, 3) and "attention_mask" not in out
    assert out["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2]]
    assert out["labels"].tolist() == [[-100, 6, 7], [-100, -100, 10]]
