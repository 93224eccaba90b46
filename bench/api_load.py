"""API under load, on loopback: list latency at 5,000 jobs, GET /v1/models while 200 SSE
followers watch a running job, and a storm of submits each cancelled right after.

The server is the real `Service` (service/server.py: uvicorn, SQLite, the scheduler and a local
Ray head with this machine as a CPU node) in a child process, so the load generator (httpx,
asyncio, this process) does not share its interpreter. `--no-pool` serves the same app with no
Ray and no scheduler (jobs stay queued): the list and SSE phases need none; the storm's
"left running" check then means nothing and is not reported.

Phases, each bounded in count and time (the whole run stops by itself, `--max-seconds`):

1. list:   5,000 jobs seeded for one tenant; `--list-requests` GET /v1/fine_tuning/jobs (half
           the first page, half after a random job: keyset pages).
2. models: GET /v1/models alone, then again while `--followers` SSE followers of one running
           job are connected (the "pool" — a thread in the server — writes an event every
           0.5 s); every follower must get every event exactly once.
3. storm:  `--clients` concurrent clients × `--submits` submits, each cancelled right after;
           then wait (≤ `--settle` s) and count jobs left `running` without a live runner.
4. floor:  the storm's load (same clients, same request pairs) against a bare FastAPI app in
           its own uvicorn process that does no work at all (no auth, no database): what this
           machine's Python HTTP stack alone answers at that concurrency. Latency under a closed
           loop is clients / throughput, so when the floor itself misses the goal, no server
           of this shape can meet it on this machine; compare the storm's rows with it.

Goals: p99 < 50 ms for submit, list and models-with-followers; 0 jobs left running.

    python bench/api_load.py                 # everything, with the Ray pool
    python bench/api_load.py --no-pool       # API only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

GiB = 1024**3
JOBS = "/v1/fine_tuning/jobs"
GOAL_MS = 50.0


# -- the server (child process) ---------------------------------------------------------------


class _NoPool:
    """The executor of `--no-pool`: accepts every job, runs none."""

    def wake(self) -> None:
        pass

    def cancel(self, job_id: str) -> None:
        pass

    def check_fits(self, spec: Any, placement: Any = None) -> Optional[str]:
        return None

    def nodes(self) -> list[Any]:
        return []


def _serve(root: str, port: int, pool: bool, conn: Any) -> None:
    """Run the server; answer the parent's commands on `conn` until "stop"."""
    from lorapool.service.config import Settings
    from lorapool.service.server import Service
    from lorapool.service.store import JobRecord, new_id
    from lorapool.service.store.schema import JobRow

    settings = Settings.from_env(data_dir=Path(root) / "data", port=port)
    svc: Any = None
    server: Any = None
    if pool:
        svc = Service(settings, local_node_options={
            "name": "local-cpu", "cpu_only": True, "cpu_memory": 8 * GiB,
            "work_dir": str(Path(root) / "node")}, ray_init_options={"num_cpus": 2})
        svc.start(timeout=300)
        store, app = svc.store, svc.app
    else:
        import uvicorn

        from lorapool.service.api.app import create_app
        from lorapool.service.artifacts import ArtifactStore
        from lorapool.service.store import Store

        store = Store(str(settings.database_url))
        app = create_app(settings, store, ArtifactStore(settings.artifacts_dir), _NoPool())
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                               log_level="warning", lifespan="off"))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
    publishers: dict[str, threading.Event] = {}

    def publish(job_id: str, stop: threading.Event) -> None:
        i = 0
        while not stop.wait(0.5):  # what the scheduler thread does for a running job
            store.add_event(job_id, f"step {i}", type="metrics", data={"step": i, "loss": 1.0})
            i += 1

    conn.send(("ready", None))
    while True:
        cmd, *args = conn.recv()
        if cmd == "stop":
            for stop in publishers.values():
                stop.set()
            if svc is not None:
                svc.stop()
            elif server is not None:
                server.should_exit = True
            conn.send(("stopped", None))
            return
        if cmd == "seed":
            tenant, n = args
            model = store.list_models()[0].name
            with store._tx() as s:  # one transaction: seeding is not what is measured
                s.add_all(JobRow(id=new_id("ftjob"), tenant=tenant, model=model,
                                 status="succeeded", created_at=int(time.time()),
                                 hyperparameters={"n_epochs": 1}, metadata_={"i": str(i)})
                          for i in range(n))
            ids = [r.id for r in store.list_jobs(tenant, limit=n)[0]]
            conn.send(("ok", ids))
        elif cmd == "running_job":
            (tenant,) = args
            job_id = new_id("ftjob")
            store.create_job(JobRecord(id=job_id, tenant=tenant, model=store.list_models()[0].name,
                                       status="running"))
            publishers[job_id] = threading.Event()
            threading.Thread(target=publish, args=(job_id, publishers[job_id]),
                             daemon=True).start()
            conn.send(("ok", job_id))
        elif cmd == "subscribers":
            conn.send(("ok", app.state.ctx.hub.subscribers(f"job:{args[0]}")))
        elif cmd == "finish_job":
            (job_id,) = args
            publishers.pop(job_id).set()
            time.sleep(0.6)
            store.transition(job_id, {"running"}, "succeeded", finished_at=int(time.time()))
            store.add_event(job_id, "Training finished")
            n = len(store.events_for_follower(job_id, limit=100_000)[1])
            conn.send(("ok", n))
        elif cmd == "statuses":
            (prefix,) = args
            counts: Counter[str] = Counter()
            left: list[str] = []
            for tenant in store.list_tenants():
                if not tenant.startswith(prefix):
                    continue
                jobs, _ = store.list_jobs(tenant, limit=100_000)
                for j in jobs:
                    counts[j.status] += 1
                    if j.status == "running" and not _has_runner(svc, j.id):
                        left.append(j.id)
            conn.send(("ok", (dict(counts), left)))


