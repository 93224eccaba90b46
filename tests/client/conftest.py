"""A purpose-built lorapool-shaped server for the client tests, served by real uvicorn on an
ephemeral 127.0.0.1 port in a background thread.

It speaks the REST shapes of `lorapool.types` from in-memory state, and tests steer it: inject
failures per (method, path) (a status, a Retry-After, a slow answer, a plain-text 500), script
how a job's status moves on each GET, script how SSE connections drop, and read back every
request it saw (headers included).
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import tarfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Annotated, Any, Optional

import pytest
import uvicorn
from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

API_KEY = "sk-test-good"
JOBS = "/v1/fine_tuning/jobs"


def err(status: int, message: str, type_: str, param: Optional[str] = None,
        code: Optional[str] = None, headers: Optional[dict[str, str]] = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param,
                                   "code": code}}, status_code=status, headers=headers)


def tar_gz(members: list[tuple[tarfile.TarInfo, Optional[bytes]]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


ADAPTER_FILES = {
    "adapter_config.json": b'{"peft_type": "LORA", "r": 4}',
    "adapter_model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ",
    "lorapool.json": b'{"base_model": "tiny"}',
}

ARCHIVES = {
    "ad-good": tar_gz([_file(n, d) for n, d in ADAPTER_FILES.items()]),
    "ad-evil": tar_gz([_file("adapter_config.json", b"{}"), _file("../evil", b"owned")]),
    "ad-abs": tar_gz([_file("adapter_config.json", b"{}"), _file("/tmp/lorapool-abs-evil", b"x")]),
    "ad-link": tar_gz([_file("adapter_config.json", b"{}"), _link("cfg", "../../etc/passwd")]),
    "ad-hardlink": tar_gz([_file("a", b"{}"), _link("b", "../outside", tarfile.LNKTYPE)]),
}


@dataclass
class State:
    """Everything the fake server knows; tests read and steer it directly (same process)."""

    hits: Counter = field(default_factory=Counter)
    inject: dict[tuple[str, str], list[Any]] = field(default_factory=dict)
    seen: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    uploads: dict[str, bytes] = field(default_factory=dict)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    by_key: dict[str, str] = field(default_factory=dict)
    scripts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    events: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # job id -> one entry per SSE connection: (events to send, then "drop" | "end")
    streams: dict[str, list[tuple[list[dict[str, Any]], str]]] = field(default_factory=dict)
    max_upload: int = 10_000
    counter: int = 0

    def add(self, method: str, path: str, *actions: Any) -> None:
        """Queue failures for the next requests to METHOD PATH (each consumed once):
        an int status (503 …), ("retry-after", status, seconds), ("sleep", s), ("text", 500)."""
        self.inject.setdefault((method, path), []).extend(actions)

    def n(self, method: str, path: str) -> int:
        return self.hits[(method, path)]

    def next_id(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}-{self.counter:04d}"

    def make_job(self, status: str = "queued", **fields: Any) -> dict[str, Any]:
        jid = self.next_id("ftjob")
        job = {"object": "fine_tuning.job", "id": jid, "model": "tiny", "created_at": 1000 +
               self.counter, "organization_id": "acme", "status": status, "step": 0,
               "total_steps": 4, **fields}
        self.jobs[jid] = job
        self.events[jid] = []
        return job

    def make_event(self, job_id: str, message: str, **fields: Any) -> dict[str, Any]:
        events = self.events[job_id]
        ev = {"object": "fine_tuning.job.event", "id": f"{job_id}-ev-{len(events) + 1:03d}",
              "created_at": 2000 + len(events), "level": "info", "message": message, **fields}
        events.append(ev)
        return ev


def _page(items: list[dict[str, Any]], after: Optional[str], limit: Optional[int]) -> dict:
    if after is not None:
        ids = [i["id"] for i in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    limit = limit or 20
    data = items[:limit]
    return {"object": "list", "data": data, "has_more": len(items) > limit,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


def build_app(state: State) -> FastAPI:
    app = FastAPI()

    @app.middleware("http")
    async def steer(request: Request, call_next: Any) -> Response:
        key = (request.method, request.url.path)
        state.hits[key] += 1
        state.seen.append({"method": request.method, "path": request.url.path,
                           "headers": dict(request.headers), "query": dict(request.query_params)})
        queue = state.inject.get(key)
        action = queue.pop(0) if queue else None
        if isinstance(action, int):
            return err(action, f"injected {action}", "server_error" if action >= 500 else
                       "rate_limit_error")
        if isinstance(action, tuple) and action[0] == "retry-after":
            return err(action[1], "slow down", "rate_limit_error",
                       headers={"Retry-After": str(action[2])})
        if isinstance(action, tuple) and action[0] == "sleep":
            await asyncio.sleep(action[1])
        if isinstance(action, tuple) and action[0] == "text":
            return PlainTextResponse("Internal Server Error (upstream exploded)",
                                     status_code=action[1])
        return await call_next(request)

    def auth(request: Request) -> None:
        if request.headers.get("authorization") != f"Bearer {API_KEY}":
            raise _Unauthorized()

    class _Unauthorized(Exception):
        pass

    @app.exception_handler(_Unauthorized)
    async def _unauth(request: Request, exc: Exception) -> JSONResponse:
        return err(401, "Invalid or missing API key", "authentication_error",
                   code="invalid_api_key")

    dep = [Depends(auth)]

    @app.post("/v1/files", dependencies=dep)
    async def upload(file: Annotated[UploadFile, File()],
                     purpose: Annotated[str, Form()]) -> Any:
        data = await file.read()
        if len(data) > state.max_upload:
            return err(413, f"the upload is {len(data)} bytes, over the limit of "
                       f"{state.max_upload}", "invalid_request_error", param="file",
                       code="file_too_large")
        fid = state.next_id("file")
        obj = {"object": "file", "id": fid, "bytes": len(data), "created_at": 1,
               "filename": file.filename, "purpose": purpose}
        state.files[fid] = obj
        state.uploads[fid] = data
        return obj

    @app.get("/v1/files", dependencies=dep)
    async def files(after: Optional[str] = None, limit: Optional[int] = None) -> Any:
        return _page(list(reversed(state.files.values())), after, limit)

    @app.get("/v1/files/{fid}", dependencies=dep)
    async def get_file(fid: str) -> Any:
        if fid not in state.files:
            return err(404, f"No file {fid}", "invalid_request_error", param="file_id")
        return state.files[fid]

    @app.delete("/v1/files/{fid}", dependencies=dep)
    async def delete_file(fid: str) -> Any:
        if state.files.pop(fid, None) is None:
            return err(404, f"No file {fid}", "invalid_request_error", param="file_id")
        return {"object": "file", "id": fid, "deleted": True}

    @app.post(JOBS, dependencies=dep)
    async def create_job(request: Request) -> Any:
        body = await request.json()
        key = request.headers.get("idempotency-key")
        if key and key in state.by_key:
            return state.jobs[state.by_key[key]]
        if body.get("model") == "no-such-model":
            return err(404, "The model 'no-such-model' does not exist", "invalid_request_error",
                       param="model", code="model_not_found")
        if body.get("max_seq_len", 0) > 4096:
            return err(400, f"max_seq_len {body['max_seq_len']} is over this server's limit "
                       "4096", "invalid_request_error", param="max_seq_len", code="too_large")
        for name in ("training_file", "validation_file"):
            if body.get(name) is not None and body[name] not in state.files:
                return err(400, f"no such file: {body[name]}", "invalid_request_error",
                           param=name)
        job = state.make_job(model=body["model"], training_file=body["training_file"],
                             validation_file=body.get("validation_file"),
                             seed=body.get("seed", 42), request_body=body)
        if key:
            state.by_key[key] = job["id"]
        return job

    @app.get(JOBS, dependencies=dep)
    async def list_jobs(after: Optional[str] = None,
                        limit: Optional[int] = Query(None, ge=1, le=100)) -> Any:
        return _page(list(reversed(state.jobs.values())), after, limit)

    def _job(jid: str) -> Optional[dict[str, Any]]:
        return state.jobs.get(jid)

    @app.get(JOBS + "/{jid}", dependencies=dep)
    async def get_job(jid: str) -> Any:
        job = _job(jid)
        if job is None:
            return err(404, f"No fine-tuning job {jid}", "invalid_request_error",
                       param="fine_tuning_job_id", code="not_found")
        script = state.scripts.get(jid)
        if script:
            job.update(script.pop(0))
        return job

    @app.post(JOBS + "/{jid}/cancel", dependencies=dep)
    async def cancel(jid: str) -> Any:
        job = _job(jid)
        if job is None:
            return err(404, f"No fine-tuning job {jid}", "invalid_request_error")
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return err(409, f"job {jid} is already {job['status']}", "invalid_request_error",
                       code="job_finished")
        job["status"] = "cancelled"
        return job

    @app.get(JOBS + "/{jid}/checkpoints", dependencies=dep)
    async def checkpoints(jid: str, after: Optional[str] = None,
                          limit: Optional[int] = None) -> Any:
        items = [{"object": "fine_tuning.job.checkpoint", "id": f"ckpt-{s}", "created_at": s,
                  "fine_tuned_model_checkpoint": f"{jid}:ckpt-{s}", "step_number": s,
                  "metrics": {"train_loss": 1.0 / s}, "fine_tuning_job_id": jid}
                 for s in (4, 2)]
        return _page(items, after, limit)

    @app.get(JOBS + "/{jid}/events", dependencies=dep)
    async def events(request: Request, jid: str, after: Optional[str] = None,
                     limit: Optional[int] = None, stream: bool = False) -> Any:
        if jid not in state.jobs:
            return err(404, f"No fine-tuning job {jid}", "invalid_request_error")
        if not stream:
            return _page(list(reversed(state.events[jid])), after, limit)
        plan = state.streams.get(jid) or [([], "end")]
        to_send, ending = plan.pop(0)

        async def gen() -> Any:
            yield ": connected\n\n"
            for ev in to_send:
                state.events[jid].append(ev)
                yield f"id: {ev['id']}\ndata: {json.dumps(ev)}\n\n"
                await asyncio.sleep(0.01)
            if ending == "drop":
                # Cut the connection mid-body: uvicorn never sends the last chunk.
                raise ConnectionAbortedError("test: drop the stream")
            state.jobs[jid]["status"] = "succeeded"
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    @app.get("/v1/models", dependencies=dep)
    async def models(after: Optional[str] = None, limit: Optional[int] = None) -> Any:
        items = [{"object": "model", "id": m, "created": 1, "owned_by": "lorapool"}
                 for m in ("tiny", "smollm2-135m")]
        return _page(items, after, limit)

    @app.get("/v1/nodes", dependencies=dep)
    async def nodes(after: Optional[str] = None, limit: Optional[int] = None) -> Any:
        # Three nodes, served two per page, so the client must follow has_more.
        items = [{"object": "node", "id": f"n{i}", "name": f"desk-{i}", "gpu_name": "RTX 3060",
                  "total_memory_bytes": 12 * 1024**3, "free_memory_bytes": 10 * 1024**3,
                  "state": "idle"} for i in range(3)]
        return _page(items, after, min(limit or 2, 2))

    @app.get("/v1/adapters/{aid}", dependencies=dep)
    async def adapter(aid: str) -> Any:
        if aid not in ARCHIVES:
            return err(404, f"No adapter {aid}", "invalid_request_error")
        return {"object": "adapter", "id": aid, "created_at": 1, "base_model": "tiny"}

    @app.get("/v1/adapters/{aid}/download", dependencies=dep)
    async def download(aid: str) -> Any:
        if aid not in ARCHIVES:
            return err(404, f"No adapter {aid}", "invalid_request_error")
        return Response(ARCHIVES[aid], media_type="application/gzip")

    return app


class Server:
    def __init__(self) -> None:
        self.state = State()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(build_app(self.state), log_level="critical", lifespan="off",
                                log_config=None)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)
        self._sock = sock

    def start(self) -> "Server":
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "the test server did not start"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self._sock.close()


@pytest.fixture(scope="session")
def _server():
    server = Server().start()
    yield server
    server.stop()


@pytest.fixture
def server(_server: Server) -> Server:
    """The running server with fresh state for each test."""
    _server.state.__init__()  # type: ignore[misc]
    return _server


@pytest.fixture
def client(server: Server):
    from lorapool import Client

    c = Client(server.base_url, api_key=API_KEY, timeout=5, max_retries=2)
    # Short back-off keeps the tests fast; the delays' growth is checked separately.
    c.retry_policy.initial_delay = 0.01
    c.retry_policy.max_delay = 0.05
    yield c
    c.close()


@pytest.fixture
def train_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps({"messages": [
        {"role": "user", "content": f"{i}+1?"}, {"role": "assistant", "content": str(i + 1)}]})
        for i in range(5)) + "\n")
    return path
