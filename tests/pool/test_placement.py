"""The pure placement policy: fit, best fit, auto-fit, refusal, fair share and constraints.

Jobs use a 1B-shaped Llama config (config only, no weights) and the real `estimate_memory`;
node sizes are derived from those estimates, so the tests keep their meaning when the
estimate is recalibrated.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from lorapool.service.pool.placement import (
    JobView,
    NodeView,
    Placer,
    autofit_variants,
)
from lorapool.service.pool.placement_baselines import FirstFitStatic
from lorapool.service.train.memory import estimate_memory
from lorapool.service.train.spec import DeviceInfo, TrainSpec

GiB = 1024**3
AMPERE = {"kind": "cuda", "compute_capability": (8, 6)}
TURING = {"kind": "cuda", "compute_capability": (7, 5)}


def spec(model: Path, **kw) -> TrainSpec:
    kw.setdefault("max_seq_len", 512)
    kw.setdefault("batch_size", 8)
    # The placement rules are tested against the reference path's (larger, long-settled)
    # estimates; the fast path's estimate has tests of its own (tests/train/test_memory_fast.py).
    kw.setdefault("fast", "off")
    return TrainSpec(base_model=str(model), **kw)


def need(s: TrainSpec, margin: float = 0.10, **dev) -> int:
    """What a node must have available for `s` (estimate plus the default margin)."""
    device = DeviceInfo(name="x", total_memory=48 * GiB, **(dev or AMPERE))
    return int(estimate_memory(s, device).total * (1 + margin)) + 1


def node(name: str, free: int, total: int | None = None, *, promised: int = 0,
         accepting: bool = True, labels: dict | None = None, cc=(8, 6)) -> NodeView:
    total = total if total is not None else free
    dev = DeviceInfo(kind="cuda", name=name, total_memory=total, free_memory=free,
                     compute_capability=cc)
    return NodeView(node_id=f"id-{name}", name=name, device=dev, free_memory=free,
                    promised=promised, labels=labels or {}, accepting=accepting)


def job(job_id: str, s: TrainSpec, tenant: str = "acme", t: float = 0.0, **kw) -> JobView:
    return JobView(job_id=job_id, tenant=tenant, spec=s, submitted_at=t, **kw)


def replay_fits(placer: Placer, placements, nodes) -> None:
    """Every placement fits its node: estimate * (1 + margin) <= free - promised - earlier."""
    taken = {n.node_id: 0 for n in nodes}
    by_id = {n.node_id: n for n in nodes}
    for p in placements:
        n = by_id[p.node_id]
        assert n.accepting
        assert p.estimate.total * (1 + placer.safety_margin) <= n.available - taken[n.node_id], p
        assert p.estimate == estimate_memory(p.spec, n.device)
        taken[n.node_id] += p.estimate.total


def test_jobs_land_only_on_nodes_they_fit(model):
    nodes = [node("gtx-1650", 3 * GiB, 4 * GiB, cc=(7, 5)), node("rtx-3060", 11 * GiB, 12 * GiB),
             node("rtx-3070", 5 * GiB, 8 * GiB, promised=2 * GiB),
             node("rtx-4090", 20 * GiB, 24 * GiB)]
    queue = [job(f"j{i}", spec(model, max_seq_len=seq, micro_batch_size=mb), t=i)
             for i, (seq, mb) in enumerate([(256, 1), (512, 2), (1024, 1), (2048, 1), (4096, 2),
                                            (512, 8), (256, 4), (1024, 4), (8192, 8), (256, 1)])]
    placer = Placer()
    placements = placer.plan(queue, nodes, {})
    assert placements, "nothing placed"
    replay_fits(placer, placements, nodes)
    assert len({p.job_id for p in placements}) == len(placements)
    # The 1650 has 3 GiB free: less than any 1B job needs here; nothing may land there.
    assert need(spec(model, max_seq_len=256), **TURING) > 3 * GiB
    assert all(p.node_id != "id-gtx-1650" for p in placements)
    # Without auto-fit, placed specs are exactly the submitted ones.
    exact = Placer().plan([replace(j, allow_autofit=False) for j in queue], nodes, {})
    replay_fits(placer, exact, nodes)
    specs = {j.job_id: j.spec for j in queue}
    assert all(p.spec == specs[p.job_id] and not p.changes for p in exact)


def test_best_fit_beats_first_fit_on_a_mixed_queue(model):
    small, big = spec(model, max_seq_len=256), spec(model, max_seq_len=4096)
    n_small, n_big = need(small), need(big)
    assert n_big > 2 * n_small
    # The big node is listed first (what first-fit walks); it holds the big job and a bit more.
    nodes = [node("rtx-4090", n_big + n_small // 2), node("rtx-3060", int(n_small * 1.3))]
    queue = [job("small", small, t=0), job("big", big, t=1)]

    best = {p.job_id: p.node_id for p in Placer().plan(queue, nodes, {})}
    assert best == {"small": "id-rtx-3060", "big": "id-rtx-4090"}

    # First fit by static resource puts the small job on the first node; the big one then waits.
    first = {p.job_id: p.node_id for p in FirstFitStatic().plan(queue, nodes)}
    assert first == {"small": "id-rtx-4090"}


def test_refusal_names_the_need_and_the_largest_node(model):
    huge = job("huge", spec(model, max_seq_len=16384, batch_size=8, micro_batch_size=8))
    nodes = [node("rtx-3070-desk12", 7 * GiB, 8 * GiB), node("gtx-1650-desk1", 3 * GiB, 4 * GiB)]
    placer = Placer()
    msg = placer.check_fits(huge, nodes)
    assert msg is not None
    m = re.match(r"needs (\d+\.\d) GiB; largest free node has (\d+\.\d) GiB \(([^)]+)\)", msg)
    assert m, msg
    assert m.group(2) == "8.0" and m.group(3) == "rtx-3070-desk12"
    # The need quoted is the smallest auto-fit setting on that node (micro-batch 1, checkpointing).
    smallest = spec(model, max_seq_len=16384, batch_size=8, micro_batch_size=1,
                    gradient_checkpointing=True)
    assert float(m.group(1)) == pytest.approx(need(smallest) / GiB, abs=0.051)
    assert float(m.group(1)) > 8.0
    # A job that fits a node's total memory is not refused, even while that node is busy.
    ok = job("ok", spec(model, max_seq_len=1024))
    busy = [node("rtx-4090", 1 * GiB, 24 * GiB)]
    assert placer.check_fits(ok, busy) is None
    assert placer.plan([ok], busy, {}) == []  # ...it waits
    assert placer.check_fits(ok, []) is None  # an empty pool: a donor may still join


def test_refusal_when_no_node_matches_the_constraints(model):
    msg = Placer().check_fits(job("j", spec(model), require_bf16=True, labels={"dept": "hr"}),
                              [node("gtx-1650", 4 * GiB, cc=(7, 5))])
    assert msg is not None and "constraints" in msg and "bf16" in msg and "dept=hr" in msg


def test_auto_fit_shrinks_micro_batch_instead_of_refusing(model):
    submitted = spec(model, max_seq_len=1024, batch_size=8, micro_batch_size=8)
    at_2 = spec(model, max_seq_len=1024, batch_size=8, micro_batch_size=2)
    n4, n2 = need(submitted.model_copy(update={"micro_batch_size": 4})), need(at_2)
    nodes = [node("rtx-3060-desk4", (n2 + n4) // 2, 12 * GiB)]
    j = job("j", submitted)
    placer = Placer()
    assert placer.check_fits(j, nodes) is None
    [p] = placer.plan([j], nodes, {})
    assert p.spec.micro_batch_size == 2 and p.spec.batch_size == 8
    assert p.spec.grad_accum_steps == 4
    assert p.spec.gradient_checkpointing == submitted.gradient_checkpointing
    assert p.spec.max_seq_len == 1024
    [change] = p.changes
    assert change.startswith("micro_batch_size 8 → 2, gradient accumulation 1 → 4")
    assert "rtx-3060-desk4" in change and "GiB" in change
    replay_fits(placer, [p], nodes)
    # The user's exact settings, if they ask for them, wait instead.
    assert placer.plan([job("k", submitted, allow_autofit=False)], nodes, {}) == []


def test_auto_fit_turns_on_checkpointing_then_shortens_only_if_allowed(model):
    no_ckpt = spec(model, max_seq_len=2048, batch_size=4, micro_batch_size=1,
                   gradient_checkpointing=False)
    with_ckpt = no_ckpt.model_copy(update={"gradient_checkpointing": True})
    nodes = [node("rtx-3070", (need(no_ckpt) + need(with_ckpt)) // 2)]
    [p] = Placer().plan([job("j", no_ckpt)], nodes, {})
    assert p.spec.gradient_checkpointing and p.spec.micro_batch_size == 1
    assert any("gradient checkpointing turned on" in c for c in p.changes)

    # Fits only at max_seq_len 512: refused to shorten unless the user allowed it.
    long = spec(model, max_seq_len=4096, batch_size=1, micro_batch_size=1)
    nodes = [node("rtx-3060", need(long.model_copy(update={"max_seq_len": 512})) + 1)]
    assert Placer().plan([job("a", long)], nodes, {}) == []
    assert Placer().plan([job("b", long, min_seq_len=1024)], nodes, {}) == []
    [p] = Placer().plan([job("c", long, min_seq_len=300)], nodes, {})
    assert p.spec.max_seq_len == 512
    assert any(c.startswith("max_seq_len 4096 → 512 (allowed down to 300)") for c in p.changes)


def test_autofit_variant_order_keeps_the_effective_batch(model):
    j = job("j", spec(model, max_seq_len=1024, batch_size=12, micro_batch_size=12,
                      gradient_checkpointing=False), min_seq_len=256)
    vs = list(autofit_variants(j))
    assert vs[0] == (12, False, 1024)
    assert vs[1:4] == [(6, False, 1024), (3, False, 1024), (1, False, 1024)]
    assert vs[4:8] == [(12, True, 1024), (6, True, 1024), (3, True, 1024), (1, True, 1024)]
    assert vs[-1] == (1, True, 256)
    assert all(12 % m == 0 for m, _, _ in vs)
    assert len(vs) == len(set(vs))


def test_non_accepting_nodes_get_nothing(model):
    s = spec(model, max_seq_len=256)
    reclaimed = node("rtx-4090", 20 * GiB, accepting=False)
    assert Placer().plan([job("a", s), job("b", s, t=1)], [reclaimed], {}) == []
    open_ = node("rtx-3060", need(s) + 1)
    placements = Placer().plan([job("a", s), job("b", s, t=1)], [reclaimed, open_], {})
    assert [(p.job_id, p.node_id) for p in placements] == [("a", "id-rtx-3060")]


def test_promised_memory_and_jobs_placed_in_the_same_pass_count(model):
    s = spec(model, max_seq_len=256)
    n = need(s)
    # 2.5 jobs' worth of free memory, one job's worth already promised: one more fits.
    nodes = [node("rtx-4090", int(2.5 * n), promised=n)]
    placements = Placer().plan([job(f"j{i}", s, t=i) for i in range(4)], nodes, {})
    assert len(placements) == 1
    # Without the promise, two fit (several small jobs share one large GPU).
    nodes = [node("rtx-4090", int(2.5 * n))]
    assert len(Placer().plan([job(f"j{i}", s, t=i) for i in range(4)], nodes, {})) == 2
    assert len(Placer(max_jobs_per_node=1).plan([job(f"j{i}", s, t=i) for i in range(4)],
                                                nodes, {})) == 1


def test_a_flooded_tenant_does_not_starve_another(model):
    s = spec(model, max_seq_len=256)
    flood = [job(f"acme-{i}", s, tenant="acme", t=i) for i in range(20)]
    late = job("globex-0", s, tenant="globex", t=100)
    nodes = [node(f"n{i}", need(s) + 1) for i in range(3)]
    placed = [p.job_id for p in Placer().plan(flood + [late], nodes, {})]
    assert len(placed) == 3 and "globex-0" in placed
    # acme already runs jobs, globex none: globex's job goes first even with one slot.
    placed = [p.job_id for p in Placer().plan(flood + [late], nodes[:1], {"acme": 2})]
    assert placed == ["globex-0"]


def test_priority_goes_first(model):
    s = spec(model, max_seq_len=256)
    nodes = [node("n0", need(s) + 1)]
    queue = [job("old", s, t=0), job("urgent", s, tenant="other", t=5, priority=10)]
    assert [p.job_id for p in Placer().plan(queue, nodes, {})] == ["urgent"]


def test_pinned_node_labels_bf16_and_min_memory(model):
    s = spec(model, max_seq_len=256)
    free = need(s) * 2
    nodes = [node("turing", free, 24 * GiB, cc=(7, 5), labels={"dept": "hr"}),
             node("ampere-small", free, 12 * GiB, labels={"dept": "eng"}),
             node("ampere-big", free + 1, 24 * GiB, labels={"dept": "eng"})]

    def where(**kw):
        return [p.node_id for p in Placer().plan([job("j", s, **kw)], nodes, {})]

    assert where(node_id="turing") == ["id-turing"]
    assert where(node_id="id-ampere-big") == ["id-ampere-big"]
    assert where(labels={"dept": "hr"}) == ["id-turing"]
    assert where(require_bf16=True) == ["id-ampere-small"]  # best fit among bf16 nodes
    assert where(require_bf16=True, min_memory=16 * GiB) == ["id-ampere-big"]
    assert where(labels={"dept": "hr"}, require_bf16=True) == []
    assert where(node_id="nowhere") == []


def test_estimator_errors_skip_only_that_job(model, tmp_path):
    good = job("good", spec(model, max_seq_len=256))
    bad = job("bad", TrainSpec(base_model=str(tmp_path / "gone"), max_seq_len=256), t=-1)
    nodes = [node("n0", 20 * GiB)]
    placer = Placer()
    before = (nodes[0].free_memory, nodes[0].promised)
    assert [p.job_id for p in placer.plan([bad, good], nodes, {})] == ["good"]
    assert "bad" in placer.last_errors and "gone" in placer.last_errors["bad"]
    assert (nodes[0].free_memory, nodes[0].promised) == before  # inputs untouched


def test_first_fit_static_ignores_free_memory_and_releases_units(model):
    s = spec(model, max_seq_len=256)
    ff = FirstFitStatic()
    units = ff.units(job("a", s))
    assert units == -(-estimate_memory(s, ff.reference).total // GiB)
    # 12 GiB total but only 1 GiB free (another process): the static policy does not see that.
    nodes = [node("busy", 1 * GiB, 12 * GiB)]
    assert [p.job_id for p in ff.plan([job("a", s)], nodes)] == ["a"]
    assert Placer().plan([job("a2", s)], nodes, {}) == []
    per_node = 12 // units
    queue = [job(f"b{i}", s, t=i + 1) for i in range(per_node + 2)]
    assert len(ff.plan(queue, nodes)) == per_node - 1
    ff.release("a")
    assert len(ff.plan(queue, nodes)) == 1


def test_static_baselines_use_what_a_node_declared_when_it_joined(model):
    s = spec(model, max_seq_len=256)
    ff = FirstFitStatic()
    units = ff.units(job("a", s))
    nodes = [node("busy", 1 * GiB, 12 * GiB)]
    # The donor's `ray start` declared the GiB free then (here: room for exactly two jobs).
    ff.declare("id-busy", 2 * units * GiB + GiB // 2)
    assert ff.capacity(nodes[0]) == 2 * units
    queue = [job(f"b{i}", s, t=i) for i in range(4)]
    assert [p.job_id for p in ff.plan(queue, nodes)] == ["b0", "b1"]
    # Rejoining declares again.
    ff.declare("id-busy", 0)
    assert ff.capacity(nodes[0]) == 0
    assert ff.plan(queue, nodes) == []


def test_a_retry_avoids_the_nodes_where_it_failed_unless_none_other_fits(model):
    s = spec(model, max_seq_len=256)
    n = need(s)
    nodes = [node("desk1", n + GiB), node("desk2", n + 2 * GiB)]
    # Best fit picks desk1; after an attempt died there, desk2 is taken instead.
    assert Placer().plan([job("j", s)], nodes, {})[0].node_id == "id-desk1"
    retry = job("j", s, avoid_nodes=frozenset({"desk1"}))
    assert Placer().plan([retry], nodes, {})[0].node_id == "id-desk2"
    # When the avoided node is the only one with room, the retry still runs (there).
    tight = [node("desk1", n + GiB), node("desk2", n // 2)]
    assert Placer().plan([retry], tight, {})[0].node_id == "id-desk1"


# -- CPU nodes: the estimate covers RAM, slots cap how many jobs run at once -------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from lorapool.service.train.tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny")


def cpu_node(name: str, free: int, total: int | None = None, *, slots: int | None = None,
             running: int = 0) -> NodeView:
    dev = DeviceInfo(kind="cpu", name="cpu", total_memory=total or free, free_memory=free,
                     compute_capability=(0, 0))
    return NodeView(node_id=f"id-{name}", name=name, device=dev, free_memory=free,
                    running_jobs=running, max_jobs=slots)


def test_cpu_estimate_covers_the_process_and_the_stored_weights(tiny, model):
    from lorapool.service.train import memory

    cpu = DeviceInfo(kind="cpu", name="cpu", total_memory=64 * GiB)
    gpu = DeviceInfo(kind="cuda", name="g", total_memory=64 * GiB, compute_capability=(8, 6))
    s = TrainSpec(base_model=str(tiny), max_seq_len=128, batch_size=4, micro_batch_size=2)
    est = estimate_memory(s, cpu)
    # The tiny model's tensors are a few MiB: the runtime is what a CPU job really costs.
    assert est.device_kind == "cpu" and est.total >= memory.CPU_RUNTIME_BYTES
    assert est.breakdown["python_torch_runtime"] == memory.CPU_RUNTIME_BYTES
    stored = sum(f.stat().st_size for f in tiny.glob("*.safetensors"))
    assert stored > 0 and est.breakdown["checkpoint_load"] == stored
    assert est.total == sum(est.breakdown.values())
    # The GPU estimate keeps its own terms (no CPU runtime, a CUDA context).
    g = estimate_memory(s, gpu)
    assert "python_torch_runtime" not in g.breakdown and g.breakdown["cuda_context"] > 0
    # A config-only folder: the parameters at the config's dtype (fp32 when unnamed).
    big = estimate_memory(spec(model), cpu)
    assert big.breakdown["checkpoint_load"] >= 2 * 1_000_000_000
    # Longer sequences cost more RAM (activations and logits grow with tokens).
    longer = estimate_memory(s.model_copy(update={"max_seq_len": 1024}), cpu)
    assert longer.breakdown["activations"] > est.breakdown["activations"]
    assert longer.total > est.total


def test_cpu_node_takes_no_more_jobs_than_its_slots(tiny):
    placer = Placer()
    queue = [job(f"j{i}", spec(tiny, max_seq_len=128), t=i) for i in range(10)]
    roomy = cpu_node("cpu-box", 64 * GiB, slots=2)
    got = placer.plan(queue, [roomy])
    assert len(got) == 2 and {p.node_id for p in got} == {"id-cpu-box"}
    # One already running (or dying): one more.
    assert len(placer.plan(queue, [replace(roomy, running_jobs=1)])) == 1
    assert placer.plan(queue, [replace(roomy, running_jobs=2)]) == []
    # No slot cap (a GPU node, or max_jobs None): memory alone decides, all ten fit.
    assert len(placer.plan(queue, [replace(roomy, max_jobs=None)])) == 10


def test_cpu_node_ram_bounds_the_jobs_too(tiny):
    placer = Placer()
    queue = [job(f"j{i}", spec(tiny, max_seq_len=128), t=i) for i in range(5)]
    one = need(queue[0].spec, kind="cpu")
    # Four slots but RAM for one job and a half: one job.
    got = placer.plan(queue, [cpu_node("small", int(one * 1.5), slots=4)])
    assert len(got) == 1
    replay_fits(placer, got, [cpu_node("small", int(one * 1.5), slots=4)])
    # Less RAM than one job needs: none, and the submit-time check refuses it with the numbers.
    tight = cpu_node("tight", one // 2, total=one // 2, slots=4)
    assert placer.plan(queue, [tight]) == []
    msg = placer.check_fits(queue[0], [tight])
    assert msg and "of RAM" in msg and "tight" in msg
    gib = [float(x) for x in re.findall(r"(\d+\.\d) GiB", msg)]
    assert gib[0] > gib[1]


def test_a_job_no_cpu_node_could_hold_is_refused_at_submit(tiny):
    placer = Placer()
    nodes = [cpu_node("cpu-a", 8 * GiB, total=16 * GiB, slots=2),
             cpu_node("cpu-b", 2 * GiB, total=4 * GiB, slots=1)]
    huge = spec(tiny, batch_size=1024, micro_batch_size=1024, max_seq_len=32768)
    msg = placer.check_fits(job("big", huge, allow_autofit=False), nodes)
    assert msg is not None and "of RAM" in msg and "cpu-a" in msg
    need_gib, cap_gib = (float(x) for x in re.findall(r"(\d+\.\d) GiB", msg)[:2])
    assert cap_gib == 16.0 and need_gib > 1000  # a 1024 x 32768-token micro-batch: terabytes
    # With auto-fit allowed the same job shrinks to micro-batch 1, which a 16 GiB node holds.
    assert placer.check_fits(job("big", huge), nodes) is None


def test_a_roomy_node_also_reserves_the_cuda_graphs_pool(model):
    """The placer fits a job by its minimum (the fast path's output head in host memory) and
    reserves, on the node it chose, the richest configuration that node holds with the margin:
    head on the GPU with the CUDA graphs' pool on a roomy node, the minimum on one that holds
    only that; the trainer keeps within what was reserved."""
    from lorapool.service.train.memory import fast_variants

    s = spec(model, fast="auto")  # default LoRA dropout 0: graphs possible on an Ampere card
    device = DeviceInfo(name="x", total_memory=48 * GiB, **AMPERE)
    graphs, eager, minimum = fast_variants(s, device)
    assert estimate_memory(s, device) == minimum and minimum.host_head
    roomy = Placer(fit_up_work=0).plan([job("a", s)], [node("rtx-4090", 24 * GiB)], {})
    assert roomy[0].estimate.total == graphs.total and roomy[0].estimate.graphs
    middle = Placer().plan([job("a", s)], [node("rtx-3060", int(eager.total * 1.1) + 1)], {})
    assert middle and middle[0].estimate.total == eager.total
    tight_free = int(minimum.total * 1.1) + 1  # the job fits, nothing richer does
    tight = Placer().plan([job("a", s)], [node("rtx-3060", tight_free)], {})
    assert tight and tight[0].estimate.total == minimum.total
    # graphs=False (the placement simulator): never reserved.
    off = Placer(graphs=False).plan([job("a", s)], [node("rtx-4090", 24 * GiB)], {})
    assert "cuda_graphs_pool" not in off[0].estimate.breakdown


def test_a_roomy_node_runs_a_larger_micro_batch_with_the_same_effective_batch(model):
    s = spec(model, max_seq_len=512, micro_batch_size=1, batch_size=8)
    big = [node("rtx-4090", 24 * GiB)]
    p = Placer(graphs=False).plan([job("a", s)], big, {})[0]
    assert p.spec.micro_batch_size > 1 and p.spec.batch_size == 8
    assert 8 % p.spec.micro_batch_size == 0
    assert p.changes and "same effective batch 8" in p.changes[0]
    assert p.estimate == estimate_memory(p.spec, big[0].device)
    replay_fits(Placer(graphs=False), [p], big)
    # It stops at the first micro-batch whose work saturates a step (tokens x compute params).
    from lorapool.service.pool.placement import compute_params
    low = Placer(graphs=False, fit_up_work=2 * 512 * compute_params(s))
    assert low.plan([job("a", s)], big, {})[0].spec.micro_batch_size == 2
    # Where the node has just room for the job as submitted, it runs as submitted.
    tight = [node("desk", need(s) + GiB // 8)]
    assert Placer(graphs=False).plan([job("a", s)], tight, {})[0].spec == s
    # At most half of what the node would have left after the job goes to the larger batch.
    for n in [node("desk", need(s) + 3 * GiB // 2)]:
        q = Placer(graphs=False).plan([job("a", s)], [n], {})[0]
        grown = q.estimate.total * 1.1 - need(s)
        assert grown <= (n.available - need(s)) / 2 + 1
    # A job that may not be auto-fitted, or a placer with fit-up off, keeps its micro-batch.
    assert Placer(graphs=False).plan([job("a", s, allow_autofit=False)], big, {})[0].spec == s
    assert Placer(graphs=False, fit_up_work=0).plan([job("a", s)], big, {})[0].spec == s