def _has_runner(svc: Any, job_id: str) -> bool:
    """A live runner: the scheduler drives it and its Ray actor exists."""
    if svc is None:
        return False
    import ray

    from lorapool.service.pool.agent import NAMESPACE

    if job_id not in getattr(svc.executor, "_active", {}):
        return False
    try:
        ray.get_actor(f"lorapool-job:{job_id}", namespace=NAMESPACE)
        return True
    except ValueError:
        return False


class Server:
    def __init__(self, root: Path, pool: bool) -> None:
        from lorapool.service.server import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(str(root), self.port, pool, child),
                                daemon=False)
        self.proc.start()
        self.ask_timeout = 300.0
        self._expect("ready")

    def _expect(self, what: str) -> Any:
        if not self.conn.poll(self.ask_timeout):
            raise TimeoutError(f"the server did not answer ({what})")
        tag, value = self.conn.recv()
        return value

    def ask(self, *cmd: Any) -> Any:
        self.conn.send(cmd)
        return self._expect(cmd[0])

    def stop(self) -> None:
        try:
            self.ask_timeout = 60.0
            self.ask("stop")
        except Exception as exc:  # noqa: BLE001 - report and make sure it ends anyway
            print(f"server stop: {exc}", file=sys.stderr)
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(10)


def _serve_floor(port: int, conn: Any) -> None:
    """A FastAPI app that does nothing, served like the real one (uvicorn, one process)."""
    import uvicorn
    from fastapi import Body, FastAPI

    app = FastAPI()
    n = 0

    @app.post("/v1/fine_tuning/jobs")
    def submit(body: dict = Body(...)) -> dict:  # a sync route: the threadpool, as the real one
        nonlocal n
        n += 1
        return {"id": f"ftjob-{n}", "object": "fine_tuning.job", "status": "queued"}

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    def cancel(job_id: str) -> dict:
        return {"id": job_id, "object": "fine_tuning.job", "status": "cancelled"}

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    conn.send(("ready", None))
    conn.recv()
    server.should_exit = True
    conn.send(("stopped", None))


# -- measuring --------------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


