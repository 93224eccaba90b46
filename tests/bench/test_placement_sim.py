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


def test_placer_settings_reach_lorapools_placer(bench, trace):
    """`--placer '{"max_jobs_per_node": 1}'` is the one-job-per-card ablation: no node of the
    run ever holds two jobs (the default packs several where memory allows)."""
    jobs, nodes = trace
    most = {}
    for kw in (None, {"max_jobs_per_node": 1}):
        sim = bench.Sim("lorapool", jobs, nodes, seed=3, placer_kw=kw)
        assert sim.placer.max_jobs_per_node == (kw or {}).get("max_jobs_per_node")
        start, peak = sim.start, [0]

        def counting(sj, node, spec, estimate, start=start, peak=peak):
            start(sj, node, spec, estimate)
            peak[0] = max(peak[0], len(node.jobs))

        sim.start = counting
        out = sim.run()
        assert out["completed"] > 0
        most[bool(kw)] = peak[0]
        # The table's wait / run split: first placed after arriving, done after that; in this
        # small busy pool some job queued first.
        done = [sj for sj in sim.jobs.values() if sj.status == "done"]
        assert all(sj.t.arrival <= sj.started_at <= sj.done_at for sj in done)
        assert any(sj.started_at > sj.t.arrival for sj in done)
    assert most[True] == 1 and most[False] > 1, most


@pytest.mark.parametrize("raw, needle", [
    ('{"nope": 1}', "unknown setting(s) nope"),
    ('{"wait_speedup": -1}', "wait_speedup must be a number >= 0"),
    ('{"max_jobs_per_node": "two"}', "max_jobs_per_node must be a number >= 1 or null"),
    ('{"max_jobs_per_node": 0}', "max_jobs_per_node must be a number >= 1 or null"),
    ('{"safety_margin": true}', "safety_margin must be a number"),
    ('{"wait_counts_sharing": 1}', "wait_counts_sharing must be true or false"),
    ("[1]", "must be a JSON object, not list"),
    ("{bad", "must be a JSON object"),
])
def test_placer_settings_are_checked_before_anything_runs(bench, capsys, raw, needle):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--placer", raw])
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err
