"""Job event streams are pushed, not polled: the event hub, and SSE followers over real uvicorn.

The "pool" here is a thread writing events and status changes through the real store, as the
scheduler's background thread does; database queries are counted with an SQLAlchemy event
listener on the store's engine.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any, Optional

import httpx
import pytest
from sqlalchemy import event

from lorapool.service.api.event_hub import EventHub, SlowConsumer
from lorapool.service.store import JobRecord, new_id

JOBS = "/v1/fine_tuning/jobs"


def _running_job(env: Any, tenant: str = "acme") -> str:
    job_id = new_id("ftjob")
    env.store.create_job(JobRecord(id=job_id, tenant=tenant, model="tiny-llama",
                                   status="running"))
    return job_id


class QueryCounter:
    """Every SQL statement the store's engine runs while attached."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.statements: list[str] = []

    def _on(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.statements.append(statement)

    def __enter__(self) -> "QueryCounter":
        event.listen(self.engine, "before_cursor_execute", self._on)
        return self

    def __exit__(self, *exc: Any) -> None:
        event.remove(self.engine, "before_cursor_execute", self._on)


class Follower(threading.Thread):
    """Reads one SSE stream to its end, keeping (event, data) pairs and comment lines."""

    def __init__(self, env: Any, url: str, job_id: str, last_id: Optional[str] = None) -> None:
        super().__init__(daemon=True)
        self.env, self.url, self.job_id, self.last_id = env, url, job_id, last_id
        self.messages: list[tuple[str, Any]] = []
        self.comments = 0
        self.status: Optional[int] = None
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        headers = dict(self.env.headers())
        if self.last_id:
            headers["Last-Event-ID"] = self.last_id
        try:
            with httpx.Client(base_url=self.url, timeout=60) as http:
                with http.stream("GET", f"{JOBS}/{self.job_id}/events",
                                 params={"stream": "true"}, headers=headers) as resp:
                    self.status = resp.status_code
                    kind = "message"
                    for line in resp.iter_lines():
                        if line.startswith(":"):
                            self.comments += 1
                        elif line.startswith("event: "):
                            kind = line[7:]
                        elif line.startswith("data: "):
                            self.messages.append((kind, json.loads(line[6:])))
                            kind = "message"
        except BaseException as exc:  # reported by the test
            self.error = exc

    def events(self) -> list[dict[str, Any]]:
        return [d for k, d in self.messages if k == "message"]


def _wait(predicate: Any, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# -- the hub on its own -----------------------------------------------------------------------


def test_hub_fans_out_from_threads_in_order_and_forgets_closed_subscriptions():
    async def main() -> None:
        hub = EventHub(queue_size=100)
        subs = [hub.subscribe("job:a") for _ in range(3)]
        other = hub.subscribe("job:b")
        writers = [threading.Thread(target=lambda w=w: [hub.publish("job:a", (w, i))
                                                        for i in range(20)]) for w in range(2)]
        for t in writers:
            t.start()
        for t in writers:
            t.join()
        for sub in subs:
            got = [await sub.get(5) for _ in range(40)]
            for w in range(2):  # each writer's items arrive in its order
                assert [i for ww, i in got if ww == w] == list(range(20))
        with pytest.raises(TimeoutError):
            await other.get(0.05)
        assert hub.subscribers("job:a") == 3
        for sub in (*subs, other):
            sub.close()
        assert hub.topics() == []
        hub.publish("job:a", "nobody listens")  # no error, nothing kept

    asyncio.run(main())


def test_hub_drops_a_subscriber_that_falls_behind_and_keeps_the_others():
    async def main() -> None:
        hub = EventHub(queue_size=5)
        slow, fast = hub.subscribe("t"), hub.subscribe("t")
        got = []
        for i in range(8):
            hub.publish("t", i)
            await asyncio.sleep(0)  # let the loop deliver
            got.append(await fast.get(1))
        assert got == list(range(8))
        assert slow.dropped and slow.dropped_event.is_set() and slow.pending() == 0
        with pytest.raises(SlowConsumer, match="slow consumer"):
            await slow.get(1)

    asyncio.run(main())


# -- SSE over uvicorn -------------------------------------------------------------------------


def test_followers_get_every_event_once_and_cost_no_queries_while_idle(env, live):
    ctx = env.app.state.ctx
    ctx.sse_keepalive = 0.2  # heartbeats during the idle window must not query either
    job_id = _running_job(env)
    env.store.add_event(job_id, "before anyone follows")
    followers = [Follower(env, live.url, job_id) for _ in range(6)]
    for f in followers:
        f.start()
    _wait(lambda: ctx.hub.subscribers(f"job:{job_id}") == 6, what="6 subscribers")
    _wait(lambda: all(len(f.messages) == 1 for f in followers), what="the catch-up")

    with QueryCounter(env.store.engine) as idle:
        time.sleep(1.0)
    assert idle.statements == []
    assert all(f.comments >= 2 for f in followers)  # heartbeats were sent meanwhile

    def pool() -> None:  # the scheduler's thread
        for i in range(30):
            env.store.add_event(job_id, f"step {i}", type="metrics", data={"step": i})
        env.store.transition(job_id, {"running"}, "succeeded", finished_at=1)
        env.store.add_event(job_id, "Training finished")  # written after the final status

    with QueryCounter(env.store.engine) as busy:
        t = threading.Thread(target=pool)
        t.start()
        t.join()
        for f in followers:
            f.join(20)
    expected = ["before anyone follows", *(f"step {i}" for i in range(30)), "Training finished"]
    for f in followers:
        assert not f.is_alive(), "the stream did not end with the job"
        assert f.error is None and f.status == 200
        assert [e["message"] for e in f.events()] == expected
    # The followers read nothing: every statement is one of the writer's.
    assert not [s for s in busy.statements if s.lstrip().upper().startswith("SELECT")
                and "FROM events" in s]
    _wait(lambda: ctx.hub.topics() == [] and ctx.limits.streams.open("acme") == 0,
          what="subscriptions and stream slots given back")


def test_catch_up_joins_the_live_feed_without_gap_or_duplicate(env, live):
    """Followers connect (some resuming after an event id) while events are being written."""
    job_id = _running_job(env)
    first = env.store.add_event(job_id, "event 0")
    stop = threading.Event()

    def pool() -> None:
        i = 1
        while not stop.is_set() and i < 2000:
            env.store.add_event(job_id, f"event {i}")
            i += 1
            time.sleep(0.002)
        env.store.transition(job_id, {"running"}, "cancelled", finished_at=1)
        env.store.add_event(job_id, "Job cancelled")

    writer = threading.Thread(target=pool)
    writer.start()
    followers = []
    for n in range(8):
        time.sleep(0.05)
        followers.append(Follower(env, live.url, job_id, last_id=first.id if n % 2 else None))
        followers[-1].start()
    time.sleep(0.3)
    stop.set()
    writer.join()
    for f in followers:
        f.join(30)
    stored = [e.message for e in env.store.events_for_follower(job_id, limit=10_000)[1]]
    assert stored[-1] == "Job cancelled" and len(stored) > 20
    for n, f in enumerate(followers):
        assert f.error is None and not f.is_alive()
        assert [e["message"] for e in f.events()] == (stored[1:] if n % 2 else stored)


def test_a_follower_of_a_finished_job_gets_its_events_and_ends(env, live):
    job_id = _running_job(env)
    ids = [env.store.add_event(job_id, f"e{i}").id for i in range(3)]
    env.store.transition(job_id, {"running"}, "failed", finished_at=1)
    f = Follower(env, live.url, job_id, last_id=ids[0])
    f.start()
    f.join(10)
    assert not f.is_alive() and [e["message"] for e in f.events()] == ["e1", "e2"]


def _big(i: int) -> dict[str, Any]:
    return {"i": i, "blob": "x" * 32_000}


def test_a_slow_follower_is_dropped_with_a_clear_end_and_the_others_get_everything(env, live):
    ctx = env.app.state.ctx
    ctx.hub.queue_size = 8
    ctx.sse_drop_grace = 60.0  # this slow reader does read its last message
    job_id = _running_job(env)
    fast = Follower(env, live.url, job_id)
    fast.start()
    with httpx.Client(base_url=live.url, headers=env.headers(), timeout=60) as http:
        with http.stream("GET", f"{JOBS}/{job_id}/events", params={"stream": "true"}) as slow:
            _wait(lambda: ctx.hub.subscribers(f"job:{job_id}") == 2, what="2 subscribers")
            # ~6 MB: more than the socket buffers hold while the slow one reads nothing.
            # Paced by the fast follower, so only the slow one can fall behind (on a loaded
            # machine an unpaced burst could overflow the fast one's small queue too).
            for i in range(200):
                env.store.add_event(job_id, f"big {i}", data=_big(i))
                _wait(lambda i=i: len(fast.events()) > i, what=f"the fast follower at {i}")
            env.store.transition(job_id, {"running"}, "succeeded", finished_at=1)
            kinds, data = [], []
            kind = "message"
            for line in slow.iter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    kinds.append(kind)
                    data.append(json.loads(line[6:]))
                    kind = "message"
    fast.join(20)
    assert [e["message"] for e in fast.events()] == [f"big {i}" for i in range(200)]
    assert kinds[-1] == "error" and kinds.count("error") == 1
    err = data[-1]["error"]
    assert "slow consumer" in err["message"] and err["code"] == "slow_consumer"
    assert set(err) == {"message", "type", "param", "code"}
    received = [d["message"] for k, d in zip(kinds, data) if k == "message"]
    assert 0 < len(received) < 200
    assert received == [f"big {i}" for i in range(len(received))]  # in order, no gap, then end
    _wait(lambda: ctx.limits.streams.open("acme") == 0, what="the stream slots back")


def test_a_follower_that_never_reads_again_is_cut_off(env, live):
    ctx = env.app.state.ctx
    ctx.hub.queue_size = 4
    ctx.sse_drop_grace = 0.5
    job_id = _running_job(env)
    with httpx.Client(base_url=live.url, headers=env.headers(), timeout=60) as http:
        with http.stream("GET", f"{JOBS}/{job_id}/events", params={"stream": "true"}):
            _wait(lambda: ctx.hub.subscribers(f"job:{job_id}") == 1, what="the subscriber")
            for i in range(200):
                env.store.add_event(job_id, f"big {i}", data=_big(i))
            # The server gives up on it: subscription and stream slot are released although
            # the client still holds the connection without reading.
            _wait(lambda: ctx.hub.subscribers(f"job:{job_id}") == 0
                  and ctx.limits.streams.open("acme") == 0, what="the cut-off")


def test_fallback_poll_picks_up_events_written_by_another_process(env, live):
    """With LORAPOOL_EVENTS_FALLBACK_POLL set, a write the hub never hears of (another
    process's: here a second Store on the same file) reaches the follower at that interval."""
    from lorapool.service.store import Store

    ctx = env.app.state.ctx
    ctx.sse_fallback_poll = 0.3
    job_id = _running_job(env)
    f = Follower(env, live.url, job_id)
    f.start()
    _wait(lambda: ctx.hub.subscribers(f"job:{job_id}") == 1, what="the subscriber")
    other = Store(str(env.settings.database_url))
    try:
        other.add_event(job_id, "from elsewhere")
        other.transition(job_id, {"running"}, "succeeded", finished_at=1)
    finally:
        other.close()
    f.join(10)
    assert not f.is_alive() and [e["message"] for e in f.events()] == ["from elsewhere"]