class Stats:
    def __init__(self) -> None:
        self.rows: list[tuple[str, int, float, float, str]] = []
        self.notes: list[str] = []

    def add(self, name: str, ms: list[float], goal: bool = True) -> None:
        p99 = _pct(ms, 0.99)
        verdict = ("ok" if p99 < GOAL_MS else "MISSED") if goal else "-"
        self.rows.append((name, len(ms), _pct(ms, 0.5), p99, verdict))

    def print(self) -> None:
        print(f"\n{'measure':<44} {'n':>6} {'p50 ms':>9} {'p99 ms':>9}  goal p99<{GOAL_MS:g}")
        for name, n, p50, p99, verdict in self.rows:
            print(f"{name:<44} {n:>6} {p50:>9.1f} {p99:>9.1f}  {verdict}")
        for note in self.notes:
            print(note)


async def _timed(http: Any, method: str, url: str, stats: Counter, **kw: Any) -> tuple[float, Any]:
    """(ms of the answered attempt, response); a 429 is waited out as Retry-After says."""
    for _ in range(20):
        t0 = time.perf_counter()
        r = await http.request(method, url, **kw)
        ms = (time.perf_counter() - t0) * 1000
        if r.status_code != 429:
            return ms, r
        stats["429"] += 1
        await asyncio.sleep(float(r.headers.get("retry-after-ms", 1000)) / 1000)
    return ms, r


def _chat(n: int) -> bytes:
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        rows.append(json.dumps({"messages": [{"role": "user", "content": f"{a}+{b}?"},
                                             {"role": "assistant", "content": str(a + b)}]}))
    return ("\n".join(rows) + "\n").encode()


async def phase_list(server: Server, token: str, n_jobs: int, requests: int,
                     stats: Stats) -> None:
    import httpx

    t0 = time.monotonic()
    ids = server.ask("seed", "lister", n_jobs)
    stats.notes.append(f"list: seeded {len(ids)} jobs in {time.monotonic() - t0:.1f} s")
    counts: Counter = Counter()
    first, deep = [], []
    async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                 headers={"Authorization": f"Bearer {token}"}) as http:
        await http.get(JOBS)  # warm up
        for i in range(requests):
            params = {"limit": 20} if i % 2 == 0 else {"limit": 20, "after": random.choice(ids)}
            ms, r = await _timed(http, "GET", JOBS, counts, params=params)
            assert r.status_code == 200, r.text
            assert len(r.json()["data"]) > 0 or "after" in params
            (first if i % 2 == 0 else deep).append(ms)
    stats.add(f"GET {JOBS} ({n_jobs} jobs), first page", first)
    stats.add(f"GET {JOBS} ({n_jobs} jobs), after=<random>", deep)
    stats.add(f"GET {JOBS} ({n_jobs} jobs), all", first + deep)


async def _models(http: Any, n: int, counts: Counter) -> list[float]:
    out = []
    for _ in range(n):
        ms, r = await _timed(http, "GET", "/v1/models", counts)
        assert r.status_code == 200, r.text
        out.append(ms)
        await asyncio.sleep(0.01)
    return out


