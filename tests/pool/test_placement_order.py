"""The placer's turn order and its fast pass: shortest expected job first within a tenant (with
bounded aging), fair share across tenants kept, the fit guarantee on the indexed pass (nodes
caching models, speeds, nodes freeing soon), caches matched by value, and the wait for a faster
card bounded by max_wait_s. Pure policy; the real estimator on 1B/135M-shaped configs."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

from lorapool.service.pool.placement import JobView, NodeView, Placer
from lorapool.service.train.memory import estimate_memory
from lorapool.service.train.spec import DeviceInfo, TrainSpec
from lorapool.service.train.tiny import make_random_llama

GiB = 1024**3


def spec(model: Path, **kw) -> TrainSpec:
    kw.setdefault("max_seq_len", 256)
    kw.setdefault("batch_size", 8)
    return TrainSpec(base_model=str(model), fast="off", **kw)


def need(s: TrainSpec) -> int:
    dev = DeviceInfo(kind="cuda", name="x", total_memory=48 * GiB, compute_capability=(8, 6))
    return int(estimate_memory(s, dev).total * 1.1) + 1


def node(name: str, free: int, speed: float | None = None, total: int = 24 * GiB,
         **kw) -> NodeView:
    dev = DeviceInfo(kind="cuda", name=name, total_memory=total, free_memory=free,
                     compute_capability=(8, 6))
    return NodeView(node_id=name, name=name, device=dev, free_memory=free, speed=speed, **kw)


def job(job_id: str, s: TrainSpec, tenant: str = "acme", t: float = 0.0, **kw) -> JobView:
    return JobView(job_id=job_id, tenant=tenant, spec=s, submitted_at=t, **kw)


# Expected run time of `tokens` of the 1B shape at the placer's reference speed (10 TFLOP/s x
# 0.3): what `size_weight` multiplies. ~1e9 compute params × 4 FLOPs per token, over the
# fraction of the speed its micro-batch reaches.
def ref_seconds(placer: Placer, s: TrainSpec, tokens: float) -> float:
    from lorapool.service.pool.placement import compute_params

    v = (s.micro_batch_size, s.gradient_checkpointing, s.max_seq_len)
    return placer.work(tokens, compute_params(s), v) / (
        placer.default_speed * 1e12 * placer.efficiency)


def test_a_short_job_goes_before_a_long_one_of_similar_age(model):
    s = spec(model)
    nodes = [node("n0", need(s) + 1)]  # one slot
    queue = [job("long", s, t=0.0, tokens=5e7), job("short", s, t=10.0, tokens=1e5)]
    assert [p.job_id for p in Placer().plan(queue, nodes, {})] == ["short"]
    # size_weight 0 is plain submit order.
    assert [p.job_id for p in Placer(size_weight=0).plan(queue, nodes, {})] == ["long"]


def test_aging_bounds_how_long_a_long_job_is_overtaken(model):
    s = spec(model)
    nodes = [node("n0", need(s) + 1)]
    placer = Placer()
    long_s = ref_seconds(placer, s, 5e7)
    # A short job submitted later than size_weight × the long job's expected time does not
    # overtake it any more.
    late = long_s * placer.size_weight + 60
    queue = [job("long", s, t=0.0, tokens=5e7), job("short", s, t=late, tokens=1e5)]
    assert [p.job_id for p in placer.plan(queue, nodes, {})] == ["long"]


def test_fair_share_still_comes_before_size(model):
    s = spec(model)
    nodes = [node("n0", need(s) + 1)]
    # acme's job is far shorter, but acme already runs two jobs and globex none.
    queue = [job("acme-short", s, t=0.0, tokens=1e4),
             job("globex-long", s, tenant="globex", t=50.0, tokens=5e7)]
    assert [p.job_id for p in Placer().plan(queue, nodes, {"acme": 2})] == ["globex-long"]
    # A flood of short jobs from one tenant still lets the other tenant in.
    flood = [job(f"acme-{i}", s, t=i, tokens=1e4) for i in range(30)]
    nodes = [node(f"n{i}", need(s) + 1) for i in range(4)]
    placed = [p.job_id for p in Placer().plan(flood + queue[1:], nodes, {})]
    assert len(placed) == 4 and "globex-long" in placed


def test_the_fast_pass_never_places_where_the_estimate_does_not_fit(model, tmp_path):
    """Random pools (speeds, cached models, nodes freeing soon, claims) and queues: every
    placement fits what its node has left after the earlier placements of the pass."""
    small = make_random_llama(tmp_path / "tiny", "tiny", write_weights=False)
    rng = random.Random(3)
    placer = Placer()
    for trial in range(25):
        nodes = []
        for i in range(rng.randint(1, 40)):
            total = rng.choice([4, 6, 8, 12, 16, 24]) * GiB
            nodes.append(node(
                f"n{trial}-{i}", int(total * rng.uniform(0.0, 1.0)),
                speed=rng.choice([None, 6.0, 25.0, 40.0, 165.0]), total=total,
                running_jobs=rng.randint(0, 3),
                cached_models=frozenset(rng.sample(["1b", "135m"], rng.randint(0, 2))),
                frees_in=rng.choice([None, rng.uniform(10, 4000)]), free_at_end=total,
                accepting=rng.random() > 0.1))
        queue = []
        for k in range(rng.randint(1, 120)):
            base, key = rng.choice([(model, "1b"), (small, "135m")])
            s = spec(base, max_seq_len=rng.choice([256, 512, 1024]),
                     micro_batch_size=rng.choice([1, 2, 4, 8]))
            queue.append(job(f"j{trial}-{k}", s, tenant=rng.choice("abc"), t=rng.uniform(0, 9e3),
                             tokens=rng.uniform(1e5, 1e8), model_key=key,
                             min_seq_len=rng.choice([None, 128])))
        placements = placer.plan(queue, nodes, {"a": rng.randint(0, 5)})
        taken = {n.node_id: 0 for n in nodes}
        by_id = {n.node_id: n for n in nodes}
        assert len({p.job_id for p in placements}) == len(placements)
        for p in placements:
            n = by_id[p.node_id]
            assert n.accepting
            assert p.estimate == estimate_memory(p.spec, n.device)
            assert (p.estimate.total * (1 + placer.safety_margin)
                    <= n.available - taken[n.node_id]), p
            taken[n.node_id] += p.estimate.total


def test_caches_match_equal_specs_and_notice_a_changed_one(model):
    s = spec(model, micro_batch_size=1)
    nodes = [node("n0", need(s) + 1)]
    placer = Placer()
    first = placer.plan([job("j", s)], nodes, {})
    assert [p.job_id for p in first] == ["j"]
    # The scheduler's next pass: new, equal objects → the same answer.
    again = placer.plan([job("j", s.model_copy())], nodes, {})
    assert [(p.job_id, p.spec) for p in again] == [(p.job_id, p.spec) for p in first]
    # A changed spec (a larger micro-batch that no longer fits as submitted) is re-estimated:
    # it is auto-fitted back down, never placed on the stale estimate.
    bigger = s.model_copy(update={"micro_batch_size": 8})
    assert need(bigger) > need(s)
    out = placer.plan([job("j", bigger)], nodes, {})
    assert len(out) == 1 and out[0].spec.micro_batch_size < 8 and out[0].changes
    assert out[0].estimate == estimate_memory(out[0].spec, nodes[0].device)
    # Without auto-fit it waits.
    assert placer.plan([replace(job("j", bigger), allow_autofit=False)], nodes, {}) == []


def test_waiting_for_a_faster_card_is_bounded_by_max_wait(model):
    s = spec(model)
    n = need(s)
    slow = node("slow", n + 1, speed=5.0)

    def fast(frees_in: float) -> NodeView:
        return node("fast", 0, speed=200.0, running_jobs=1, frees_in=frees_in,
                    free_at_end=24 * GiB)

    q = [job("j", s, tokens=5e7)]
    placer = Placer(max_wait_s=600, wait_fraction=0)
    assert placer.plan(q, [slow, fast(120.0)], {}) == []  # 40× faster, frees in 2 min: wait
    assert placer.last_waits == {"j": "fast"}
    placed = placer.plan(q, [slow, fast(900.0)], {})  # beyond max_wait_s: start now
    assert [p.node_id for p in placed] == ["slow"] and placer.last_waits == {}
    # Not faster by wait_speedup: start now even if it frees soon.
    near = node("fast", 0, speed=12.0, running_jobs=1, frees_in=60.0, free_at_end=24 * GiB)
    assert [p.node_id for p in placer.plan(q, [slow, near], {})] == ["slow"]


def test_a_shared_card_may_count_at_the_jobs_share_when_deciding_to_wait(model):
    """With `wait_counts_sharing` (the default): jobs computing together share a card's speed,
    so on a card already running three jobs a newcomer runs at a quarter of it, and a card as
    fast that frees in two minutes (where it would run alone) is worth waiting for; on the same
    card idle it is not. Without it, only a card faster by itself is waited for."""
    s = spec(model)
    n = need(s)
    q = [job("j", s, tokens=5e7)]
    twin = node("twin", 0, speed=50.0, running_jobs=1, frees_in=120.0, free_at_end=24 * GiB)
    busy = node("busy", n + 1, speed=50.0, running_jobs=3)
    nominal = Placer(max_wait_s=600, wait_fraction=0, wait_counts_sharing=False)
    assert [p.node_id for p in nominal.plan(q, [busy, twin], {})] == ["busy"]
    placer = Placer(max_wait_s=600, wait_fraction=0)
    assert placer.wait_counts_sharing
    assert placer.plan(q, [busy, twin], {}) == []
    assert placer.last_waits == {"j": "twin"}
    idle = node("idle", n + 1, speed=50.0)
    assert [p.node_id for p in placer.plan(q, [idle, twin], {})] == ["idle"]
    assert placer.last_waits == {}
    # Two jobs there: a third of its speed, at least wait_speedup (3) slower than alone.
    pair = node("pair", n + 1, speed=50.0, running_jobs=2)
    assert placer.plan(q, [pair, twin], {}) == [] and placer.last_waits == {"j": "twin"}
    # One: half its speed, not slow enough to wait.
    one = node("one", n + 1, speed=50.0, running_jobs=1)
    assert [p.node_id for p in placer.plan(q, [one, twin], {})] == ["one"]


def test_a_long_job_may_wait_a_share_of_its_run_for_a_faster_card(model):
    """Beyond max_wait_s, a job waits up to wait_fraction of its expected run on the card it
    would start on now (never past max_long_wait_s): hours for a job of days on a slow card,
    while a short job starts at once."""
    s = spec(model)
    slow = node("slow", need(s) + 1, speed=5.0)
    fast = node("fast", 0, speed=200.0, running_jobs=1, frees_in=2 * 3600.0,
                free_at_end=24 * GiB)
    placer = Placer(max_wait_s=600, wait_fraction=0.25, max_long_wait_s=6 * 3600.0)
    long_run = ref_seconds(placer, s, 5e7) * 10.0 / 5.0  # its run on the slow card
    assert long_run * 0.25 > 2 * 3600.0  # so a quarter of it covers the two hours
    assert placer.plan([job("long", s, tokens=5e7)], [slow, fast], {}) == []
    assert placer.last_waits == {"long": "fast"}
    # A short job: two hours is more than a quarter of its run, and than max_wait_s.
    short = placer.plan([job("short", s, tokens=2e5)], [slow, fast], {})
    assert [p.node_id for p in short] == ["slow"] and placer.last_waits == {}
    # Never past max_long_wait_s, however long the job.
    capped = Placer(max_wait_s=600, wait_fraction=0.25, max_long_wait_s=3600.0)
    assert [p.node_id for p in capped.plan([job("long", s, tokens=5e7)], [slow, fast], {})] \
        == ["slow"]
