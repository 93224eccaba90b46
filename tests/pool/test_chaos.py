"""Chaos on a real multi-node Ray cluster: jobs survive dead nodes, reclaimed GPUs, a SIGKILLed
server and a full artifact disk.

`lorapool serve` runs as its own process (so it can be SIGKILLed) and joins a
`ray.cluster_utils.Cluster` of four donor raylets on loopback, each with a NodeAgent and its own
working folder. Every job here trains the same tiny model on the same data with the same seed,
so each must end with the adapter an uninterrupted run of that spec produces in this process
(the trainer's resume contract, across machines).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

GiB = 1024**3
DONORS = ["desk-a", "desk-b", "desk-c", "desk-d"]
JOB = dict(max_seq_len=64, batch_size=2, micro_batch_size=2, n_epochs=12, checkpoint_every=5,
           lora={"r": 2, "alpha": 4}, seed=11)


def _lines(n: int) -> str:
    import random

    rng = random.Random(3)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        rows.append(json.dumps({"messages": [{"role": "user", "content": f"{a}*{b}?"},
                                             {"role": "assistant", "content": str(a * b)}]}))
    return "\n".join(rows) + "\n"


class Server:
    """`lorapool serve --ray-address …` in a child process that tests may kill."""

    def __init__(self, data_dir: Path, artifacts: Path, address: str, port: int) -> None:
        self.args = [sys.executable, "-m", "lorapool.cli", "serve", "--data-dir", str(data_dir),
                     "--port", str(port), "--ray-address", address]
        self.env = {**os.environ, "LORAPOOL_ARTIFACTS_DIR": str(artifacts),
                    "LORAPOOL_HEARTBEAT_TIMEOUT": "6", "LORAPOOL_PREEMPT_TIMEOUT": "10",
                    "RAY_USAGE_STATS_ENABLED": "0"}
        self.log = data_dir / "serve.log"
        self.proc: subprocess.Popen | None = None

    def start(self, client: Any) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=log)
        deadline = time.time() + 90
        while time.time() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                client.models.list()
                return
            except Exception:
                time.sleep(0.3)
        raise AssertionError("server did not come up:\n" + self.log.read_text()[-3000:])

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Any:
    import ray
    from ray.cluster_utils import Cluster

    from lorapool import Client
    from lorapool.service.admin import add_model, create_token
    from lorapool.service.config import Settings
    from lorapool.service.pool.agent import AgentConfig, start_agent
    from lorapool.service.pool.devices import SimulatedGPU
    from lorapool.service.server import _keep_loopback_addresses, free_port
    from lorapool.service.train.tiny import make_tiny_llama
    from tests.support.small_disk import mount_small_disk, unmount

    root = tmp_path_factory.mktemp("chaos")
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    raylets = {n: cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1") for n in DONORS}
    cluster.wait_for_nodes()
    _keep_loopback_addresses()
    ray.init(address=cluster.address, namespace="lorapool", log_to_driver=False)
    agents = {n: start_agent(AgentConfig(
        name=n, work_dir=str(root / "nodes" / n),
        simulate_gpu=SimulatedGPU(name=f"rtx-3060 ({n})", total_memory=12 * GiB,
                                  free_memory=8 * GiB, compute_capability=(8, 6))),
        node_id=raylets[n].node_id) for n in DONORS}
    ray.get([a.report.remote() for a in agents.values()])

    # The artifact store on a small disk of its own, so one test can fill it; where mounting is
    # not permitted, a plain folder (and that one test is skipped).
    disk = root / "artifact-disk"
    no_mount = mount_small_disk(disk, "32m")
    try:
        data_dir = root / "head"
        settings = Settings.from_env(data_dir=data_dir, artifacts_dir=disk / "artifacts",
                                     host="127.0.0.1", port=free_port())
        model = make_tiny_llama(root / "models" / "tiny-llama")
        add_model(settings, "tiny-llama", model)
        token = create_token(settings, "acme")
        client = Client(f"http://127.0.0.1:{settings.port}", api_key=token, timeout=30)
        server = Server(data_dir, disk / "artifacts", cluster.address, settings.port)
        server.start(client)
        data = root / "train.jsonl"
        data.write_text(_lines(20))
        try:
            yield {"cluster": cluster, "raylets": raylets, "agents": agents, "server": server,
                   "client": client, "settings": settings, "model": model, "data": data,
                   "disk": disk, "no_mount": no_mount, "root": root}
        finally:
            server.stop()
    finally:
        ray.shutdown()
        cluster.shutdown()
        if no_mount is None:
            unmount(disk)


@pytest.fixture(scope="module")
def reference(pool) -> dict[str, Any]:
    """The adapter an uninterrupted run of JOB's spec produces (trained here, in-process)."""
    from safetensors.torch import load_file

    from lorapool.service.api.job_request import CreateJobRequest, resolve
    from lorapool.service.store import Store
    from lorapool.service.train import train

    store = Store(pool["settings"].database_url)
    try:
        entry = store.get_model("tiny-llama")
    finally:
        store.close()
    body = {k: v for k, v in JOB.items() if k not in ("n_epochs", "batch_size")}
    req = CreateJobRequest(model="tiny-llama", training_file="file-x",
                           hyperparameters={"n_epochs": JOB["n_epochs"],
                                            "batch_size": JOB["batch_size"]}, **body)
    spec, _ = resolve(req, entry)
    spec = spec.model_copy(update={"device": "cpu"})
    result = train(spec, pool["data"], pool["root"] / "reference")
    return load_file(result.adapter_dir / "adapter_model.safetensors")


