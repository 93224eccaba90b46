"""What a multi-worker job reserves on each worker's node (pool/distributed.py
`_worker_budgets`): its richest configuration (output head on the GPU, CUDA graphs' pool) where
the node's free memory holds it, then its minimum, so a worker never uses memory its node did
not reserve."""

from __future__ import annotations

from lorapool.service.pool.distributed import _worker_budgets
from lorapool.service.train.memory import estimate_memory, fast_variants
from lorapool.service.train.spec import DeviceInfo, LoraSpec, TrainSpec

GiB = 1024**3


def _spec(model, **kw) -> TrainSpec:
    return TrainSpec(base_model=str(model), max_seq_len=1024, batch_size=8,
                     lora=LoraSpec(dropout=0.0), **kw)


def _gpu(free: int) -> DeviceInfo:
    return DeviceInfo(kind="cuda", name="x", total_memory=24 * GiB, free_memory=free,
                      compute_capability=(8, 6))


def test_a_roomy_node_is_asked_for_the_pool_first(model):
    spec = _spec(model)
    worker = spec.model_copy(update={"micro_batch_size": 2})
    minimum = estimate_memory(worker, _gpu(24 * GiB))
    first, second = _worker_budgets(spec, 2, _gpu(24 * GiB))
    assert second["total"] == minimum.total  # the fallback: the job's minimum
    richest = fast_variants(worker, _gpu(24 * GiB))[0]
    assert richest.graphs and not richest.host_head and first["total"] == richest.total
    assert first["context_bytes"] == second["context_bytes"] == minimum.breakdown["cuda_context"]


def test_a_tight_node_or_no_graphs_asks_for_the_minimum_only(model):
    spec = _spec(model)
    minimum = estimate_memory(spec.model_copy(update={"micro_batch_size": 2}), _gpu(24 * GiB))
    tight = _gpu(minimum.total + 1)
    assert [b["total"] for b in _worker_budgets(spec, 2, tight)] == [minimum.total]
    with_dropout = _spec(model).model_copy(update={"lora": LoraSpec(dropout=0.1)})
    first, second = _worker_budgets(with_dropout, 2, _gpu(24 * GiB))  # no graphs to reserve
    variants = fast_variants(with_dropout.model_copy(update={"micro_batch_size": 2}),
                             _gpu(24 * GiB))
    assert [first["total"], second["total"]] == [v.total for v in variants]
    assert not any(v.graphs for v in variants)
    cpu = DeviceInfo(kind="cpu", name="cpu", total_memory=64 * GiB)
    assert len(_worker_budgets(spec, 2, cpu)) == 1
    assert _worker_budgets(spec, 2, None) == [None]  # no report: reserve the slot only
