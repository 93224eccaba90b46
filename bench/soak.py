"""Soak test: a stream of small jobs on a 4-node local Ray cluster under a chaos loop.

For `--minutes` (default 10) a submitter keeps a few small fine-tuning jobs in flight through
the real HTTP API, while a chaos loop, every 30–60 s, picks a random donor and either kills its
raylet (the machine is gone; a fresh donor joins in its place a little later) or reclaims it
(the owner is back; it is released again after a while). At the end it waits for the queue to
drain and prints:

- jobs submitted / succeeded / failed (each with its reason) / lost (never reached an end state);
- steps redone: step numbers reported twice because a node went away between checkpoints
  (a lower bound: steps a dying node trained but had not yet reported are not seen);
- the chaos events that happened.

Target: none lost, none stuck, every failure with a reason. Not part of CI (it takes minutes):

    python bench/soak.py [--minutes 10] [--seed 0] [--in-flight 3]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

GiB = 1024**3


def _data(path: Path, n: int = 16) -> Path:
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        rows.append(json.dumps({"messages": [{"role": "user", "content": f"{a}+{b}?"},
                                             {"role": "assistant", "content": str(a + b)}]}))
    path.write_text("\n".join(rows) + "\n")
    return path


class Pool:
    """A `ray.cluster_utils.Cluster` whose donors can die, be reclaimed and be replaced."""

    def __init__(self, root: Path, n: int) -> None:
        import ray
        from ray.cluster_utils import Cluster

        from lorapool.service.server import _keep_loopback_addresses

        self.root = root
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False})
        self.raylets: dict[str, Any] = {}
        self.agents: dict[str, Any] = {}
        self.reclaimed: dict[str, float] = {}
        self.serial = 0
        for _ in range(n):
            self.add_donor(wait=False)
        self.cluster.wait_for_nodes()
        _keep_loopback_addresses()
        ray.init(address=self.cluster.address, namespace="lorapool", log_to_driver=False)
        for name in list(self.raylets):
            self._start_agent(name)

    def add_donor(self, wait: bool = True) -> str:
        self.serial += 1
        name = f"desk-{self.serial:02d}"
        self.raylets[name] = self.cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        if wait:
            self.cluster.wait_for_nodes()
            self._start_agent(name)
        return name

    def _start_agent(self, name: str) -> None:
        import ray

        from lorapool.service.pool.agent import AgentConfig, start_agent
        from lorapool.service.pool.devices import SimulatedGPU

        total = random.choice([6, 8, 12]) * GiB
        self.agents[name] = start_agent(AgentConfig(
            name=name, work_dir=str(self.root / "nodes" / name),
            simulate_gpu=SimulatedGPU(name=f"gpu-{total // GiB}g", total_memory=total,
                                      free_memory=total - GiB, compute_capability=(8, 6))),
            node_id=self.raylets[name].node_id)
        ray.get(self.agents[name].report.remote())

    def kill(self, name: str) -> None:
        self.cluster.remove_node(self.raylets.pop(name), allow_graceful=False)
        self.agents.pop(name, None)

    def reclaim(self, name: str) -> None:
        import ray

        ray.get(self.agents[name].reclaim.remote("owner is back (soak chaos)"))
        self.reclaimed[name] = time.time()

    def release_due(self, after: float) -> list[str]:
        import ray

        done = [n for n, t in self.reclaimed.items() if time.time() - t > after]
        for n in done:
            if n in self.agents:
                ray.get(self.agents[n].release.remote())
            self.reclaimed.pop(n)
        return done

    def shutdown(self) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from lorapool import Client
    from lorapool.service.admin import add_model, create_token
    from lorapool.service.config import Settings
    from lorapool.service.server import Service, free_port
    from lorapool.service.train.tiny import make_tiny_llama

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--in-flight", type=int, default=3, help="jobs kept queued or running")
    ap.add_argument("--chaos-min", type=float, default=30.0)
    ap.add_argument("--chaos-max", type=float, default=60.0)
    ap.add_argument("--drain-minutes", type=float, default=5.0)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    random.seed(args.seed)

    root = Path(tempfile.mkdtemp(prefix="lorapool-soak-"))
    pool = Pool(root, 4)
    settings = Settings.from_env(data_dir=root / "head", host="127.0.0.1", port=free_port(),
                                 ray_address=pool.cluster.address, heartbeat_timeout=8.0,
                                 preempt_timeout=15.0, max_attempts=5)
    add_model(settings, "tiny-llama", make_tiny_llama(root / "models" / "tiny-llama"))
    client = Client(f"http://127.0.0.1:{settings.port}",
                    api_key=create_token(settings, "soak"), timeout=30)
    svc = Service(settings, local_node=False).start()
    data = _data(root / "train.jsonl")

    submitted: list[str] = []
    chaos_log: list[str] = []
    t_end = time.time() + args.minutes * 60

    def chaos() -> None:
        """One chaos event. Runs on the main thread: adding a raylet installs signal handlers."""
        pool.release_due(after=40.0)
        live = [n for n in pool.agents if n not in pool.reclaimed]
        if not live:
            return
        victim = rng.choice(live)
        if rng.random() < 0.5:
            pool.kill(victim)
            chaos_log.append(f"{time.strftime('%H:%M:%S')} killed {victim}")
            replacement = pool.add_donor()
            chaos_log.append(f"{time.strftime('%H:%M:%S')} {replacement} joined")
        else:
            pool.reclaim(victim)
            chaos_log.append(f"{time.strftime('%H:%M:%S')} reclaimed {victim}")

    next_chaos = time.time() + rng.uniform(args.chaos_min, args.chaos_max)
    try:
        while time.time() < t_end:
            if time.time() >= next_chaos:
                chaos()
                next_chaos = time.time() + rng.uniform(args.chaos_min, args.chaos_max)
            active = [j for j in client.jobs.list(limit=100).data
                      if j.status in ("queued", "running", "validating_files")]
            for _ in range(max(0, args.in_flight - len(active))):
                job = client.submit("tiny-llama", data, max_seq_len=64, batch_size=2,
                                    micro_batch_size=2, n_epochs=rng.randint(4, 12),
                                    checkpoint_every=4, lora={"r": 2, "alpha": 4},
                                    seed=rng.randint(0, 1000))
                submitted.append(job.id)
            time.sleep(2.0)
        for name in list(pool.reclaimed):
            pool.release_due(after=0)
        drain_end = time.time() + args.drain_minutes * 60
        while time.time() < drain_end:
            jobs = [client.jobs.get(i) for i in submitted]
            if all(j.status in ("succeeded", "failed", "cancelled") for j in jobs):
                break
            time.sleep(3.0)
        jobs = [client.jobs.get(i) for i in submitted]
        status = Counter(j.status for j in jobs)
        redone = 0
        attempts = 0
        failures = []
        for j in jobs:
            steps = [e.data.get("step") for e in client.jobs.events(j.id)
                     if e.type == "metrics" and e.data and "train_loss" in e.data]
            steps = [s for s in steps if isinstance(s, int)]
            redone += len(steps) - len(set(steps))
            attempts += j.attempt
            if j.status == "failed":
                failures.append(f"{j.id}: {j.error.code if j.error else '?'}: "
                                f"{j.error.message if j.error else 'no reason!'}")
        lost = [j.id for j in jobs if j.status not in ("succeeded", "failed", "cancelled")]
        summary = {
            "minutes": args.minutes,
            "submitted": len(jobs),
            "succeeded": status.get("succeeded", 0),
            "failed": status.get("failed", 0),
            "lost": len(lost),
            "retries": attempts,
            "steps_redone": redone,
            "chaos_events": len(chaos_log),
        }
        print("\n".join(chaos_log))
        print()
        print(f"{'metric':<16}{'value':>8}")
        print("-" * 24)
        for k, v in summary.items():
            print(f"{k:<16}{v:>8}")
        for f in failures:
            print("failed:", f)
        for i in lost:
            print("lost:", i, client.jobs.get(i).status)
        return summary
    finally:
        svc.stop()
        pool.shutdown()


if __name__ == "__main__":
    main()
