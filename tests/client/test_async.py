"""AsyncClient against the same real uvicorn server: the shared plans run over asyncio."""

from __future__ import annotations

import asyncio

import pytest

from lorapool import AsyncClient
from lorapool.errors import (
    BadRequestError,
    InternalServerError,
    InvalidParameterError,
    NotFoundError,
    UnsafeArchiveError,
)

# Same as conftest.py (which --import-mode=importlib does not make importable).
API_KEY = "sk-test-good"
JOBS = "/v1/fine_tuning/jobs"


def _client(server, **kw) -> AsyncClient:
    c = AsyncClient(server.base_url, api_key=API_KEY, timeout=5, **kw)
    c.retry_policy.initial_delay = 0.01
    return c


def test_async_submit_wait_events_download(server, train_file, tmp_path):
    async def flow():
        async with _client(server) as c:
            job = await c.submit("tiny", train_file, n_epochs=1, lora={"r": 4})
            jid = job.id
            server.state.scripts[jid] = [{"status": "running", "step": 2},
                                         {"status": "succeeded", "step": 4,
                                          "fine_tuned_model": "ad-good"}]
            done = await c.jobs.wait(jid, poll_interval=0.02)
            server.state.make_event(jid, "Training finished")
            events = [e.message async for e in c.jobs.events(jid)]
            path = await c.adapters.download(done.fine_tuned_model, tmp_path / "adapter")
            return job, done, events, path

    job, done, events, path = asyncio.run(flow())
    order = [(r["method"], r["path"]) for r in server.state.seen][:2]
    assert order == [("POST", "/v1/files"), ("POST", JOBS)]
    assert job.training_file in server.state.files
    assert done.status == "succeeded" and events == ["Training finished"]
    assert (path / "adapter_model.safetensors").exists()


def test_async_follow_reconnects(server):
    job = server.state.make_job(status="running")
    jid = job["id"]
    ev = [{"object": "fine_tuning.job.event", "id": f"{jid}-s{i}", "created_at": 3000 + i,
           "message": f"s{i}"} for i in range(4)]
    server.state.streams[jid] = [(ev[:1], "drop"), (ev[1:], "end")]

    async def follow():
        async with _client(server) as c:
            return [e.message async for e in c.jobs.events(jid, follow=True)]

    assert asyncio.run(follow()) == ["s0", "s1", "s2", "s3"]
    lasts = [r["headers"].get("last-event-id") for r in server.state.seen
             if r["query"].get("stream") == "true"]
    assert lasts == [None, f"{jid}-s0"]


def test_async_retries_and_errors(server, tmp_path):
    job = server.state.make_job()
    server.state.add("GET", f"{JOBS}/{job['id']}", 503)
    server.state.add("POST", "/v1/files", 500)
    (tmp_path / "t.jsonl").write_text('{"text": "x"}\n')

    async def calls():
        async with _client(server) as c:
            got = await c.jobs.get(job["id"])
            with pytest.raises(InternalServerError):
                await c.files.upload(tmp_path / "t.jsonl")
            with pytest.raises(NotFoundError):
                await c.jobs.get("ftjob-missing")
            with pytest.raises(BadRequestError) as exc:
                await c.jobs.list(limit=1000)
            with pytest.raises(InvalidParameterError):
                await c.submit("tiny", tmp_path / "missing.jsonl")
            with pytest.raises(UnsafeArchiveError):
                await c.adapters.download("ad-evil", tmp_path / "evil")
            return got, exc.value

    got, bad = asyncio.run(calls())
    assert got.id == job["id"] and server.state.n("GET", f"{JOBS}/{job['id']}") == 2
    assert server.state.n("POST", "/v1/files") == 1
    assert bad.param == "limit"
    assert not (tmp_path / "evil").exists()
