"""What `plan()` keeps from one pass to the next must never outlive its inputs.

A tenant's turn order is reused while the very same turns come back in the same order; a queue
that changes (a new job, one gone, a view replaced by an equal-looking one with another priority)
must be sorted again. Within a pass, nodes claimed by jobs that wait for them leave the wait
lists; a node not yet claimed must stay there for the next waiting job. Pure policy; the real
estimator on the 1B-shaped config.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from lorapool.service.pool.placement import JobView, NodeView, Placer
from lorapool.service.train.memory import estimate_memory
from lorapool.service.train.spec import DeviceInfo, TrainSpec

GiB = 1024**3


def spec(model: Path) -> TrainSpec:
    return TrainSpec(base_model=str(model), fast="off", max_seq_len=256, batch_size=8)


def need(s: TrainSpec) -> int:
    dev = DeviceInfo(kind="cuda", name="x", total_memory=48 * GiB, compute_capability=(8, 6))
    return int(estimate_memory(s, dev).total * 1.1) + 1


def node(name: str, free: int, speed: float | None = None, **kw) -> NodeView:
    dev = DeviceInfo(kind="cuda", name=name, total_memory=24 * GiB, compute_capability=(8, 6))
    return NodeView(node_id=name, name=name, device=dev, free_memory=free, speed=speed, **kw)


def job(job_id: str, s: TrainSpec, t: float, tenant: str = "acme", **kw) -> JobView:
    kw.setdefault("tokens", 1e6)
    return JobView(job_id=job_id, tenant=tenant, spec=s, submitted_at=t, **kw)


def test_a_tenants_order_is_sorted_again_when_its_queue_changes(model):
    s = spec(model)
    one_slot = [node("n0", need(s) + 1)]
    placer = Placer(size_weight=0)  # plain submit order within the tenant
    a, b, c = job("a", s, 0.0), job("b", s, 1.0), job("c", s, 2.0)
    queue = [c, b, a]  # queue order is not turn order
    assert [p.job_id for p in placer.plan(queue, one_slot, {})] == ["a"]
    assert [p.job_id for p in placer.plan(queue, one_slot, {})] == ["a"]  # the kept order
    # "a" left the queue: the next in turn, not the kept order's head.
    assert [p.job_id for p in placer.plan([c, b], one_slot, {})] == ["b"]
    # A new, older job joins the same tenant.
    old = job("old", s, -5.0)
    assert [p.job_id for p in placer.plan([c, b, old], one_slot, {})] == ["old"]
    # The same job id comes back as a new view with a higher priority: it goes first, although
    # the list looks the same by job id and queue position.
    assert [p.job_id for p in placer.plan([replace(c, priority=3), b, old], one_slot, {})] \
        == ["c"]
    # Same turns in another queue order: sorted again, same answer.
    assert [p.job_id for p in placer.plan([old, b, c], one_slot, {})] == ["old"]


def test_each_waiting_job_claims_its_own_faster_card(model):
    s = spec(model)
    n = need(s)
    slow = [node(f"slow{k}", n + 1, speed=5.0) for k in range(4)]
    fast = [node(f"fast{k}", 0, speed=200.0, running_jobs=1, frees_in=60.0 + k,
                 free_at_end=24 * GiB) for k in range(3)]
    queue = [job(f"j{k}", s, float(k), tokens=5e7) for k in range(4)]
    placer = Placer(max_wait_s=600)
    placed = placer.plan(queue, slow + fast, {})
    # Three jobs wait, one for each fast card, soonest first: the second and third step over
    # the cards claimed before them (and the list they walk drops those) to one still free.
    # The fourth finds all three claimed and starts on a slow card now.
    assert placer.last_waits == {"j0": "fast0", "j1": "fast1", "j2": "fast2"}
    assert [(p.job_id, p.node_id[:4]) for p in placed] == [("j3", "slow")]
