"""Node-local data sets and federated rounds on a real multi-node Ray cluster on this machine.

Three departments each donate one node (`ray.cluster_utils.Cluster`, raylets on 127.0.0.1,
each NodeAgent with its own working folder and a simulated GPU, i.e. training on the CPU) and
offer their own data set from that node's folder (`AgentConfig.datasets`, what
`lorapool donate --dataset NAME=PATH` sets). The service joins the cluster like a production
head. Jobs and federations go through the real HTTP API, scheduler, driver and trainer.

Afterwards the server's whole data folder (SQLite file and artifact store, every file as
bytes) must hold no distinctive line of any department's data, and the final global adapter
must lower every department's held-out loss below the base model's.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(420)]

GiB = 1024**3
# department → (node, answer every question of theirs gets, a marker only their data holds)
DEPARTMENTS = {
    "sales": ("dept-sales-node", "yes", "SALESLEDGER-QX7"),
    "support": ("dept-support-node", "no", "TICKETVAULT-ZK2"),
    "legal": ("dept-legal-node", "maybe", "CASEFILE-MW9"),
}
WORDS = ["cat", "sun", "map", "red", "box", "sky", "pen", "cup"]


def _records(dept: str, n: int, seed: int) -> list[dict]:
    _, answer, marker = DEPARTMENTS[dept]
    rng = random.Random(seed)
    return [{"messages": [
        {"role": "user", "content": f"{marker} {rng.choice(WORDS)} {rng.choice(WORDS)} #{i}"},
        {"role": "assistant", "content": answer}]} for i in range(n)]


def _write(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


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
    from lorapool.service.train.tiny import make_tiny_llama

    root = tmp_path_factory.mktemp("fed")
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    raylets = {node: cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
               for node, _, _ in DEPARTMENTS.values()}
    cluster.wait_for_nodes()
    settings = Settings.from_env(data_dir=root / "head", host="127.0.0.1", port=free_port(),
                                 ray_address=cluster.address)
    model_dir = make_tiny_llama(root / "models" / "tiny-llama")
    add_model(settings, "tiny-llama", model_dir)
    tokens = {t: create_token(settings, t) for t in ("hq", "globex")}
    svc = Service(settings, local_node=False)
    svc.start()
    heldout, agents = {}, {}
    for dept, (node, _, _) in DEPARTMENTS.items():
        folder = root / "nodes" / node  # the node's own folder; the head never reads it
        datasets = {dept: str(_write(folder / "data" / f"{dept}.jsonl", _records(dept, 24, 1)))}
        heldout[dept] = _write(root / "heldout" / f"{dept}.jsonl", _records(dept, 8, 99))
        if dept == "legal":
            bad = [json.dumps(r) for r in _records("legal", 3, 5)]
            bad.insert(1, '{"messages": [{"role": "bot", "content": "CASEFILE-MW9 x"}]}')
            (folder / "data" / "broken.jsonl").write_text("\n".join(bad) + "\n")
            datasets["broken"] = str(folder / "data" / "broken.jsonl")
            datasets["scratch"] = str(_write(folder / "data" / "scratch.jsonl",
                                             _records("legal", 8, 3)))
        agents[node] = start_agent(AgentConfig(
            name=node, work_dir=str(folder / "work"), datasets=datasets,
            # The donor lets the federation's tenants train on its sets; nobody else.
            dataset_tenants={name: ["hq", "globex"] for name in datasets},
            simulate_gpu=SimulatedGPU(name=node, total_memory=8 * GiB, free_memory=6 * GiB,
                                      compute_capability=(8, 6))),
            node_id=raylets[node].node_id)
    ray.get([a.report.remote() for a in agents.values()])
    client = Client(svc.base_url, api_key=tokens["hq"], timeout=30)
    deadline = time.time() + 30
    while len([n for n in client.nodes.list() if n.datasets]) < 3 and time.time() < deadline:
        time.sleep(0.3)
    try:
        yield {"svc": svc, "root": root, "client": client, "heldout": heldout,
               "model_dir": model_dir, "agents": agents,
               "other": Client(svc.base_url, api_key=tokens["globex"], timeout=30)}
    finally:
        client.close()
        svc.stop()
        ray.shutdown()
        cluster.shutdown()


KW = dict(max_seq_len=64, batch_size=4, micro_batch_size=4, learning_rate=1e-2,
          lora={"r": 4, "alpha": 8, "dropout": 0.0})


def test_nodes_list_their_data_sets_by_counts_only(pool):
    nodes = {n.name: n for n in pool["client"].nodes.list()}
    sales = {d.name: d for d in nodes["dept-sales-node"].datasets}
    assert sales["sales"].valid and sales["sales"].examples == 24 and sales["sales"].lines == 24
    legal = {d.name: d for d in nodes["dept-legal-node"].datasets}
    assert not legal["broken"].valid and any("line 2" in e for e in legal["broken"].errors)
    raw = json.dumps([n.model_dump(mode="json") for n in nodes.values()])
    assert "jsonl" not in raw and str(pool["root"]) not in raw  # no paths travel


def test_bad_or_unknown_data_sets_are_refused_naming_the_field(pool):
    from lorapool.errors import BadRequestError

    client = pool["client"]
    for ref, words in (("dept-legal-node:broken", ["line 2", "role"]),
                       ("dept-legal-node:nope", ["offers no data set 'nope'", "scratch"]),
                       ("nowhere:sales", ["no node named 'nowhere'"]),
                       ("no-colon", ["NODE:NAME"])):
        with pytest.raises(BadRequestError) as err:
            client.submit("tiny-llama", dataset=ref, **KW)
        assert err.value.param == "dataset" and all(w in str(err.value) for w in words), \
            str(err.value)
    with pytest.raises(BadRequestError) as err:
        client.submit("tiny-llama", dataset="dept-sales-node:sales",
                      placement={"node": "dept-support-node"}, **KW)
    assert err.value.param == "placement.node"


def test_a_job_on_a_node_local_data_set_runs_pinned_to_its_node(pool):
    client = pool["client"]
    job = client.submit("tiny-llama", dataset="dept-support-node:support", n_epochs=1, **KW)
    assert job.dataset == "dept-support-node:support" and job.training_file is None
    job = client.jobs.wait(job.id, timeout=120, poll_interval=0.5)
    assert job.status == "succeeded", job.error
    assert job.node_id == "dept-support-node"


def test_federated_rounds_keep_data_home_and_beat_the_base_model(pool, tmp_path):
    import shutil

    from lorapool.service.train import TrainSpec
    from lorapool.service.train.evaluation import evaluate

    client = pool["client"]
    participants = [{"name": d, "dataset": f"{node}:{d}"}
                    for d, (node, _, _) in DEPARTMENTS.items()]
    participants[2]["tenant"] = "globex"  # another tenant takes part with its node-local data
    # A fourth participant whose data set disappears from its node: it drops out every round.
    participants.append({"name": "scratch", "dataset": "dept-legal-node:scratch"})
    fed = client.federate("tiny-llama", participants, rounds=3, local_steps=4, method="exact",
                          min_quorum=3, round_deadline_s=240, **KW)
    scratch = pool["root"] / "nodes" / "dept-legal-node" / "data" / "scratch.jsonl"
    scratch.unlink()
    fed = client.federations.wait(fed.id, timeout=360, poll_interval=0.5)
    assert fed.status == "succeeded", (fed.error, [r.model_dump() for r in fed.rounds])
    assert len(fed.rounds) == 3 and fed.current_round == 3
    previous = None
    for r in fed.rounds:
        assert r.status == "completed" and r.took_part == ["sales", "support", "legal"]
        assert "dataset_not_found" in r.dropped["scratch"] or "not offered" in r.dropped["scratch"]
        assert r.init_adapter == previous  # each round starts from the last global adapter
        previous = r.global_adapter
        m = r.metrics
        assert m["merged_rank"] == 12 and m["rank"] == 4 and 0 <= m["refactor_error"] < 1
        assert sorted(m["weights"]) == ["legal", "sales", "support"]
        assert client.adapters.get(r.global_adapter).metrics["federation"] == fed.id
    assert fed.global_adapter == fed.rounds[-1].global_adapter
    # The participant tenant may read the federation; it is not in its own list.
    assert pool["other"].federations.get(fed.id).id == fed.id

    # Not one distinctive line of any department reached the server's folder.
    head = Path(pool["svc"].settings.data_dir)
    blobs = [p.read_bytes() for p in head.rglob("*") if p.is_file()]
    assert len(blobs) > 5  # the database and the stored adapters are there to search
    for dept, (_, answer, marker) in DEPARTMENTS.items():
        line = json.dumps(_records(dept, 24, 1)[0]).encode()
        for blob in blobs:
            assert marker.encode() not in blob and line not in blob, f"{dept}'s data leaked"

    # The final global adapter beats the base model on every department's held-out data.
    adapter = client.adapters.download(fed.global_adapter, tmp_path / "global")
    spec = TrainSpec(base_model=str(pool["model_dir"]), device="cpu", max_seq_len=64,
                     micro_batch_size=8, batch_size=8)
    for dept, path in pool["heldout"].items():
        base = evaluate(spec, None, path, cache_dir=tmp_path / "cache")["loss"]
        tuned = evaluate(spec, adapter, path, cache_dir=tmp_path / "cache")["loss"]
        assert tuned < base, (dept, base, tuned)
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
