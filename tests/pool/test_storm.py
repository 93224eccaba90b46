"""A storm of submits and cancels on a CPU node: slots hold, cancels land, nothing left running.

The embedded service (real Ray head on loopback, real SQLite, real HTTP through uvicorn, real
trainer) with one CPU-only node of 2 slots. Issue 12 saw 54 runners start at once on a 2-core
machine and 54 jobs stay `running` minutes after their cancel; here 40 jobs are submitted and
each cancelled right after, from several client threads at once, while a sampler counts this
service's live `JobRunner` processes (psutil, descendants of this test process only: other
Ray sessions on the machine are not ours).
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

GiB = 1024**3
SLOTS = 2
FINAL = {"cancelled", "succeeded", "failed"}


def _lines(n: int) -> str:
    return "\n".join(json.dumps({"messages": [{"role": "user", "content": f"{i}+{i}?"},
                                              {"role": "assistant", "content": str(2 * i)}]})
                     for i in range(n)) + "\n"


def _runner_processes() -> list[Any]:
    """Live JobRunner actor processes of this test's own Ray session."""
    import psutil

    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "JobRunner" in " ".join(p.cmdline()[:1]) and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (psutil.Error, OSError):
            continue
    return out


class _Sampler(threading.Thread):
    """The most JobRunner processes alive at once, sampled every 50 ms."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self.samples = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, len(_runner_processes()))
            self.samples += 1
            time.sleep(0.05)


@pytest.fixture(scope="module")
def storm(tmp_path_factory) -> Any:
    from lorapool import Client
    from lorapool.service.admin import add_model, create_token
    from lorapool.service.config import Settings
    from lorapool.service.server import Service, free_port
    from lorapool.service.train.tiny import make_tiny_llama

    root = tmp_path_factory.mktemp("storm")
    settings = Settings.from_env(data_dir=root / "data", host="127.0.0.1", port=free_port())
    add_model(settings, "tiny-llama", make_tiny_llama(root / "tiny-llama"))
    token = create_token(settings, "acme")
    svc = Service(
        settings,
        local_node_options={"name": "cpu-node", "cpu_only": True, "cpu_memory": 4 * GiB,
                            "cpu_slots": SLOTS, "cpu_threads": 1,
                            "work_dir": str(root / "node")},
        # A short cancel deadline so that a runner that does not stop is killed within the test.
        executor_options={"cancel_timeout": 4.0, "poll_interval": 0.2},
        ray_init_options={"num_cpus": 2},
    )
    svc.start()
    (root / "train.jsonl").write_text(_lines(16))
    client = Client(svc.base_url, api_key=token, timeout=60)
    file_id = client.files.upload(root / "train.jsonl").id
    try:
        yield {"svc": svc, "client": client, "file": file_id, "root": root}
    finally:
        svc.stop()


def _wait_settled(client, ids: list[str], timeout: float) -> dict[str, str]:
    """Every job final (or still queued), none `running`, within `timeout` seconds."""
    deadline = time.time() + timeout
    while True:
        status = {i: client.jobs.get(i).status for i in ids}
        if all(s in FINAL | {"queued"} for s in status.values()):
            return status
        if time.time() > deadline:
            raise AssertionError(f"not settled after {timeout:.0f} s: "
                                 f"{sorted((i, s) for i, s in status.items() if s not in FINAL)}")
        time.sleep(0.5)


def test_a_job_no_node_could_hold_is_refused_with_the_numbers(storm):
    from lorapool.errors import BadRequestError

    with pytest.raises(BadRequestError) as err:
        storm["client"].submit("tiny-llama", storm["file"], batch_size=1024,
                               micro_batch_size=1024, max_seq_len=32768,
                               placement={"allow_autofit": False})
    msg = str(err.value)
    assert "of RAM" in msg and "cpu-node" in msg and "4.0 GiB" in msg, msg


def test_storm_of_submits_and_cancels(storm):
    client, svc = storm["client"], storm["svc"]
    sampler = _Sampler()
    sampler.start()

    def submit_then_cancel(i: int) -> str:
        job = client.submit("tiny-llama", storm["file"], batch_size=4, micro_batch_size=2,
                            max_seq_len=64, n_epochs=3, seed=i)
        # Every fourth goes on for a moment, so that cancels land on runners in every phase
        # (starting, loading, training) as well as on queued jobs.
        if i % 4 == 0:
            time.sleep(0.5 + (i % 12) / 4)
        client.jobs.cancel(job.id)
        return job.id

    started = time.time()
    try:
        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(submit_then_cancel, range(40)))
        status = _wait_settled(client, ids, timeout=60)
    finally:
        sampler.stop.set()
        sampler.join()
    took = time.time() - started
    events = {i: [e.message for e in client.jobs.events(i)] for i in ids}
    placed = sum(any("placed on" in m for m in ev) for ev in events.values())
    killed = sum(any("did not stop within" in m for m in ev) for ev in events.values())
    print(f"storm: {placed} of 40 placed, {killed} killed, peak {sampler.peak} runners, "
          f"{took:.1f} s")
    assert placed >= SLOTS  # the storm did reach runners, not only queued jobs
    assert sampler.samples > 20
    assert sampler.peak <= SLOTS, f"{sampler.peak} runners at once on a node of {SLOTS} slots"
    # Every cancel held: cancelled, or finished before it landed; none left running or queued.
    assert set(status.values()) <= FINAL, status
    assert sum(s == "cancelled" for s in status.values()) >= 30, status
    # Nothing running in the store, nothing tracked by the scheduler or the node.
    assert not svc.store.jobs_in_status("running")
    import ray

    report = ray.get(svc._agent.report.remote(), timeout=10)  # the NodeAgent still answers
    assert report["cpu_slots"] == SLOTS and report["device"]["kind"] == "cpu"
    deadline = time.time() + 30
    while (report["jobs"] or _runner_processes()) and time.time() < deadline:
        time.sleep(0.5)
        report = ray.get(svc._agent.report.remote(), timeout=10)
    assert report["jobs"] == [] and not _runner_processes()
    assert took < 120


def test_a_hung_runner_is_killed_on_cancel_and_the_job_ends_cancelled(storm):
    """A runner that cannot answer (its process stopped, as a swamped or hung one) is killed
    `cancel_timeout` after the cancel; the job ends `cancelled`, not `running`."""
    import ray

    from lorapool.service.pool.agent import NAMESPACE

    client = storm["client"]
    job = client.submit("tiny-llama", storm["file"], batch_size=4, micro_batch_size=2,
                        max_seq_len=64, n_epochs=50)
    deadline = time.time() + 60
    while client.jobs.get(job.id).status != "running" and time.time() < deadline:
        time.sleep(0.2)
    runner = ray.get_actor(f"lorapool-job:{job.id}", namespace=NAMESPACE)
    import psutil

    proc = psutil.Process(ray.get(runner.pid.remote(), timeout=60))
    proc.suspend()  # SIGSTOP: it neither trains nor answers drain() or request_stop()
    try:
        t0 = time.time()
        client.jobs.cancel(job.id)
        status = _wait_settled(client, [job.id], timeout=30)[job.id]
        assert status == "cancelled"
        assert time.time() - t0 >= 3.5  # it waited for the runner first (cancel_timeout 4 s)
        events = [e.message for e in client.jobs.events(job.id)]
        assert any("did not stop within" in m for m in events), events
        # Ray kills the stopped process; its slot is free once it is gone.
        deadline = time.time() + 30
        while proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
            assert time.time() < deadline, "the hung runner was not killed"
            time.sleep(0.3)
    finally:
        try:
            proc.resume()
        except psutil.Error:
            pass
    assert not storm["svc"].store.jobs_in_status("running")
