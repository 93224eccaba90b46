"""The placement benchmark's simulation (bench/placement.py) on a small trace: its memory
accounting while jobs wait adds up, and a gap it calls too small for every queued job is."""

from __future__ import annotations

import importlib.util
import math
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_placement", ROOT / "bench" / "placement.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_placement"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_placement", None)


@pytest.fixture(scope="module")
def trace(bench, tmp_path_factory):
    models = bench.write_configs(tmp_path_factory.mktemp("configs"))
    rng = random.Random(3)
    nodes = bench.make_nodes(rng)[:12]  # a small, busy pool: jobs wait
    jobs = bench.make_jobs(rng, models, 60, 0.5 * bench.HOUR)
    return jobs, nodes


@pytest.mark.parametrize("policy", ["lorapool", "first-fit-static"])
def test_memory_while_jobs_wait_adds_up(bench, trace, policy):
    jobs, nodes = trace
    sim = bench.Sim(policy, jobs, nodes, seed=3)
    out = sim.run()
    assert not math.isnan(out["mem_util_waiting"]), "the small pool should make jobs wait"
    parts = [out["mem_util_waiting"]] + [out[f"wait_{k}_util"]
                                         for k in ("other", "starting", "stranded", "usable")]
    assert all(0.0 <= p <= 1.0 for p in parts), parts
    assert sum(parts) == pytest.approx(1.0, abs=1e-9), parts
    assert out["wait_other_util"] > 0  # half the nodes have other processes on their card


def test_smallest_need_is_the_least_any_variant_needs_on_any_card(bench, trace):
    """A gap is "stranded" below every queued job's smallest need: that must be the least
    memory the job could run in, over all its auto-fit variants and all the pool's cards
    (not only the last variant tried, on the first card)."""
    jobs, nodes = trace
    sim = bench.Sim("lorapool", jobs, nodes, seed=3)
    for sj in list(sim.jobs.values())[:25]:
        view = sim.job_view(sj)
        brute = min(bench.estimate_memory(sim._sizer.variant_spec(view, v), n.device).total
                    for v in bench.autofit_variants(view) for n in sim.nodes.values())
        assert sim.smallest_need(sj) == brute, sj.t.job_id
