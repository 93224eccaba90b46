"""What a multi-worker job reserves on each worker's node (pool/distributed.py
`_worker_budgets`): the estimate with the CUDA graphs' pool where the node's free memory holds
it, then the estimate without it, so a worker never runs graphs its node did not reserve."""

from __future__ import annotations

from lorapool.service.pool.distributed import _worker_budgets
from lorapool.service.train.memory import estimate_memory, graphs_pool_bytes
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
    eager = estimate_memory(spec.model_copy(update={"micro_batch_size": 2}), _gpu(24 * GiB))
    first, second = _worker_budgets(spec, 2, _gpu(24 * GiB))
    assert second["total"] == eager.total  # the fallback: the job's minimum
    assert first["total"] > eager.total  # with the graphs' pool
    assert first["context_bytes"] == second["context_bytes"] == eager.breakdown["cuda_context"]


def test_a_tight_node_or_no_graphs_asks_for_the_minimum_only(model):
    spec = _spec(model)
    eager = estimate_memory(spec.model_copy(update={"micro_batch_size": 2}), _gpu(24 * GiB))
    tight = _gpu(eager.total + graphs_pool_bytes(eager) // 2)  # room for half the pool
    assert [b["total"] for b in _worker_budgets(spec, 2, tight)] == [eager.total]
    with_dropout = _spec(model).model_copy(update={"lora": LoraSpec(dropout=0.1)})
    assert len(_worker_budgets(with_dropout, 2, _gpu(24 * GiB))) == 1
    cpu = DeviceInfo(kind="cpu", name="cpu", total_memory=64 * GiB)
    assert len(_worker_budgets(spec, 2, cpu)) == 1
    assert _worker_budgets(spec, 2, None) == [None]  # no report: reserve the slot only
