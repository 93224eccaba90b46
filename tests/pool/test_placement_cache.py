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


def test_a_smaller_micro_batch_is_expected_to_run_slower_until_the_step_saturates():
    from lorapool.service.pool.placement import step_efficiency

    params = 10**9
    # Below saturation (4e12 = 2048 tokens of a 2e9 model): 4x the micro-batch, 4**0.3 ≈ 1.52x
    # the speed, inside the README's measured 1.4-1.9x.
    low, high = (step_efficiency(m, 512, params, 4e12, 0.3) for m in (1, 4))
    assert 1.4 < high / low < 1.9
    assert step_efficiency(16, 512, params, 4e12, 0.3) == 1.0  # 8.2e12: saturated
    assert step_efficiency(1, 512, params, 0, 0.3) == 1.0  # no saturation point: no model
    placer = Placer()
    assert placer.work(1e6, params, (1, False, 512)) > placer.work(1e6, params, (4, False, 512))
    # Checkpointing costs one more forward (6 vs 4 FLOPs per param and token).
    assert placer.work(1e6, params, (16, True, 512)) == 1.5 * placer.work(1e6, params,
                                                                       (16, False, 512))
    assert Placer(step_exponent=0).work(1e6, params, (1, False, 512)) == 4.0 * params * 1e6


def _autofit_setup(model: Path, frees_in: float):
    # 8 x 256 tokens of the 1B shape (~1e9 compute params): a step below saturation, so the
    # micro-batch auto-fit would halve costs speed.
    submitted = TrainSpec(base_model=str(model), fast="off", max_seq_len=256, batch_size=8,
                          micro_batch_size=8)
    smaller = submitted.model_copy(update={"micro_batch_size": 4})
    # "now" holds the job only at a smaller micro-batch; "busy", as fast, holds it as submitted
    # once its running job ends.
    now = node("now", (need(smaller) + need(submitted)) // 2, speed=40.0)
    busy = node("busy", 0, speed=40.0, running_jobs=1, frees_in=frees_in, free_at_end=24 * GiB)
    return job("j", submitted, 0.0, tokens=2e8), [now, busy]


def test_a_job_waits_for_room_as_submitted_rather_than_run_slower_now(model):
    j, nodes = _autofit_setup(model, frees_in=120.0)
    placer = Placer()
    assert placer.plan([j], nodes, {}) == []
    assert placer.last_waits == {"j": "busy"}
    # Without the efficiency model, or without waiting, it is auto-fitted now.
    for other in (Placer(step_exponent=0), Placer(max_wait_s=0)):
        [p] = other.plan([j], nodes, {})
        assert p.node_id == "now" and p.spec.micro_batch_size < 8


def test_auto_fit_still_starts_now_when_room_comes_too_late(model):
    # Frees beyond max_wait_s: auto-fitted now, not waiting.
    j, nodes = _autofit_setup(model, frees_in=4000.0)
    placer = Placer(max_wait_s=1800)
    [p] = placer.plan([j], nodes, {})
    assert p.node_id == "now" and p.spec.micro_batch_size < 8 and p.changes
    assert placer.last_waits == {}
    # Within max_wait_s but later than the auto-fitted run would end there: no wait either.
    short = replace(j, tokens=1e5)
    j2, nodes2 = _autofit_setup(model, frees_in=1700.0)
    [p2] = placer.plan([replace(short, job_id="s")], nodes2, {})
    assert p2.node_id == "now" and placer.last_waits == {}


def test_waits_for_room_are_bounded_per_pass(model):
    j, (now, busy) = _autofit_setup(model, frees_in=120.0)
    now2 = replace(now, node_id="now2", name="now2")
    busy2 = replace(busy, node_id="busy2", name="busy2", frees_in=130.0)
    k = replace(j, job_id="k", submitted_at=1.0)
    pool = [now, now2, busy, busy2]
    placer = Placer(max_room_waits=1)
    placed = placer.plan([j, k], pool, {})
    # The first in turn waits for room; the second, over the bound, starts auto-fitted now.
    assert placer.last_waits == {"j": "busy"}
    assert [p.job_id for p in placed] == ["k"] and placed[0].node_id.startswith("now")
    assert placed[0].spec.micro_batch_size < 8
    unbounded = Placer()
    assert unbounded.plan([j, k], pool, {}) == []  # both wait, one for each node
    assert unbounded.last_waits == {"j": "busy", "k": "busy2"}
