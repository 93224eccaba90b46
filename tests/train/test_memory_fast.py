"""estimate_memory on the fast path (the CUDA default): its own terms, each moving the way the
fast path's memory does (no logits beyond a chunk, offloaded layer inputs, bf16 embeddings,
the input table in host memory unless tied to the head)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorapool.service.train.memory import estimate_memory
from lorapool.service.train.spec import DeviceInfo, TrainSpec
from lorapool.service.train.tiny import make_random_llama

GiB = 1024**3
RTX3060 = DeviceInfo(kind="cuda", name="rtx-3060", total_memory=12 * GiB,
                     compute_capability=(8, 6))


@pytest.fixture(scope="module")
def one_b(tmp_path_factory) -> Path:
    return make_random_llama(tmp_path_factory.mktemp("m") / "1b", "1b", write_weights=False)


@pytest.fixture(scope="module")
def one_b_tied(tmp_path_factory) -> Path:
    folder = make_random_llama(tmp_path_factory.mktemp("m") / "1bt", "1b", write_weights=False)
    config = json.loads((folder / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def est(path: Path, **kw):
    kw.setdefault("max_seq_len", 2048)
    return estimate_memory(TrainSpec(base_model=str(path), **kw), RTX3060)


def test_fast_path_is_the_cuda_default_and_smaller(one_b):
    fast, ref = est(one_b), est(one_b, fast="off")
    assert "lora_compute_copies" in fast.breakdown and "lora_compute_copies" not in ref.breakdown
    assert fast.total < 0.6 * ref.total  # no full logits, no fp32 upcast, offloaded inputs
    assert fast.breakdown["logits"] < ref.breakdown["logits"] / 10
    assert fast.total == sum(fast.breakdown.values())


def test_each_piece_moves_its_term(one_b, one_b_tied):
    base = est(one_b)
    no_off = est(one_b, fast={"offload_activations": "off"})
    assert no_off.breakdown["activations"] > base.breakdown["activations"]
    no_chunk = est(one_b, fast={"chunked_loss": "off"})
    assert no_chunk.breakdown["logits"] > 10 * base.breakdown["logits"]
    on_gpu = est(one_b, fast={"host_embeddings": "off"})
    table = 128256 * 2048 * 2  # the 1B shape's input embedding in bf16
    assert on_gpu.breakdown["unquantized_params"] - base.breakdown["unquantized_params"] == table
    # Tied to the head: the table stays on the GPU whatever the switch says.
    tied = est(one_b_tied)
    assert tied.breakdown["unquantized_params"] == est(
        one_b_tied, fast={"host_embeddings": "off"}).breakdown["unquantized_params"]


@pytest.mark.parametrize("field,values", [("max_seq_len", [512, 2048, 8192]),
                                          ("micro_batch_size", [1, 2, 4])])
def test_grows_with_tokens(one_b, field, values):
    totals = [est(one_b, **{field: v, "batch_size": 4}).total for v in values]
    assert totals == sorted(totals) and len(set(totals)) == len(totals)


def test_measured_context_is_used(one_b):
    spec = TrainSpec(base_model=str(one_b), max_seq_len=2048)
    small = estimate_memory(spec, RTX3060.model_copy(update={"context_bytes": 300 * 2**20}))
    assert small.breakdown["cuda_context"] == 300 * 2**20
    assert est(one_b).total - small.total == est(one_b).breakdown["cuda_context"] - 300 * 2**20


def test_cuda_graphs_are_counted_where_the_card_has_room(one_b):
    """The graphs' pool is in the estimate exactly where graphs will run: dropout 0 (they
    cannot replay a dropout mask's recompute), a bf16 card, and room on the card for the pool;
    otherwise the estimate is the eager fast path's, which is what the trainer then runs."""
    from lorapool.service.train.memory import graphs_fit
    from lorapool.service.train.spec import LoraSpec

    no_dropout = {"lora": LoraSpec(dropout=0.0), "max_seq_len": 2048}
    spec = TrainSpec(base_model=str(one_b), **no_dropout)
    big = DeviceInfo(kind="cuda", total_memory=80 * GiB, compute_capability=(9, 0))
    graphs = estimate_memory(spec, big, graphs=True)
    eager = estimate_memory(spec, big)
    pool = graphs.breakdown["cuda_graphs_pool"]
    assert "cuda_graphs_pool" not in eager.breakdown
    assert graphs.total == eager.total + pool
    working = sum(eager.breakdown[k] for k in ("activations", "logits", "token_workspace"))
    assert 64 * 2**20 + 0.1 * working < pool < 64 * 2**20 + 0.2 * working  # a fraction of it
    # A card with room for the eager path but not for the pool: graphs stay off.
    tight = DeviceInfo(kind="cuda", total_memory=eager.total + pool // 2,
                       compute_capability=(9, 0))
    assert estimate_memory(spec, tight, graphs=True).total == eager.total
    assert graphs_fit(spec, tight, tight.total_memory)[0] is False
    assert graphs_fit(spec, big, big.total_memory)[0] is True
    # LoRA dropout on, a pre-Ampere card, or the switch off: no graphs.
    dropout = TrainSpec(base_model=str(one_b), lora=LoraSpec(dropout=0.05), max_seq_len=2048)
    assert "cuda_graphs_pool" not in estimate_memory(dropout, big, graphs=True).breakdown
    turing = DeviceInfo(kind="cuda", total_memory=80 * GiB, compute_capability=(7, 5))
    assert "cuda_graphs_pool" not in estimate_memory(spec, turing, graphs=True).breakdown
    off = TrainSpec(base_model=str(one_b), fast={"cuda_graphs": "off"}, **no_dropout)
    assert "cuda_graphs_pool" not in estimate_memory(off, big, graphs=True).breakdown
    packed = TrainSpec(base_model=str(one_b), packing=True, **no_dropout)  # eager rows
    assert "cuda_graphs_pool" not in estimate_memory(packed, big, graphs=True).breakdown


def test_the_trainer_uses_graphs_only_within_its_reservation(one_b):
    """fastpath.graphs_decision: the trainer's rule. With a scheduler reservation that counted
    the graphs' pool, graphs run; with one made without it (a smaller card at placement time),
    they stay off even on a card with room to spare: the job must not outgrow its reservation."""
    from lorapool.service.train.fastpath import graphs_decision
    from lorapool.service.train.spec import LoraSpec, MemoryBudget

    spec = TrainSpec(base_model=str(one_b), lora=LoraSpec(dropout=0.0), max_seq_len=2048)
    card = DeviceInfo(kind="cuda", total_memory=80 * GiB, compute_capability=(9, 0),
                      context_bytes=700 * 2**20)
    with_pool = estimate_memory(spec, card, graphs=True)
    without = estimate_memory(spec, card)
    assert with_pool.total > without.total
    probe = with_pool.breakdown["cuda_context"]
    assert graphs_decision(spec, card, 80 * GiB) is None  # no reservation: the card decides
    assert graphs_decision(spec, card, 80 * GiB, MemoryBudget(
        total=with_pool.total, context_bytes=probe)) is None
    why = graphs_decision(spec, card, 80 * GiB, MemoryBudget(total=without.total,
                                                              context_bytes=probe))
    assert why is not None and "reserved" in why
    # A card that is itself too full says so, reservation or not.
    assert "the card" in graphs_decision(spec, card, without.total)
