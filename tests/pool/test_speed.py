"""Placement by speed: measured node speed, earliest expected finish, bounded waiting for a much
faster card, and reservation + backfill. Pure policy (no Ray); the real estimator on a 1B-shaped
config (no weights), and the real calibration matmul on this machine's CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from lorapool.service.pool.devices import (
    SPEED_TAG,
    SimulatedGPU,
    measure_speed,
    measure_speed_isolated,
)
from lorapool.service.pool.placement import JobView, NodeView, Placer
from lorapool.service.train.memory import estimate_memory
from lorapool.service.train.spec import DeviceInfo, TrainSpec

GiB = 1024**3


def spec(model: Path, seq: int = 256) -> TrainSpec:
    # The reference path's estimate (the placement rules, not the estimate, are under test).
    return TrainSpec(base_model=str(model), max_seq_len=seq, batch_size=8, fast="off")


def need(s: TrainSpec) -> int:
    dev = DeviceInfo(kind="cuda", name="x", total_memory=48 * GiB, compute_capability=(8, 6))
    return int(estimate_memory(s, dev).total * 1.1) + 1


def node(name: str, free: int, speed: float | None, **kw) -> NodeView:
    dev = DeviceInfo(kind="cuda", name=name, total_memory=24 * GiB, free_memory=free,
                     compute_capability=(8, 6))
    return NodeView(node_id=name, name=name, device=dev, free_memory=free, speed=speed, **kw)


def test_calibration_measures_a_positive_cpu_speed():
    speed = measure_speed("cpu", size=128, repeats=1)
    assert speed is not None and speed > 0
    assert SimulatedGPU(name="g", total_memory=GiB, speed_tflops=40.0).speed_tflops == 40.0


def test_the_calibration_child_answers_for_its_card():
    # The child process the agent runs for a GPU: no CUDA here, so it says "unknown" (None),
    # and for the CPU it prints a positive reading.
    assert measure_speed_isolated("cuda") is None
    out = subprocess.run([sys.executable, "-m", "lorapool.service.pool.devices", "--speed",
                          "--kind", "cpu"], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    [line] = [x for x in out.splitlines() if x.startswith(SPEED_TAG)]
    assert float(line[len(SPEED_TAG):]) > 0


def test_the_faster_node_wins_over_the_tighter_fit(model):
    s = spec(model)
    n = need(s)
    nodes = [node("slow-tight", n + 1, 6.0), node("fast-roomy", 3 * n, 165.0)]
    [p] = Placer().plan([JobView("j", "a", s, tokens=1e7)], nodes, {})
    assert p.node_id == "fast-roomy" and p.expected_s is not None
    # Without measured speeds it is best fit, as before.
    unmeasured = [node("slow-tight", n + 1, None), node("fast-roomy", 3 * n, None)]
    assert Placer().plan([JobView("j", "a", s)], unmeasured, {})[0].node_id == "slow-tight"


def test_a_cached_base_model_saves_its_transfer(model):
    s = spec(model)
    n = need(s)
    nodes = [node("a", 2 * n, 40.0), node("b", 2 * n, 40.0, cached_models=frozenset({"m1"}))]
    job = JobView("j", "t", s, tokens=1e5, model_key="m1", model_bytes=5 * GiB)
    assert Placer().plan([job], nodes, {})[0].node_id == "b"


def test_waits_briefly_for_a_much_faster_card_but_not_long(model):
    s = spec(model)
    n = need(s)
    job = JobView("j", "t", s, tokens=5e8)
    slow = node("slow", 2 * n, 6.0)
    soon = node("fast", 0, 165.0, running_jobs=1, frees_in=60.0, free_at_end=24 * GiB)
    placer = Placer()
    assert placer.plan([job], [slow, soon], {}) == []
    assert placer.last_waits == {"j": "fast"}
    # A faster card that frees only after max_wait_s: start on the slow one now (wait_fraction
    # 0: no longer wait for a long job; test_placement_order.py covers that one).
    late = node("fast", 0, 165.0, running_jobs=1, frees_in=7200.0, free_at_end=24 * GiB)
    placer = Placer(max_wait_s=1800, wait_fraction=0)
    assert [p.node_id for p in placer.plan([job], [slow, late], {})] == ["slow"]
    # Off when asked.
    assert Placer(wait_speedup=0).plan([job], [slow, soon], {})[0].node_id == "slow"


def test_a_reserved_node_is_backfilled_only_by_jobs_that_end_before_it_frees(model):
    small, big = spec(model, 256), spec(model, 4096)
    nb, ns = need(big), need(small)
    assert nb > 2 * ns
    # One node: ns+ free now, enough for the big job once its running job ends in 10 minutes.
    n = node("n", ns + GiB // 4, 40.0, running_jobs=1, frees_in=600.0, free_at_end=nb + GiB)
    blocked = JobView("big", "a", big, submitted_at=0, tokens=1e7, allow_autofit=False)
    short = JobView("short", "b", small, submitted_at=1, tokens=1e5)
    long = JobView("long", "c", small, submitted_at=2, tokens=1e10)
    got = [p.job_id for p in Placer().plan([blocked, long, short], [n], {})]
    assert got == ["short"]
    # Without reservations the long job takes the gap too.
    got = Placer(max_reservations=0).plan([blocked, long], [n], {})
    assert [p.job_id for p in got] == ["long"]
