"""The server's 401 says how to make a token when no tenant exists yet (the usual cause: the
token was made for another data directory) — the real API app through FastAPI's TestClient."""

from __future__ import annotations

import pytest

pytest.importorskip("lorapool.service.api.app")


def _app(data_dir, with_tenant: bool):
    from lorapool.service.admin import create_token
    from lorapool.service.api.app import create_app
    from lorapool.service.artifacts import ArtifactStore
    from lorapool.service.config import Settings
    from lorapool.service.store import Store
    from tests.api.conftest import RecordingExecutor

    s = Settings.from_env(environ={}, data_dir=data_dir)
    if with_tenant:
        create_token(s, "acme")
    store = Store(str(s.database_url))
    return s, store, create_app(s, store, ArtifactStore(s.artifacts_dir), RecordingExecutor())


@pytest.mark.parametrize("with_tenant", [False, True])
def test_401_hints_at_token_create_only_when_no_tenant_exists(tmp_path, with_tenant):
    from fastapi.testclient import TestClient

    s, store, app = _app(tmp_path / "data", with_tenant)
    try:
        with TestClient(app) as c:
            r = c.get("/v1/fine_tuning/jobs", headers={"Authorization": "Bearer sk-nope"})
    finally:
        store.close()
    assert r.status_code == 401
    message = r.json()["error"]["message"]
    if with_tenant:
        assert message == "Invalid API key"
    else:
        assert "no tenant exists yet" in message and "lorapool token create --tenant" in message
        assert str(s.data_dir) in message
