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


def test_the_room_picks_the_configuration(one_b):
    """The fast path's memory configurations, richest first: the output head on the GPU with
    CUDA graphs, then without graphs, then the head in host memory (the minimum, what placement
    fits by). A card gets the richest one it holds; graphs only where they can run at all
    (dropout 0, a bf16 card, unpacked rows, the switch not off)."""
    from lorapool.service.train.memory import fast_variants, fit_to_room
    from lorapool.service.train.spec import LoraSpec

    # Long rows: training, not loading, is the peak, so each configuration costs more.
    spec = TrainSpec(base_model=str(one_b), max_seq_len=8192)
    big = DeviceInfo(kind="cuda", total_memory=80 * GiB, compute_capability=(9, 0))
    graphs, eager, host = fast_variants(spec, big)
    assert (graphs.graphs, graphs.host_head) == (True, False)
    assert (eager.graphs, eager.host_head) == (False, False)
    assert (host.graphs, host.host_head) == (False, True)
    assert graphs.total > eager.total > host.total
    assert estimate_memory(spec, big) == host and estimate_memory(spec, big, graphs=True) == graphs
    pool = graphs.breakdown["cuda_graphs_pool"]
    working = sum(eager.breakdown[k] for k in ("activations", "logits", "token_workspace"))
    assert 64 * 2**20 + 0.1 * working < pool < 64 * 2**20 + 0.2 * working  # a fraction of it
    # The head leaves the GPU: its table (the 1B shape's, bf16) less the streamed loss' blocks.
    table = 128256 * 2048 * 2
    assert eager.breakdown["unquantized_params"] - host.breakdown["unquantized_params"] == table
    assert 0.5 * table < eager.total - host.total < table
    for room, want in ((graphs.total, graphs), (graphs.total - 1, eager), (eager.total - 1, host),
                       (host.total - 1, host)):
        assert fit_to_room(spec, big, room) == want
        card = DeviceInfo(kind="cuda", total_memory=room, compute_capability=(9, 0))
        assert estimate_memory(spec, card, graphs=True) == want
    # No graphs configuration where they cannot run; switches pin or remove the head's move.
    no_graphs = [TrainSpec(base_model=str(one_b), lora=LoraSpec(dropout=0.05), max_seq_len=8192),
                 TrainSpec(base_model=str(one_b), fast={"cuda_graphs": "off"}, max_seq_len=8192),
                 TrainSpec(base_model=str(one_b), packing=True, max_seq_len=8192)]
    for s in no_graphs:
        assert [(v.graphs, v.host_head) for v in fast_variants(s, big)] == [(False, False),
                                                                            (False, True)]
    turing = DeviceInfo(kind="cuda", total_memory=80 * GiB, compute_capability=(7, 5))
    assert not any(v.graphs for v in fast_variants(spec, turing))
    kept = TrainSpec(base_model=str(one_b), fast={"host_head": "off"}, max_seq_len=8192)
    assert [(v.graphs, v.host_head) for v in fast_variants(kept, big)] == [(True, False),
                                                                          (False, False)]
    pinned = TrainSpec(base_model=str(one_b), fast={"host_head": "on"}, max_seq_len=8192)
    assert [(v.graphs, v.host_head) for v in fast_variants(pinned, big)] == [(False, True)]


def test_the_trainer_keeps_within_its_reservation(one_b):
    """fastpath.decide_memory: the trainer's rule, the placement's `fit_to_room` applied to the
    scheduler's reservation (or the card). A reservation that counted the graphs' pool gets
    graphs; one made without it, none, even on a card with room to spare; one made for the
    minimum, the head in host memory: the job never outgrows what was reserved for it."""
    from lorapool.service.train.fastpath import decide_memory
    from lorapool.service.train.memory import fast_variants
    from lorapool.service.train.spec import FastPlan, MemoryBudget

    spec = TrainSpec(base_model=str(one_b), max_seq_len=8192)
    card = DeviceInfo(kind="cuda", total_memory=80 * GiB, compute_capability=(9, 0),
                      context_bytes=700 * 2**20)
    plan = FastPlan(fused_lora=True, chunked_loss=True, padding_free=True, host_head=True,
                    cuda_graphs=True, reasons={})
    graphs, eager, host = fast_variants(spec, card)
    probe = graphs.breakdown["cuda_context"]

    def decide(room, total=None):
        budget = None if total is None else MemoryBudget(total=total, context_bytes=probe)
        out = decide_memory(plan, spec, card, room, budget)
        return out.host_head, out.cuda_graphs, out.reasons

    assert decide(80 * GiB)[:2] == (False, True)  # no reservation: the card decides
    assert decide(80 * GiB, graphs.total)[:2] == (False, True)
    head, g, why = decide(80 * GiB, eager.total)
    assert (head, g) == (False, False) and "reserved" in why["cuda_graphs"]
    head, g, why = decide(80 * GiB, host.total)
    assert (head, g) == (True, False) and why["host_head"].startswith("on (auto)")
    assert "host memory" in why["cuda_graphs"]
    assert "the card" in decide(eager.total)[2]["cuda_graphs"]  # a full card says so


