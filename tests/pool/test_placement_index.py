"""The placer's fast index gives the same node as a plain scan of every node.

`plan()` finds each job's node through per-pass indexes (speed groups fastest first, each with
its most free memory; buckets by load, sorted by free memory; a bucket whose load alone loses is
skipped). The constrained path scores every node instead (`_best_scan`). On random pools —
mixed speeds, loads, device classes and cached base models — both must pick the same node with
the same score, placement after placement, so a shortcut that skips a node it should have
considered, or an index left stale by a placement, fails here.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from lorapool.service.pool.placement import JobView, Placer, _Pass
from lorapool.service.train.spec import TrainSpec
from tests.support.placement_pools import random_pool

GiB = 1024**3


def _job(rng: random.Random, model: Path, k: int) -> JobView:
    s = TrainSpec(base_model=str(model), fast="off", batch_size=8,
                  micro_batch_size=rng.choice([1, 2, 4, 8]),
                  max_seq_len=rng.choice([256, 512, 1024, 2048]))
    return JobView(job_id=f"j{k}", tenant="t", spec=s, tokens=rng.uniform(1e5, 1e8),
                   model_key=rng.choice(["a", "b", "c", "d"]),
                   model_bytes=rng.choice([None, 2 * GiB]))


@pytest.mark.parametrize("seed", range(6))
def test_fast_index_picks_what_a_full_scan_picks(model, seed):
    rng = random.Random(seed)
    placer = Placer(wait_speedup=0, max_reservations=0)  # no claims: scan and index agree
    p = _Pass(placer, random_pool(rng, 60))
    placed = 0
    for k in range(80):
        job = _job(rng, model, k)
        info = placer._info(job)
        for i in range(len(info.variants)):
            needs = placer._needs(job, info, i, p.devices)
            work = info.works[i]
            fast = p._best_fast(job, info, needs, work)
            scan = p._best_scan(job, info, needs, work, list(p.entries.values()))
            assert (fast is None) == (scan is None), (k, i)
            if fast is None:
                continue
            assert fast[1] is scan[1], (k, i, fast[0], scan[0])
            assert fast[0] == scan[0]
            # Place it, so the next jobs see the indexes after an update.
            p._take(fast[1], info.est[i][fast[1].cls].total)
            placed += 1
            break
    assert placed >= 20  # the pool filled up along the way, not at once


@pytest.mark.parametrize("seed", range(4))
def test_nodes_below_every_jobs_need_are_unlisted_without_changing_a_pick(model, seed):
    """plan() unlists the nodes with less memory than the smallest need of any job it may still
    place (at the start of a pass and whenever a placement leaves a node below it): the index
    must then still pick what a scan of every node picks, and list no node below that floor."""
    rng = random.Random(100 + seed)
    placer = Placer(wait_speedup=0, max_reservations=0)
    p = _Pass(placer, random_pool(rng, 60))
    jobs = [_job(rng, model, k) for k in range(80)]
    infos = [placer._info(j) for j in jobs]
    floor = min(min(placer._needs(j, info, len(info.variants) - 1, p.devices).values())
                for j, info in zip(jobs, infos))
    below = sum(1 for e in p.elist if e.avail < floor)
    p.retire_below(floor)
    placed = 0
    for job, info in zip(jobs, infos):
        for i in range(len(info.variants)):
            needs = placer._needs(job, info, i, p.devices)
            work = info.works[i]
            fast = p._best_fast(job, info, needs, work)
            scan = p._best_scan(job, info, needs, work, list(p.entries.values()))
            assert (fast is None) == (scan is None), (job.job_id, i)
            if fast is None:
                continue
            assert fast[1] is scan[1] and fast[0] == scan[0]
            p._take(fast[1], info.est[i][fast[1].cls].total)
            placed += 1
            break
        listed = [k for src in [p.index, *p.cached.values()] for _, _, keys, _ in src.order
                  for k in keys]
        assert all(k[0] >= floor for k in listed)
        # The largest free memory (`avails`) is over the listed nodes, as the index is.
        assert p.avails == sorted(k[0] for _, _, keys, _ in p.index.order for k in keys)
    assert placed >= 20 and below > 0  # the pool filled, and some nodes began below the floor
