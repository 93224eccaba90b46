"""The NodeAgent's CUDA-context probe: once, in the background, only on a real CUDA node, and a
reading taken while a job started is thrown away. `measure_context_bytes` is replaced here
because this machine has no GPU (the real probe runs in tests/train/test_context_probe.py's
GPU test); the agent is built without Ray for the same reason its logic needs no cluster."""

from __future__ import annotations

import threading

import pytest

from lorapool.service.pool import agent as agent_mod
from lorapool.service.pool.agent import AgentConfig, NodeAgent
from lorapool.service.pool.devices import SimulatedGPU
from lorapool.service.train import context_probe

GiB = 1024**3


def _agent(tmp_path, **config) -> NodeAgent:
    a = object.__new__(NodeAgent)  # no Ray runtime here: only the probe's state is needed
    a.config = AgentConfig(name="n", work_dir=str(tmp_path), **config)
    a._lock = threading.Lock()
    a._runners = {}
    a._context = None
    a._context_probe = None
    a._registrations = 0
    return a


def test_simulated_and_cpu_nodes_never_probe(tmp_path, monkeypatch):
    monkeypatch.setattr(context_probe, "measure_context_bytes",
                        lambda *a, **k: pytest.fail("probed"))
    sim = _agent(tmp_path, simulate_gpu=SimulatedGPU(name="g", total_memory=8 * GiB))
    assert sim._measured_context("cuda") is None and sim._context_probe is None
    cpu = _agent(tmp_path)
    assert cpu._measured_context("cpu") is None and cpu._context_probe is None


def test_a_cuda_node_probes_once_and_reports_the_reading(tmp_path, monkeypatch):
    calls, release = [], threading.Event()

    def measure(gpu, **k):
        calls.append(gpu)
        release.wait(5)
        return GiB

    monkeypatch.setattr(context_probe, "measure_context_bytes", measure)
    a = _agent(tmp_path, gpu_index=1)
    assert a._measured_context("cuda") is None  # not measured yet: the estimate's constant
    assert a._measured_context("cuda") is None  # ... and not probed twice
    release.set()
    a._context_probe.join(5)
    assert a._measured_context("cuda") == GiB
    assert calls == [1]


def test_a_reading_taken_while_a_job_started_is_retried(tmp_path, monkeypatch):
    monkeypatch.setattr(agent_mod, "CONTEXT_PROBE_RETRY_S", 0.0)
    a = _agent(tmp_path)
    readings = iter([5 * GiB, GiB])

    def measure(gpu, **k):
        value = next(readings)
        if value == 5 * GiB:  # a job registers mid-probe: its memory looks like context
            with a._lock:
                a._registrations += 1
        return value

    monkeypatch.setattr(context_probe, "measure_context_bytes", measure)
    a._probe_context()
    assert a._context == GiB


def _speed_agent(tmp_path, **config) -> NodeAgent:
    a = _agent(tmp_path, **config)
    a._speed, a._speed_at, a._speed_probe = None, 0.0, None
    return a


def test_a_cuda_node_measures_its_speed_in_a_child_in_the_background(tmp_path, monkeypatch):
    calls, release = [], threading.Event()

    def isolated(kind, gpu_index=0, **k):
        calls.append((kind, gpu_index))
        release.wait(5)
        return 42.0

    monkeypatch.setattr(agent_mod, "measure_speed_isolated", isolated)
    monkeypatch.setattr(agent_mod, "measure_speed",
                        lambda *a, **k: pytest.fail("a GPU measured in the agent's process"))
    a = _speed_agent(tmp_path, gpu_index=1)
    assert a._measured_speed("cuda") is None  # the report does not wait for the child
    assert a._measured_speed("cuda") is None  # ... and starts no second one meanwhile
    release.set()
    a._speed_probe.join(5)
    assert a._measured_speed("cuda") == 42.0
    assert calls == [("cuda", 1)]


def test_a_cpu_node_measures_its_speed_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(agent_mod, "measure_speed_isolated",
                        lambda *a, **k: pytest.fail("a child for a CPU matmul"))
    monkeypatch.setattr(agent_mod, "measure_speed", lambda kind, gpu_index=0: 0.5)
    assert _speed_agent(tmp_path)._measured_speed("cpu") == 0.5