async def phase_followers(server: Server, tokens: list[str], followers: int, requests: int,
                          deadline: float, stats: Stats) -> None:
    import httpx

    # Each token's rate limit (default 20/s, burst 100) would refuse 200 connects at once:
    # the followers share a few tokens of the tenant, as a few dashboards would.
    headers = {"Authorization": f"Bearer {tokens[0]}"}
    counts: Counter = Counter()
    async with httpx.AsyncClient(base_url=server.url, timeout=60, headers=headers) as http:
        await http.get("/v1/models")
        stats.add("GET /v1/models, no followers", await _models(http, requests, counts))
    job_id = server.ask("running_job", "watch")
    received: list[list[str]] = [[] for _ in range(followers)]
    limits = httpx.Limits(max_connections=followers + 10, max_keepalive_connections=followers)

    async def follow(i: int, http: Any) -> None:
        auth = {"Authorization": f"Bearer {tokens[1 + i % (len(tokens) - 1)]}"}
        async with http.stream("GET", f"{JOBS}/{job_id}/events", params={"stream": "true"},
                               headers=auth, timeout=httpx.Timeout(60, read=120)) as r:
            if r.status_code != 200:
                received[i].append(f"HTTP {r.status_code}")
                return
            async for line in r.aiter_lines():
                if line.startswith("id: "):
                    received[i].append(line[4:])

    async with httpx.AsyncClient(base_url=server.url, headers=headers, limits=limits) as fh:
        tasks = [asyncio.create_task(follow(i, fh)) for i in range(followers)]
        while server.ask("subscribers", job_id) < followers:
            if time.monotonic() > deadline or all(t.done() for t in tasks):
                break
            await asyncio.sleep(0.2)
        connected = server.ask("subscribers", job_id)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, headers=headers) as http:
            with_f = await _models(http, requests, counts)
        stats.add(f"GET /v1/models, {connected} SSE followers", with_f)
        stored = server.ask("finish_job", job_id)
        done, pending = await asyncio.wait(tasks, timeout=max(5.0, deadline - time.monotonic()))
        for t in pending:
            t.cancel()
    exact = sum(1 for r in received if len(r) == stored and len(set(r)) == stored)
    stats.notes.append(f"followers: {connected}/{followers} connected; {exact} got all {stored} "
                       f"events exactly once; {len(pending)} did not end by themselves")


async def phase_storm(server: Server, tokens: list[str], submits: int, settle: float,
                      deadline: float, pool: bool, stats: Stats) -> None:
    import httpx

    counts: Counter = Counter()
    submit_ms: list[float] = []
    cancel_ms: list[float] = []
    errors: Counter = Counter()
    data = _chat(16)

    async def client(token: str) -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                     headers={"Authorization": f"Bearer {token}"}) as http:
            _, r = await _timed(http, "POST", "/v1/files", counts,
                                files={"file": ("train.jsonl", data)},
                                data={"purpose": "fine-tune"})
            file_id = r.json()["id"]
            body = {"model": "tiny-llama", "training_file": file_id, "max_seq_len": 32,
                    "hyperparameters": {"n_epochs": 1, "batch_size": 1}}
            for _ in range(submits):
                if time.monotonic() > deadline:
                    errors["stopped at the time limit"] += 1
                    return
                ms, r = await _timed(http, "POST", JOBS, counts, json=body)
                if r.status_code != 200:
                    errors[f"submit {r.status_code}"] += 1
                    continue
                submit_ms.append(ms)
                ms, r = await _timed(http, "POST", f"{JOBS}/{r.json()['id']}/cancel", counts)
                if r.status_code != 200:
                    errors[f"cancel {r.status_code}"] += 1
                else:
                    cancel_ms.append(ms)

    t0 = time.monotonic()
    await asyncio.gather(*(client(t) for t in tokens))
    took = time.monotonic() - t0
    stats.add(f"submit ({len(tokens)} clients × {submits})", submit_ms)
    stats.add("cancel right after submit", cancel_ms, goal=False)
    stats.notes.append(f"storm: {len(submit_ms)} submits in {took:.1f} s; 429s waited out: "
                       f"{counts['429']}; errors: {dict(errors) or 'none'}")
    if not pool:
        stats.notes.append("storm: --no-pool, so no job ever ran (the 'left running' check "
                           "needs the pool)")
        return
    end = min(deadline, time.monotonic() + settle)
    while True:
        statuses, left = server.ask("statuses", "storm-")
        if not statuses.get("running") and not statuses.get("queued"):
            break
        if time.monotonic() > end:
            break
        await asyncio.sleep(2)
    stats.notes.append(f"storm: after {time.monotonic() - t0:.0f} s, job statuses {statuses}; "
                       f"left running without a live runner: {len(left)} (must be 0)")


