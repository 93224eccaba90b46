"""Multi-worker jobs on a real multi-node Ray cluster (loopback raylets, gloo, Ray Train).

Each raylet is a simulated donor with one CPU; the job's payload carries the model and data as
bytes (no path of the head), and every worker materialises them into its own temporary folder.
The reference is a 1-worker `train()` with the same spec (effective batch, seed) in this
process: the 2-worker job, the 3-worker job on mixed cards, and the job that loses a node
mid-run must all end with its adapter, to float tolerance.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

GiB = 1024**3
MiB = 1024**2


def _spec_fields(model_dir: Path, **kw: Any) -> dict[str, Any]:
    base = {"base_model": str(model_dir), "base_model_id": "tiny-llama", "device": "cpu",
            "max_seq_len": 64, "batch_size": 8, "micro_batch_size": 4, "learning_rate": 5e-3,
            "warmup_ratio": 0.1, "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "seed": 11, "optimizer": "adamw", "n_epochs": 1, "checkpoint_every": 2}
    base.update(kw)
    return base


def _weights(files: dict[str, bytes]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(files["adapter_model.safetensors"])


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.fixture(scope="module")
def pool(tmp_path_factory, tiny_model_dir, toy_data) -> Any:
    import ray
    from ray.cluster_utils import Cluster

    from lorapool.service.pool.transfer import read_folder
    from lorapool.service.server import _keep_loopback_addresses
    from lorapool.service.train import TrainSpec, train

    root = tmp_path_factory.mktemp("dist-pool")
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1") for _ in range(3)]
    cluster.wait_for_nodes()
    _keep_loopback_addresses()  # every raylet listens on 127.0.0.1 only
    ray.init(address=cluster.address, log_to_driver=False)
    data = toy_data.write_jsonl(root / "train.jsonl", toy_data.chat_records(40, answer=None))
    fields = _spec_fields(tiny_model_dir)
    # The 1-worker reference, in this process.
    ref = train(TrainSpec(**fields), data, root / "ref", cache_dir=root / "cache")
    assert ref.status == "completed" and ref.total_steps == 5
    payload = {
        "spec": {k: v for k, v in fields.items() if k != "base_model"},
        "model": {"key": "tiny-llama", "files": read_folder(tiny_model_dir)},
        "data": {"key": "train-40", "files": read_folder(data), "entry": data.name},
        "device_kind": "cpu",
    }
    ref_weights = _weights(read_folder(ref.adapter_dir))
    try:
        yield {"cluster": cluster, "nodes": nodes, "payload": payload, "ref": ref_weights,
               "fields": fields, "model_dir": str(tiny_model_dir), "root": root}
    finally:
        ray.shutdown()
        cluster.shutdown()


def _runner(job_id: str, candidates: list[dict[str, Any]], **kw: Any) -> Any:
    """On the head (this driver's node), as the scheduler starts it: a removed donor must not
    take the runner with it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from lorapool.service.pool.distributed import RemoteDistributedJobRunner

    head = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return RemoteDistributedJobRunner.options(scheduling_strategy=head).remote(
        job_id, candidates=candidates, cpu_threads=1, wait_for_nodes_s=20, **kw)


def _events(items: list[Any]) -> list[dict[str, Any]]:
    """The drained RunnerItems' events, as dicts."""
    return [i.event.to_wire() for i in items]


def test_two_workers_end_with_the_one_worker_adapter(pool):
    import ray

    nodes = pool["nodes"]
    runner = _runner("ftjob-two", [{"node_id": n.node_id, "name": f"desk{i}"}
                                   for i, n in enumerate(nodes[:2])], workers=2)
    result = ray.get(runner.run.remote(pool["payload"]), timeout=600)
    assert result.status == "completed", result
    _assert_same(_weights(result.adapter_files), pool["ref"])
    assert sorted(w["node_id"] for w in result.workers) == sorted(n.node_id for n in nodes[:2])
    assert [w["rows_per_step"] for w in result.workers] == [4, 4]
    events = _events(ray.get(runner.drain.remote()))
    assert any(e["message"].startswith("starting: 2 worker(s)") for e in events)
    # Checkpoints came back through Ray as files (no shared disk), from rank 0 only.
    assert [e["step"] for e in events if e["type"] == "checkpoint"] == [2, 4]
    assert [e["step"] for e in events if e["type"] == "step"] == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_mixed_cards_each_get_their_own_micro_batch(pool):
    """Three simulated cards of different free memory and speed: each worker's micro-batch is
    the largest that fits its card, rows follow speed, and the adapter is still the same."""
    import ray

    from lorapool.service.pool.distributed_plan import Candidate, fit_micro_batch
    from lorapool.service.train import DeviceInfo, TrainSpec
    from lorapool.service.train.memory import estimate_memory

    spec = TrainSpec(**pool["fields"])
    cuda = spec.model_copy(update={"device": "auto"})
    probe = DeviceInfo(kind="cuda", name="probe", total_memory=24 * GiB, free_memory=24 * GiB)
    need = {m: estimate_memory(cuda.model_copy(update={"micro_batch_size": m}), probe).total
            for m in (1, 2, 4)}
    cards = [  # (name, free memory that fits exactly this micro-batch, speed)
        ("rtx-4090", need[4], 4.0), ("rtx-3060", need[2], 2.0),
        ("gtx-1650", need[1], 2.0)]
    cands = []
    for node, (name, free, speed) in zip(pool["nodes"], cards):
        dev = DeviceInfo(kind="cuda", name=name, total_memory=free + GiB, free_memory=free)
        cands.append({"node_id": node.node_id, "name": name, "device": dev, "speed": speed})
    expected = {c["node_id"]: fit_micro_batch(spec, Candidate(**c).device) for c in cands}
    assert sorted(expected.values()) == [1, 2, 4]
    runner = _runner("ftjob-mixed", cands, workers=3, estimate_base_model=pool["model_dir"])
    result = ray.get(runner.run.remote(pool["payload"]), timeout=600)
    assert result.status == "completed", result
    got = {w["node_id"]: w for w in result.workers}
    assert {nid: w["micro_batch_size"] for nid, w in got.items()} == expected
    # Rows follow speed 4:2:2 of each step's 8.
    speed = {c["node_id"]: c["speed"] for c in cands}
    assert {nid: w["rows_per_step"] for nid, w in got.items()} == {
        nid: int(8 * s / 8) for nid, s in speed.items()}
    _assert_same(_weights(result.adapter_files), pool["ref"])


@pytest.mark.slow
def test_losing_a_node_mid_run_finishes_on_the_other_with_the_same_adapter(pool):
    """Run on two nodes, freeze at step 3 (after the step-2 checkpoint), kill the second
    node's raylet, and let the job go on: it restarts from step 2 on the surviving node alone
    (min_workers 1) and ends with the 1-worker adapter."""
    import ray

    cluster, nodes = pool["cluster"], pool["nodes"]
    victim = nodes[2]  # the mixed-cards test may have used it: it is idle again now
    cands = [{"node_id": n.node_id, "name": f"desk{i}"} for i, n in
             ((0, nodes[0]), (2, victim))]
    runner = _runner("ftjob-elastic", cands, workers=2, min_workers=1)
    ray.get(runner.hold_at_step.remote(3))
    ref = runner.run.remote(pool["payload"])
    deadline = time.monotonic() + 300
    while not ray.get(runner.held.remote()):
        assert time.monotonic() < deadline, "the run never reached step 3"
        time.sleep(0.2)
    cluster.remove_node(victim)
    ray.get(runner.release.remote())
    result = ray.get(ref, timeout=600)
    assert result.status == "completed", result
    assert [w["node_id"] for w in result.workers] == [nodes[0].node_id]
    _assert_same(_weights(result.adapter_files), pool["ref"])
    events = _events(ray.get(runner.drain.remote()))
    messages = [e["message"] for e in events if e["type"] == "status"]
    assert any(m.startswith("worker lost") and "checkpoint step 2" in m for m in messages)
    assert any(m.startswith("shrinking: 1 worker(s) of 2") for m in messages)


def _agents(pool: Any, idx: list[int], prefix: str) -> list[tuple[str, Any, Any]]:
    """A CPU-only NodeAgent on each of the pool's nodes `idx`: (name, node, handle)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from lorapool.service.pool.agent import NAMESPACE, AgentConfig, RemoteNodeAgent, agent_name

    out = []
    for i in idx:
        node = pool["nodes"][i]
        name = f"{prefix}{i}"
        handle = RemoteNodeAgent.options(
            name=agent_name(name), namespace=NAMESPACE,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False),
        ).remote(AgentConfig(name=name, work_dir=str(pool["root"] / name), cpu_only=True))
        out.append((name, node, handle))
    return out


def _candidates(agents: list[tuple[str, Any, Any]]) -> list[dict[str, Any]]:
    """As the scheduler builds them: each node's agent and its reported device."""
    import ray

    from lorapool.service.pool.agent import agent_name
    from lorapool.service.train.spec import DeviceInfo

    return [{"node_id": node.node_id, "name": name, "agent": agent_name(name),
             "device": DeviceInfo(**ray.get(handle.report.remote())["device"])}
            for name, node, handle in agents]


def _wait_held(runner: Any) -> None:
    import ray

    deadline = time.monotonic() + 300
    while not ray.get(runner.held.remote()):
        assert time.monotonic() < deadline, "the run never reached the held step"
        time.sleep(0.2)


def test_every_worker_node_reserves_the_job_while_it_runs(pool):
    """Each worker's node (not only the scheduler's) lists the job, holds its reservation and
    knows its worker's pid, so nothing else is placed into that memory; all of it is given
    back when the job ends."""
    import ray

    agents = _agents(pool, [0, 1], "resv")
    runner = _runner("ftjob-reserve", _candidates(agents), workers=2,
                     estimate_base_model=pool["model_dir"])
    ray.get(runner.hold_at_step.remote(2))
    ref = runner.run.remote(pool["payload"])
    _wait_held(runner)
    workers = {w["node_id"]: w for w in ray.get(runner.workers_now.remote())}
    for name, node, handle in agents:
        report = ray.get(handle.report.remote())
        assert report["jobs"] == ["ftjob-reserve"], (name, report["jobs"])
        assert report["reserved_memory"] > 0
        assert node.node_id in workers
    ray.get(runner.release.remote())
    result = ray.get(ref, timeout=600)
    assert result.status == "completed", result
    _assert_same(_weights(result.adapter_files), pool["ref"])
    for name, _, handle in agents:
        report = ray.get(handle.report.remote())
        assert report["jobs"] == [] and report["reserved_memory"] == 0, name
    for _, _, handle in agents:
        ray.kill(handle)


@pytest.mark.slow
def test_a_reclaimed_worker_node_is_dropped_and_the_job_goes_on(pool):
    """The owner of the second worker's node takes it back mid-run: its agent asks the job to
    stop there; the job checkpoints, goes on with the first worker alone (min_workers 1) and
    ends with the 1-worker adapter; the reclaimed node's reservation is given back."""
    import ray

    agents = _agents(pool, [0, 1], "recl")
    runner = _runner("ftjob-reclaim", _candidates(agents), workers=2, min_workers=1,
                     estimate_base_model=pool["model_dir"])
    ray.get(runner.hold_at_step.remote(3))
    ref = runner.run.remote(pool["payload"])
    _wait_held(runner)
    _, _, owner_node = agents[1]
    assert ray.get(owner_node.reclaim.remote("owner back")) == ["ftjob-reclaim"]
    ray.get(runner.release.remote())
    result = ray.get(ref, timeout=600)
    assert result.status == "completed", result
    assert [w["node_id"] for w in result.workers] == [agents[0][1].node_id]
    _assert_same(_weights(result.adapter_files), pool["ref"])
    messages = [e["message"] for e in _events(ray.get(runner.drain.remote()))
                if e["type"] == "status"]
    assert any("reclaimed by its owner" in m for m in messages), messages
    assert any(m.startswith("shrinking: 1 worker(s) of 2") for m in messages), messages
    assert ray.get(owner_node.report.remote())["jobs"] == []
    for _, _, handle in agents:
        ray.kill(handle)