def _start_and_reach(client, data, step: int) -> Any:
    job = client.submit("tiny-llama", data, **JOB)
    deadline = time.time() + 180
    while time.time() < deadline:
        job = client.jobs.get(job.id)
        if job.status == "running" and (job.step or 0) >= step:
            return job
        assert job.status in ("queued", "running"), (job.status, job.error)
        time.sleep(0.1)
    raise AssertionError(f"job never reached step {step}: {job}")


def _assert_same_adapter(client, job, reference, dest: Path) -> None:
    import torch
    from safetensors.torch import load_file

    assert job.status == "succeeded", job.error
    folder = client.adapters.download(job.fine_tuned_model, dest)
    got = load_file(folder / "adapter_model.safetensors")
    assert set(got) == set(reference)
    for name, t in reference.items():
        torch.testing.assert_close(got[name], t, rtol=1e-4, atol=1e-6, msg=name)


def _steps(msgs: list[str]) -> list[int]:
    return [int(m.split("/")[0].removeprefix("Step ")) for m in msgs if m.startswith("Step ")]


def _messages(client, job_id) -> list[str]:
    return [e.message for e in client.jobs.events(job_id)]  # oldest first


def test_killed_raylet_job_finishes_elsewhere_from_its_checkpoint(pool, reference, tmp_path):
    client = pool["client"]
    job = _start_and_reach(client, pool["data"], 12)
    dead = job.node_id
    pool["cluster"].remove_node(pool["raylets"].pop(dead), allow_graceful=False)
    job = client.jobs.wait(job.id, timeout=300, poll_interval=0.5)
    assert job.node_id != dead
    msgs = _messages(client, job.id)
    requeued = [m for m in msgs if "requeued from the last checkpoint" in m]
    assert requeued and dead in requeued[0], msgs
    resumed = [m for m in msgs if "resuming from step" in m]
    assert resumed, msgs
    step = int(resumed[0].split("resuming from step ")[1].split()[0].rstrip(";"))
    assert step >= 10 and step % 5 == 0, resumed  # step 12 was reached: checkpoint 10 exists
    # The gap: the dead attempt got to `before`; the next one starts again at step + 1.
    cut = msgs.index(requeued[0])
    before = max(_steps(msgs[:cut]))
    after = _steps(msgs[cut:])
    assert before >= step and min(after) == step + 1, (before, step, after[:3])
    _assert_same_adapter(client, job, reference, tmp_path / "a")


def test_reclaimed_donor_job_moves_and_ends_the_same(pool, reference, tmp_path):
    import ray

    client = pool["client"]
    job = _start_and_reach(client, pool["data"], 8)
    first = job.node_id
    ray.get(pool["agents"][first].reclaim.remote("owner is back"))
    try:
        job = client.jobs.wait(job.id, timeout=300, poll_interval=0.5)
        msgs = _messages(client, job.id)
        assert any("owner is back" in m and "requeued" in m for m in msgs), msgs
        assert job.node_id != first
        _assert_same_adapter(client, job, reference, tmp_path / "a")
    finally:
        ray.get(pool["agents"][first].release.remote())


def test_sigkilled_server_restarts_and_loses_nothing(pool, reference, tmp_path):
    from ray.util import list_named_actors

    client = pool["client"]
    files_before = {f.id for f in client.files.list().data}
    adapters_before = {a.id for a in client.adapters.list()}
    job = _start_and_reach(client, pool["data"], 12)
    pool["server"].kill()
    pool["server"].start(client)
    job = client.jobs.wait(job.id, timeout=300, poll_interval=0.5)
    msgs = _messages(client, job.id)
    assert any("service restarted" in m for m in msgs), msgs
    # No second runner ever: one named actor per job, and one placement per attempt.
    runners = [a for a in list_named_actors(all_namespaces=True)
               if a["name"] == f"lorapool-job:{job.id}"]
    assert len(runners) <= 1
    placed = [m for m in msgs if " placed on " in m]
    assert len(placed) == len({m.split(" placed on ")[0] for m in placed}), placed
    _assert_same_adapter(client, job, reference, tmp_path / "a")
    assert files_before <= {f.id for f in client.files.list().data}
    assert adapters_before <= {a.id for a in client.adapters.list()}


def test_full_artifact_disk_skips_a_checkpoint_and_keeps_the_older_ones(pool, tmp_path):
    from lorapool.service.artifacts import ArtifactStore
    from tests.support.small_disk import fill

    if pool["no_mount"] is not None:
        pytest.skip(f"no size-limited disk to fill here: {pool['no_mount']}")
    client = pool["client"]
    job = _start_and_reach(client, pool["data"], 6)
    filler = fill(pool["disk"], leave=4096)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            msgs = _messages(client, job.id)
            if any("could not be stored" in m for m in msgs):
                break
            assert client.jobs.get(job.id).status == "running", msgs
            time.sleep(0.2)
        assert any("could not be stored" in m and "full" in m for m in msgs), msgs
        checkpoints = client.jobs.checkpoints(job.id)
        assert checkpoints, "the older checkpoint is gone"
        store = ArtifactStore(pool["disk"] / "artifacts")
        for obj in (store.objects_dir).rglob("*"):
            if obj.is_file():
                assert store.verify("sha256:" + obj.parent.name + obj.name), obj
    finally:
        filler.unlink()
    job = client.jobs.wait(job.id, timeout=300, poll_interval=0.5)
    assert job.status == "succeeded", job.error
    ckpt = client.jobs.download_checkpoint(job.id, checkpoints[0].id, tmp_path / "ckpt")
    assert (ckpt / "adapter_model.safetensors").is_file()