async def phase_floor(clients: int, submits: int, stats: Stats) -> None:
    import httpx

    from lorapool.service.server import free_port

    port = free_port()
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_serve_floor, args=(port, child))
    proc.start()
    try:
        if not conn.poll(120):
            raise TimeoutError("the floor server did not start")
        conn.recv()
        counts: Counter = Counter()
        submit_ms: list[float] = []
        body = {"model": "tiny-llama", "training_file": "file-x", "max_seq_len": 32,
                "hyperparameters": {"n_epochs": 1, "batch_size": 1}}

        async def client() -> None:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
                for _ in range(submits):
                    ms, r = await _timed(http, "POST", JOBS, counts, json=body)
                    submit_ms.append(ms)
                    await _timed(http, "POST", f"{JOBS}/{r.json()['id']}/cancel", counts)

        t0 = time.monotonic()
        await asyncio.gather(*(client() for _ in range(clients)))
        took = time.monotonic() - t0
        stats.add(f"floor: no-op POST ({clients} clients × {submits})", submit_ms, goal=False)
        rate = 2 * len(submit_ms) / took
        # Little's law: a closed loop of N clients at X requests/s waits N / X on average.
        stats.notes.append(f"floor: a FastAPI app doing nothing answered {2 * len(submit_ms)} "
                           f"requests in {took:.1f} s ({rate:.0f}/s) at {clients} concurrent "
                           f"clients: by Little's law no server slower than that one can "
                           f"average under {1000 * clients / rate:.0f} ms per request at this "
                           f"concurrency on this machine")
    finally:
        conn.send(("stop",))
        proc.join(30)
        if proc.is_alive():
            proc.terminate()


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--submits", type=int, default=20)
    ap.add_argument("--jobs", type=int, default=5000)
    ap.add_argument("--list-requests", type=int, default=400)
    ap.add_argument("--followers", type=int, default=200)
    ap.add_argument("--model-requests", type=int, default=300)
    ap.add_argument("--settle", type=float, default=120.0,
                    help="seconds to wait after the storm for jobs to reach an end")
    ap.add_argument("--max-seconds", type=float, default=900.0)
    ap.add_argument("--no-pool", action="store_true", help="no Ray, no scheduler")
    ap.add_argument("--skip", action="append", default=[], choices=["list", "models", "storm", "floor"])
    args = ap.parse_args(argv)
    deadline = time.monotonic() + args.max_seconds

    from lorapool.service.admin import add_model, create_token
    from lorapool.service.config import Settings
    from lorapool.service.train.tiny import make_tiny_llama

    # 200 followers of one job are one tenant's streams: allow them (the default is 64).
    os.environ["LORAPOOL_MAX_STREAMS_PER_TENANT"] = str(max(64, args.followers + 8))
    stats = Stats()
    with tempfile.TemporaryDirectory(prefix="lorapool-api-load-") as tmp:
        root = Path(tmp)
        settings = Settings.from_env(environ={}, data_dir=root / "data")
        add_model(settings, "tiny-llama", make_tiny_llama(root / "tiny"))
        lister = create_token(settings, "lister")
        watchers = [create_token(settings, "watch") for _ in range(1 + -(-args.followers // 80))]
        storm = [create_token(settings, f"storm-{i}") for i in range(args.clients)]
        t0 = time.monotonic()
        server = Server(root, pool=not args.no_pool)
        stats.notes.append(f"server ({'no pool' if args.no_pool else 'Ray pool, local CPU node'})"
                           f" up in {time.monotonic() - t0:.1f} s")
        try:
            if "list" not in args.skip:
                asyncio.run(phase_list(server, lister, args.jobs, args.list_requests, stats))
            if "models" not in args.skip and time.monotonic() < deadline:
                asyncio.run(phase_followers(server, watchers, args.followers,
                                            args.model_requests, deadline, stats))
            if "storm" not in args.skip and time.monotonic() < deadline:
                asyncio.run(phase_storm(server, storm, args.submits, args.settle, deadline,
                                        not args.no_pool, stats))
        finally:
            server.stop()
        if "floor" not in args.skip and time.monotonic() < deadline:
            asyncio.run(phase_floor(args.clients, args.submits, stats))
    stats.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
