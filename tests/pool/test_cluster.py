"""The pool on a real multi-node Ray cluster on this machine.

`ray.cluster_utils.Cluster` starts several raylets on loopback; each gets a NodeAgent told its
simulated GPU (name, compute capability, total and free memory) and its own working folder.
The service joins that cluster like a production head joins donors, and jobs go through the
real HTTP API, the real scheduler and the real trainer (on the CPU).
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

GiB = 1024**3
# The sizes below are chosen against the reference path's estimate (full logits, fp32 upcasts):
# the simulated GPUs train on this CPU, and the tests are about placement, not the fast path's
# smaller numbers (tests/train/test_memory_fast.py).
REFERENCE_PATH = {"fast": "off"}
MiB = 1024**2

# name: (total, free, compute capability). Free < total: other processes hold the rest.
NODES = {
    "gtx-1650-desk1": (4 * GiB, 700 * MiB, (7, 5)),
    "rtx-3060-desk2": (12 * GiB, 1200 * MiB, (8, 6)),
    "rtx-4090-desk3": (24 * GiB, 3 * GiB, (8, 9)),
}


def _lines(n: int, seed: int = 0) -> str:
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        out.append(json.dumps({"messages": [{"role": "user", "content": f"{a}*{b}?"},
                                            {"role": "assistant", "content": str(a * b)}]}))
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Any:
    import ray
    from ray.cluster_utils import Cluster

    from lorapool import Client
    from lorapool.service.admin import add_model, create_token
    from lorapool.service.config import Settings
    from lorapool.service.pool.agent import AgentConfig, start_agent
    from lorapool.service.pool.devices import SimulatedGPU
    from lorapool.service.server import Service, free_port
    from lorapool.service.train.tiny import make_random_llama, make_tiny_llama
    from tests.support.payloads import record_payloads

    root = tmp_path_factory.mktemp("pool")
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    raylets = {name: cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1") for name in NODES}
    cluster.wait_for_nodes()

    settings = Settings.from_env(data_dir=root / "head", host="127.0.0.1", port=free_port(),
                                 ray_address=cluster.address)
    add_model(settings, "tiny-llama", make_tiny_llama(root / "models" / "tiny-llama"))
    # Llama-3.2-1B's shape, config and tokenizer only: enough to estimate, never trained here.
    add_model(settings, "big-llama",
              make_random_llama(root / "models" / "big-llama", "1b", write_weights=False))
    tokens = {t: create_token(settings, t) for t in ("acme", "globex")}

    sent, stop_recording = record_payloads()  # what travels to the nodes
    svc = Service(settings, local_node=False, executor_options={"heartbeat_timeout": 8.0})
    svc.start()
    agents = {}
    for name, (total, free, cc) in NODES.items():
        agents[name] = start_agent(AgentConfig(
            name=name, work_dir=str(root / "nodes" / name),
            simulate_gpu=SimulatedGPU(name=name, total_memory=total, free_memory=free,
                                      compute_capability=cc)),
            node_id=raylets[name].node_id)
    ray.get([a.report.remote() for a in agents.values()])
    data = root / "train.jsonl"
    data.write_text(_lines(24))
    try:
        yield {"svc": svc, "cluster": cluster, "raylets": raylets, "agents": agents,
               "tokens": tokens, "root": root, "data": data, "sent": sent,
               "client": lambda t="acme": Client(svc.base_url, api_key=tokens[t], timeout=30)}
    finally:
        stop_recording()
        svc.stop()
        ray.shutdown()
        cluster.shutdown()


def _wait_idle(client, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        nodes = client.nodes.list()
        if all(not n.jobs and not n.reserved_memory_bytes for n in nodes):
            return
        time.sleep(0.3)
    raise AssertionError(f"nodes still busy: {[(n.name, n.jobs) for n in nodes]}")


def _wait_all(client, ids, timeout=600):
    return [client.jobs.wait(i, timeout=timeout) for i in ids]


def test_nodes_are_visible_with_their_simulated_gpus(pool):
    client = pool["client"]()
    deadline = time.time() + 30
    while time.time() < deadline:
        nodes = {n.name: n for n in client.nodes.list()}
        if set(NODES) <= set(nodes):
            break
        time.sleep(0.5)
    assert set(NODES) <= set(nodes)
    n = nodes["rtx-3060-desk2"]
    assert n.gpu_name == "rtx-3060-desk2" and n.total_memory_bytes == 12 * GiB
    assert n.compute_capability == "8.6" and n.bf16 and n.state in ("idle", "training")
    assert not nodes["gtx-1650-desk1"].bf16


def test_job_too_big_for_every_node_is_refused_with_the_numbers(pool):
    from lorapool.errors import BadRequestError

    client = pool["client"]()
    with pytest.raises(BadRequestError) as err:
        # Even at micro-batch 1 its logits alone (32768 x 128256 vocab) exceed the 4090's 24 GiB.
        client.submit("big-llama", pool["data"], max_seq_len=32768, micro_batch_size=8,
                      batch_size=8, extra_body=REFERENCE_PATH)
    msg = str(err.value)
    assert "needs" in msg and "GiB" in msg and "rtx-4090-desk3" in msg, msg
    assert "micro_batch_size 1" in msg, msg  # auto-fit was tried before refusing
    assert all(j.model != "big-llama" for j in client.jobs.list(limit=100).data)


def test_jobs_land_only_where_they_fit_and_nothing_names_head_paths(pool):
    client = pool["client"]()
    small = client.submit("tiny-llama", pool["data"], max_seq_len=64, batch_size=4,
                          micro_batch_size=4, lora={"r": 2, "alpha": 4})
    done = _wait_all(client, [small.id])
    assert done[0].status == "succeeded", done[0].error
    # Every node the job could have used had its free memory ≥ the predicted peak.
    job = done[0]
    total, free, _ = NODES[job.node_id]
    assert job.memory.predicted_bytes and job.memory.predicted_bytes <= free
    # Best fit: the smallest node that holds it.
    fitting = [n for n, (_, f, _) in NODES.items() if f >= job.memory.predicted_bytes * 1.1]
    assert job.node_id == min(fitting, key=lambda n: NODES[n][1])

    head_dir = str(pool["svc"].settings.data_dir)

    def strings(obj):
        if isinstance(obj, str):
            yield obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                yield from strings(k)
                yield from strings(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                yield from strings(v)

    assert pool["sent"], "the scheduler sent nothing"
    for payload in pool["sent"]:
        leaked = [s for s in strings(payload) if head_dir in s or str(pool["root"]) in s]
        assert not leaked, f"head paths sent to a node: {leaked}"
    # The reservation travels with the job, so the trainer keeps within it.
    assert pool["sent"][-1]["memory_budget"]["total"] == job.memory.predicted_bytes
    # The node materialised its own copy of the model in its own folder, by content hash.
    node_cache = pool["root"] / "nodes" / job.node_id / "cache" / "models"
    assert any(p.is_dir() for p in node_cache.iterdir())
    # Its agent reports that copy, and the scheduler's view of the node carries it: placement
    # sends the next job of this model where no transfer is needed.
    import ray

    sha = pool["svc"].store.get_model("tiny-llama").sha256
    assert sha in ray.get(pool["agents"][job.node_id].report.remote())["cached_models"]
    ex = pool["svc"].executor
    ex.registry.refresh(force=True)
    views = {v.name: v for v in ex._node_views(include_busy=True)}
    assert sha in views[job.node_id].cached_models


def test_best_fit_runs_a_mixed_queue_at_once(pool):
    """Two small jobs and a big one arrive together. Best fit puts each small job on the
    smallest node that holds it, which keeps the 4090 free for the big one: all three run at
    once. (First fit would put a small job on the big node and make the big one wait;
    bench/placement.py measures that on a 50-node pool.)"""
    client = pool["client"]()
    small = dict(max_seq_len=64, batch_size=4, micro_batch_size=4, lora={"r": 2, "alpha": 4},
                 n_epochs=6, extra_body=REFERENCE_PATH)
    # ~1.8 GiB at micro-batch 2: only the 4090 (3 GiB free) holds it; no auto-fit allowed.
    big = dict(max_seq_len=16384, batch_size=4, micro_batch_size=2, lora={"r": 2, "alpha": 4},
               n_epochs=6, placement={"allow_autofit": False}, extra_body=REFERENCE_PATH)
    _wait_idle(client)  # the last test's job may still hold its node for a heartbeat
    ids = [client.submit("tiny-llama", pool["data"], **small).id,
           client.submit("tiny-llama", pool["data"], **small).id,
           client.submit("tiny-llama", pool["data"], **big).id]
    done = _wait_all(client, ids)
    assert all(j.status == "succeeded" for j in done), [(j.id, j.error) for j in done]
    assert {done[0].node_id, done[1].node_id} == {"gtx-1650-desk1", "rtx-3060-desk2"}
    assert done[2].node_id == "rtx-4090-desk3"
    # None waited for another: every placement came before the first job finished.
    first_end = min(j.finished_at for j in done)
    assert max(_placed_at(client, i) for i in ids) <= first_end


def test_auto_fit_shrinks_micro_batch_instead_of_refusing(pool):
    client = pool["client"]()
    # As submitted it needs ~5.5 GiB at micro-batch 8; no node has that much free (the 4090
    # has 3 GiB), but it fits at a smaller micro-batch with the same effective batch.
    job = client.submit("tiny-llama", pool["data"], max_seq_len=16384, batch_size=8,
                        micro_batch_size=8, lora={"r": 2, "alpha": 4}, n_epochs=1,
                        extra_body=REFERENCE_PATH)
    job = client.jobs.wait(job.id, timeout=600)
    assert job.status == "succeeded", job.error
    assert job.micro_batch_size is None or job.micro_batch_size <= 8
    events = [e.message for e in client.jobs.events(job.id)]
    assert any(m.startswith("Auto-fit:") and "micro_batch_size" in m for m in events), events


def test_constraints_pin_a_node_require_bf16_and_refuse_unknown_labels(pool):
    from lorapool.errors import BadRequestError

    client = pool["client"]()
    kw = dict(max_seq_len=64, batch_size=4, micro_batch_size=4, lora={"r": 2, "alpha": 4},
              extra_body=REFERENCE_PATH)
    _wait_idle(client)  # an earlier test's job may still hold a node for a heartbeat
    # Best fit alone would put both on the 1650 (the smallest node that holds them).
    pinned = client.submit("tiny-llama", pool["data"], placement={"node": "rtx-4090-desk3"}, **kw)
    bf16 = client.submit("tiny-llama", pool["data"], placement={"require_bf16": True}, **kw)
    with pytest.raises(BadRequestError) as err:
        client.submit("tiny-llama", pool["data"], placement={"labels": {"dept": "legal"}}, **kw)
    assert "no node matches" in str(err.value) and "dept=legal" in str(err.value)
    done = _wait_all(client, [pinned.id, bf16.id])
    assert [j.status for j in done] == ["succeeded", "succeeded"], [j.error for j in done]
    assert done[0].node_id == "rtx-4090-desk3"
    assert done[1].node_id == "rtx-3060-desk2"  # the smallest bf16 node


def test_owner_returns_node_stops_taking_jobs_and_job_moves(pool):
    import ray

    client = pool["client"]()
    # Only the 4090 holds this one (its estimate is over the 3060's free memory).
    job = client.submit("tiny-llama", pool["data"], max_seq_len=64, batch_size=2,
                        micro_batch_size=2, n_epochs=30, checkpoint_every=2,
                        lora={"r": 2, "alpha": 4})
    deadline = time.time() + 300
    while time.time() < deadline:
        job = client.jobs.get(job.id)
        if job.status == "running" and (job.step or 0) >= 3:
            break
        time.sleep(0.3)
    first_node = job.node_id
    assert job.status == "running"
    ray.get(pool["agents"][first_node].reclaim.remote("owner is back"))
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            job = client.jobs.get(job.id)
            if job.node_id and job.node_id != first_node:
                break
            time.sleep(0.3)
        events = [e.message for e in client.jobs.events(job.id)]
        assert any("owner is back" in m and "requeued" in m for m in events), events
        # The node list is refreshed from the agents' heartbeats: give it one or two.
        deadline = time.time() + 15
        while time.time() < deadline:
            nodes = {n.name: n for n in client.nodes.list()}
            if nodes[first_node].state == "reclaimed":
                break
            time.sleep(0.3)
        assert nodes[first_node].state == "reclaimed"
        assert not nodes[first_node].jobs
        client.jobs.cancel(job.id)
        client.jobs.wait(job.id, timeout=300)
    finally:
        ray.get(pool["agents"][first_node].release.remote())


def _placed_at(client, job_id: str) -> float:
    """When the job's first attempt was placed, to the microsecond (event times are whole
    seconds: a burst places several jobs within one)."""
    for e in client.jobs.events(job_id):  # oldest first
        if "placed on" in e.message:
            return float((e.data or {}).get("placed_at", e.created_at))
    return float("inf")


def test_flooded_tenant_does_not_starve_another(pool):
    acme, globex = pool["client"]("acme"), pool["client"]("globex")
    kw = dict(max_seq_len=64, batch_size=4, micro_batch_size=4, lora={"r": 2, "alpha": 4})
    flood = [acme.submit("tiny-llama", pool["data"], **kw).id for _ in range(8)]
    other = globex.submit("tiny-llama", pool["data"], **kw).id
    done = _wait_all(globex, [other]) + _wait_all(acme, flood)
    assert all(j.status == "succeeded" for j in done), [(j.id, j.status, j.error) for j in done]
    mine = _placed_at(globex, other)
    placed = sorted([_placed_at(acme, j) for j in flood] + [mine])
    # Placements come in waves: all that fit at once, then more each time a job ends (jobs run
    # for seconds; a wave is placed within a fraction of one). globex arrived last but must not
    # wait behind acme's queue: it goes in the first wave, or first in the wave after it.
    waves: list[list[float]] = [[placed[0]]]
    for t in placed[1:]:
        if t - waves[-1][-1] >= 2.0:
            waves.append([])
        waves[-1].append(t)
    assert len(waves) > 1, f"every job fit at once: the pool is too big to test fairness {placed}"
    wave = next(w for w in waves if mine in w)
    assert wave is waves[0] or wave[0] == mine, (mine, waves)


def test_dead_node_jobs_do_not_stay_running(pool):
    """Runs last: it takes a raylet away for good."""
    client = pool["client"]()
    job = client.submit("tiny-llama", pool["data"], max_seq_len=64, batch_size=2,
                        micro_batch_size=2, n_epochs=40, checkpoint_every=2,
                        lora={"r": 2, "alpha": 4})
    deadline = time.time() + 300
    while time.time() < deadline:
        job = client.jobs.get(job.id)
        if job.status == "running" and (job.step or 0) >= 2:
            break
        time.sleep(0.3)
    assert job.status == "running"
    dead = job.node_id
    pool["cluster"].remove_node(pool["raylets"][dead], allow_graceful=False)
    deadline = time.time() + 90
    while time.time() < deadline:
        job = client.jobs.get(job.id)
        if not (job.status == "running" and job.node_id == dead):
            break
        time.sleep(0.5)
    assert not (job.status == "running" and job.node_id == dead), "job stuck on a dead node"
    events = [e.message for e in client.jobs.events(job.id)]
    assert any(dead in m and "requeued" in m for m in events), events
    nodes = {n.name: n for n in client.nodes.list()}
    deadline = time.time() + 30
    while nodes[dead].state != "offline" and time.time() < deadline:
        time.sleep(1)
        nodes = {n.name: n for n in client.nodes.list()}
    assert nodes[dead].state == "offline"
    client.jobs.cancel(job.id)
    assert client.jobs.wait(job.id, timeout=300).status == "cancelled"
