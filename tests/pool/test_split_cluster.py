"""A job too big for any single card, split over one node's GPUs, on a real Ray cluster.

`ray.cluster_utils.Cluster` on loopback: a node "duo" with two simulated 10 MiB GPUs and a node
"solo" with one. The job (an 8-layer random Llama, ~11.7 MiB on one card with the margin, ~9
MiB per GPU split) fits no single card of the pool, so it is accepted only because duo's GPUs
together hold it; the scheduler starts one runner holding both, which trains the model split
over two "cpu" devices (a simulated node trains on the CPU) through the real API, scheduler,
runner and trainer, and the job's events say so. A job that not even duo's GPUs hold is
refused at submit with the reason.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

MiB = 1024**2
CARD = 10 * MiB
# Small CUDA contexts (a real node measures its own): each GPU of a split pays one, and the
# 600 MiB constant would dwarf any model small enough to train on this CPU.
SIM = dict(total_memory=CARD, compute_capability=(8, 6), context_bytes=MiB)
SHAPE = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
             num_attention_heads=4, num_key_value_heads=2)
JOB = dict(max_seq_len=32, batch_size=2, micro_batch_size=1, n_epochs=1,
           lora={"r": 2, "alpha": 4}, extra_body={"fast": "off"})


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

    root = tmp_path_factory.mktemp("split-pool")
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    raylets = {name: cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
               for name in ("duo", "solo")}
    cluster.wait_for_nodes()
    settings = Settings.from_env(data_dir=root / "head", host="127.0.0.1", port=free_port(),
                                 ray_address=cluster.address)
    add_model(settings, "eight-layers", make_random_llama(root / "models" / "m", "tiny", **SHAPE))
    add_model(settings, "tiny-llama", make_tiny_llama(root / "models" / "tiny"))  # one card
    token = create_token(settings, "acme")

    sent, stop_recording = record_payloads()  # what travels to the nodes
    svc = Service(settings, local_node=False, executor_options={"heartbeat_timeout": 8.0})
    svc.start()
    agents = {
        "duo": start_agent(AgentConfig(
            name="duo", work_dir=str(root / "nodes" / "duo"),
            simulate_gpus=[SimulatedGPU(name=f"duo-gpu{i}", **SIM) for i in range(2)]),
            node_id=raylets["duo"].node_id),
        "solo": start_agent(AgentConfig(
            name="solo", work_dir=str(root / "nodes" / "solo"),
            simulate_gpu=SimulatedGPU(name="solo-gpu", **SIM)),
            node_id=raylets["solo"].node_id),
    }
    ray.get([a.report.remote() for a in agents.values()])
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"{a}+{a}?"}, {"role": "assistant", "content": str(2 * a)}]})
        + "\n" for a in range(4)))
    client = Client(svc.base_url, api_key=token, timeout=30)
    deadline = time.time() + 30
    while {n.name for n in client.nodes.list()} != {"duo", "solo"} and time.time() < deadline:
        time.sleep(0.3)
    try:
        yield {"svc": svc, "agents": agents, "client": client, "data": data, "sent": sent}
    finally:
        stop_recording()
        svc.stop()
        ray.shutdown()
        cluster.shutdown()


def test_the_agent_reports_each_simulated_gpu(pool):
    import ray

    report = ray.get(pool["agents"]["duo"].report.remote())
    assert [g["name"] for g in report["gpus"]] == ["duo-gpu0", "duo-gpu1"]
    assert all(g["total_memory"] == CARD and g["free_memory"] == CARD for g in report["gpus"])
    assert report["gpu_devices"] == ["cpu", "cpu"] and report["gpu_reserved"] == [0, 0]
    assert report["device"]["name"] == "duo-gpu0"  # one-card jobs still use GPU 0
    solo = ray.get(pool["agents"]["solo"].report.remote())
    assert len(solo["gpus"]) == 1 and solo["gpu_devices"] == ["cpu"]
    # GET /v1/nodes shows each GPU too, not only the one one-card jobs use.
    nodes = {n.name: n for n in pool["client"].nodes.list()}
    assert [(g.index, g.name, g.total_memory_bytes) for g in nodes["duo"].gpus] == [
        (0, "duo-gpu0", CARD), (1, "duo-gpu1", CARD)]
    assert all(g.compute_capability == "8.6" for g in nodes["duo"].gpus)
    assert [g.name for g in nodes["solo"].gpus] == ["solo-gpu"]


def test_too_big_even_split_is_refused_with_the_reason(pool):
    from lorapool.errors import BadRequestError

    with pytest.raises(BadRequestError) as err:
        pool["client"].submit("eight-layers", pool["data"],
                              **{**JOB, "max_seq_len": 2048, "micro_batch_size": 2})
    msg = str(err.value)
    assert "needs" in msg and "split over duo's 2 GPUs" in msg, msg
    assert "not split over 2 GPUs either" in msg, msg


def test_a_job_no_card_holds_runs_split_over_one_nodes_gpus(pool, monkeypatch):
    from lorapool.service.pool import scheduler

    checks = []  # the API's check and its event line share one split check
    real_check = scheduler.submit_check
    monkeypatch.setattr(scheduler, "submit_check",
                        lambda *a, **k: checks.append(1) or real_check(*a, **k))
    client = pool["client"]
    job = client.submit("eight-layers", pool["data"], **JOB)  # accepted: duo's GPUs hold it
    assert len(checks) == 1, checks
    done = client.jobs.wait(job.id, timeout=300)
    events = list(client.jobs.events(job.id))
    said = [e.message for e in events]
    assert done.status == "succeeded", (done.error, said)
    assert done.node_id == "duo"
    assert done.fine_tuned_model, "no adapter"
    # At submit: why it was accepted.
    assert any(m.startswith("Fits no single GPU of the pool; runs split over 2 GPUs of duo")
               for m in said), said
    # At placement: the split, its GPUs and layer ranges.
    placed = [e for e in events if e.message.startswith("Attempt 1 placed on duo split over 2")]
    assert placed, said
    split = placed[0].data["split"]
    assert split["gpus"] == [0, 1] and split["devices"] == ["cpu", "cpu"]
    assert sum(b - a for a, b in split["layers"]) == 8 and split["reason"]
    # The trainer ran it split: its status event, over the two "cpu" devices.
    trained = [e for e in events if not e.message.startswith("Attempt")
               and isinstance((e.data or {}).get("split"), dict)
               and e.data["split"].get("devices") == ["cpu", "cpu"]]
    assert trained, said
    # What travelled: the split for the runner, no one-card budget.
    payload = next(p for p in pool["sent"] if p.get("split"))
    assert payload["split"]["devices"] == ["cpu", "cpu"] and "memory_budget" not in payload
    assert sum(payload["split"]["layers"]) == 8


def _placed_at(client, job_id: str) -> float:
    return next(e.data["placed_at"] for e in client.jobs.events(job_id)
                if e.message.startswith("Attempt 1 placed"))


def test_a_split_waits_for_its_node_and_the_node_takes_nothing_else_meanwhile(pool):
    """A one-card job runs on duo's GPU 0: the split waits for it (and says so), and a
    one-card job submitted while the split runs there waits for the split in turn."""
    client = pool["client"]
    one_card = dict(JOB, n_epochs=4, placement={"node": "duo"})
    first = client.submit("tiny-llama", pool["data"], **one_card)
    deadline = time.time() + 120
    while client.jobs.get(first.id).status == "queued" and time.time() < deadline:
        time.sleep(0.2)
    split = client.submit("eight-layers", pool["data"], **JOB)
    while client.jobs.get(split.id).status == "queued" and time.time() < deadline:
        time.sleep(0.2)
    after = client.submit("tiny-llama", pool["data"], **one_card)
    done = {j.id: client.jobs.wait(j.id, timeout=300) for j in (first, split, after)}
    assert all(j.status == "succeeded" for j in done.values()), [j.error for j in done.values()]
    said = [e.message for e in client.jobs.events(split.id)]
    assert any("waits for duo to finish its other jobs" in m for m in said), said
    # No overlap on duo: each started after the one before it had finished.
    assert _placed_at(client, split.id) >= done[first.id].finished_at - 1
    assert _placed_at(client, after.id) >= done[split.id].finished_at - 1
