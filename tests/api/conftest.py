"""Fixtures for the API tests: a real SQLite file and artifact folder in tmp_path, the real
app, and either FastAPI's TestClient or uvicorn on a loopback port.

Jobs are run by the pool through Ray; here a `RecordingExecutor` stands in for it (see its
docstring), so created jobs simply stay `queued` unless a test moves them through the store.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest

GiB = 1024**3


class RecordingExecutor:
    """The `JobExecutor` the API talks to, recording each call.

    The real one (`pool.scheduler.RayExecutor`) needs a Ray cluster and the trainer; it is
    tested end to end in tests/e2e and tests/pool. Here nothing runs jobs: `wake()` is counted,
    `cancel()` recorded, `check_fits()` answers `refusal` (None: fits), `nodes()` returns
    `node_list`.
    """

    def __init__(self) -> None:
        self.wakes = 0
        self.cancelled: list[str] = []
        self.checked: list[Any] = []
        self.refusal: Optional[str] = None
        self.placements: list[dict[str, Any]] = []
        self.node_list: list[Any] = []

    def wake(self) -> None:
        self.wakes += 1

    def cancel(self, job_id: str) -> None:
        self.cancelled.append(job_id)

    def check_fits(self, spec: Any, placement: Optional[dict[str, Any]] = None) -> Optional[str]:
        self.checked.append(spec)
        self.placements.append(placement or {})
        return self.refusal

    def nodes(self) -> list[Any]:
        return list(self.node_list)


def chat_lines(n: int, seed: int = 0) -> bytes:
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        out.append(json.dumps({"messages": [{"role": "user", "content": f"{a}+{b}?"},
                                            {"role": "assistant", "content": str(a + b)}]}))
    return ("\n".join(out) + "\n").encode()


@dataclass
class Env:
    root: Path
    settings: Any
    store: Any
    artifacts: Any
    executor: RecordingExecutor
    app: Any
    tokens: dict[str, str] = field(default_factory=dict)

    def headers(self, tenant: str = "acme") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[tenant]}"}

    def objects(self) -> list[Path]:
        return [p for p in (self.root / "data" / "artifacts" / "objects").rglob("*") if p.is_file()]

    def tmp_files(self) -> list[Path]:
        return [p for p in (self.root / "data" / "artifacts" / "tmp").rglob("*") if p.is_file()]


def make_env(root: Path, model_dir: Path, **settings: Any) -> Env:
    from lorapool.service.admin import add_model, create_token
    from lorapool.service.api.app import create_app
    from lorapool.service.artifacts import ArtifactStore
    from lorapool.service.config import Settings
    from lorapool.service.store import Store

    s = Settings.from_env(environ={}, data_dir=root / "data", **settings)
    add_model(s, "tiny-llama", model_dir)
    tokens = {t: create_token(s, t) for t in ("acme", "globex")}
    store = Store(str(s.database_url))
    artifacts = ArtifactStore(s.artifacts_dir)
    executor = RecordingExecutor()
    app = create_app(s, store, artifacts, executor)
    return Env(root, s, store, artifacts, executor, app, tokens)


@pytest.fixture
def env(tmp_path, tiny_model_dir) -> Any:
    e = make_env(tmp_path, tiny_model_dir)
    yield e
    e.store.close()


@pytest.fixture
def client(env) -> Any:
    from fastapi.testclient import TestClient

    with TestClient(env.app) as c:
        c.headers.update(env.headers("acme"))
        yield c


class LiveServer:
    """uvicorn serving an app on 127.0.0.1:<free port> in a thread."""

    def __init__(self, app: Any) -> None:
        import socket

        import uvicorn

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def live(env) -> Any:
    with LiveServer(env.app) as server:
        yield server


def upload(client: Any, data: bytes, filename: str = "train.jsonl", purpose: str = "fine-tune",
           **kw: Any) -> Any:
    return client.post("/v1/files", files={"file": (filename, data)},
                       data={"purpose": purpose}, **kw)


def error_of(resp: Any) -> dict[str, Any]:
    body = resp.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]