def test_loading_straight_to_the_gpu_is_counted(one_b, one_b_tied):
    """Loading onto the GPU brings the tables in the compute dtype and one layer unquantised.
    The loader reads the input embedding into host memory where the fast path keeps it there
    (model.py), so only the head arrives: the load is one table smaller than with
    host_embeddings off, and a tied table (which the head needs on the card) always arrives.
    With the input table kept off the card, a short job's peak is training, not the load."""
    from lorapool.service.train.memory import (
        ALLOCATOR_PAGE_SLACK,
        fast_variants,
        straight_load_bytes,
    )

    big = DeviceInfo(kind="cuda", total_memory=80 * GiB, compute_capability=(9, 0))
    table = 128256 * 2048 * 2  # the 1B shape's embedding or head, bf16

    def load(path, **fast) -> int:
        return straight_load_bytes(TrainSpec(base_model=str(path), fast=fast), big)

    assert load(one_b, host_embeddings="off") - load(one_b) == int(table * (1 + ALLOCATOR_PAGE_SLACK))
    assert load(one_b_tied, host_embeddings="off") == load(one_b_tied)

    short = TrainSpec(base_model=str(one_b), max_seq_len=64)
    for v in fast_variants(short, big)[:2]:
        b = v.breakdown
        on_gpu = sum(x for k, x in b.items() if k not in ("cuda_context", "allocator_slack"))
        assert "loading_peak" not in b
        assert b["base_weights_quantized"] + table <= on_gpu < b["base_weights_quantized"] + 2 * table
        assert v.total >= load(one_b)  # the estimate covers the load


def test_the_model_loads_on_the_host_only_where_a_straight_load_does_not_fit(one_b):
    """fastpath.load_decision: with the head going to the host, the model loads on the CPU
    exactly where loading it straight onto the card (every table there for a moment) would
    exceed the room, or the scheduler's reservation."""
    from lorapool.service.train.fastpath import load_decision
    from lorapool.service.train.memory import straight_load_bytes
    from lorapool.service.train.spec import MemoryBudget

    spec = TrainSpec(base_model=str(one_b), max_seq_len=2048)
    card = DeviceInfo(kind="cuda", total_memory=80 * GiB, compute_capability=(9, 0),
                      context_bytes=700 * 2**20)
    straight = straight_load_bytes(spec, card)
    head = 128256 * 2048 * 2  # the input table is read into host memory, the head is not
    assert straight > head + card.context_bytes
    assert load_decision(spec, card, straight) is False
    assert load_decision(spec, card, straight - 1) is True
    ctx = card.context_bytes
    assert load_decision(spec, card, 80 * GiB, MemoryBudget(total=straight - 1,
                                                            context_bytes=ctx)) is True
    assert load_decision(spec, card, 80 * GiB, MemoryBudget(total=straight,
                                                            context_bytes=ctx)) is False


def test_where_the_weights_arrive(one_b):
    """fastpath.placement_decision: the input table is read into host memory wherever the fast
    path keeps it there, and the head with it where the head goes to the host; the whole model
    loads on the CPU only where its head goes to the host and even a straight load (head on
    the card) would not fit; without host embeddings the model loads straight onto the card,
    but for a head that goes to the host: that is read there."""
    from dataclasses import replace

    from lorapool.service.train.fastpath import placement_decision
    from lorapool.service.train.memory import straight_load_bytes
    from lorapool.service.train.spec import FastPlan

    spec = TrainSpec(base_model=str(one_b), max_seq_len=2048)
    card = DeviceInfo(kind="cuda", total_memory=80 * GiB, compute_capability=(9, 0))
    straight = straight_load_bytes(spec, card)
    plan = FastPlan(host_embeddings=True, chunked_loss=True)
    assert placement_decision(plan, spec, card, 0) == "input_embedding_on_host"
    head_out = replace(plan, host_head=True)
    assert placement_decision(head_out, spec, card, straight) == "tables_on_host"
    assert placement_decision(head_out, spec, card, straight - 1) == "host"
    assert placement_decision(replace(plan, host_embeddings=False), spec, card, 0) == "device"
    assert placement_decision(replace(head_out, host_embeddings=False), spec, card,
                              straight - 1) == "host"
    assert placement_decision(replace(head_out, host_embeddings=False), spec, card,
                              straight) == "head_on_host"
