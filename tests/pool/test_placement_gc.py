"""A `plan()` pass leaves no reference cycles behind.

Everything a pass builds (its node entries, the speed groups and load buckets indexing them, the
turn heap) must go by reference counting when the pass ends. A cycle there (say an entry holding
a bucket key that holds the entry) leaves every pass's objects to the garbage collector, whose
sweeps over them were the slow tail of plan() at 1,000 queued jobs x 200 nodes: the tail a
scheduler pays, which bench/placement.py reports.
"""

from __future__ import annotations

import gc
import random
from pathlib import Path

from lorapool.service.pool.placement import JobView, Placer
from lorapool.service.train.spec import TrainSpec
from tests.support.placement_pools import random_pool


def _queue(rng: random.Random, model: Path, n: int) -> list[JobView]:
    jobs = []
    for k in range(n):
        s = TrainSpec(base_model=str(model), fast="off", batch_size=8,
                      micro_batch_size=rng.choice([1, 2, 4, 8]),
                      max_seq_len=rng.choice([256, 1024, 4096]))
        jobs.append(JobView(job_id=f"j{k}", tenant=rng.choice("xyz"), spec=s,
                            submitted_at=float(k), tokens=rng.uniform(1e5, 1e8),
                            model_key=rng.choice(["a", "b", None]),
                            min_seq_len=128 if k % 3 == 0 else None,
                            labels={"site": "hq"} if k % 7 == 0 else {}))
    return jobs


def test_a_pass_leaves_no_cyclic_garbage(model):
    rng = random.Random(3)
    nodes = random_pool(rng, 40, frees=True)
    for n in nodes[::2]:
        n.labels = {"site": "hq"}
    queue = _queue(rng, model, 150)
    placer = Placer()
    first = placer.plan(queue, nodes, {"x": 2})  # fills the per-job caches (estimates, specs)
    # It did place jobs and leave some waiting for a faster card, so both paths ran (and the
    # claims the waits make).
    assert len(first) >= 10 and placer.last_waits
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(3):
            assert [p.job_id for p in placer.plan(queue, nodes, {"x": 2})] == \
                [p.job_id for p in first]
        # Anything a pass left in a cycle is unreachable now, and only the collector finds it.
        assert gc.collect() == 0
    finally:
        if was_enabled:
            gc.enable()
