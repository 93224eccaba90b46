"""GET /metrics: admin tokens only; the exposition parses and agrees with what the API lists."""

from __future__ import annotations

import time

import pytest

from .conftest import chat_lines, error_of, upload

GiB = 1024**3


def _samples(text: str) -> dict[str, list]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


def _value(samples: dict[str, list], name: str, **labels: str) -> float:
    found = [s.value for s in samples.get(name, [])
             if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, samples.get(name))
    return found[0]


@pytest.fixture
def admin_token(env):
    from lorapool.service.admin import create_token

    return create_token(env.settings, "ops", admin=True)


def test_no_token_is_401_and_a_tenant_token_403(client, env):
    from fastapi.testclient import TestClient

    with TestClient(env.app) as anonymous:
        r = anonymous.get("/metrics")
    assert r.status_code == 401 and error_of(r)["code"] == "missing_api_key"
    r = client.get("/metrics")  # acme's ordinary token
    assert r.status_code == 403
    err = error_of(r)
    assert err["type"] == "permission_error" and "admin" in err["message"]


def test_values_match_the_api(client, env, admin_token):
    from lorapool.types import Node

    file_id = upload(client, chat_lines(16)).json()["id"]
    ids = [client.post("/v1/fine_tuning/jobs",
                       json={"model": "tiny-llama", "training_file": file_id}).json()["id"]
           for _ in range(3)]
    other = env.headers("globex")
    gfile = upload(client, chat_lines(8), headers=other).json()["id"]
    client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": gfile},
                headers=other)
    # One of acme's jobs starts (waited 5 s) and reports three steps.
    created = env.store.get_job(ids[0]).created_at
    assert env.store.transition(ids[0], ["queued", "validating_files"], "running",
                                started_at=created + 5)
    for step in (1, 2, 3):
        env.store.add_event(ids[0], f"Step {step}/8", type="metrics",
                            data={"step": step, "total_steps": 8, "train_loss": 1.0 / step,
                                  "tokens_per_s": 100.0 * step})
        time.sleep(0.01)
    env.executor.node_list = [
        Node(id="n1", name="desk-1", total_memory_bytes=8 * GiB, free_memory_bytes=5 * GiB,
             reserved_memory_bytes=2 * GiB, state="training", jobs=[ids[0]]),
        Node(id="n2", name="desk-2", total_memory_bytes=4 * GiB, free_memory_bytes=4 * GiB),
    ]

    r = client.get("/metrics", headers={"Authorization": f"Bearer {admin_token}"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    m = _samples(r.text)

    # Jobs by state and tenant: the same counts the API lists for each tenant.
    acme = client.get("/v1/fine_tuning/jobs", params={"limit": 100}).json()["data"]
    globex = client.get("/v1/fine_tuning/jobs", headers=other).json()["data"]
    for tenant, jobs in (("acme", acme), ("globex", globex)):
        for state in {j["status"] for j in jobs}:
            expected = sum(1 for j in jobs if j["status"] == state)
            assert _value(m, "lorapool_jobs", state=state, tenant=tenant) == expected
    assert sum(s.value for s in m["lorapool_jobs"]) == len(acme) + len(globex) == 4
    queued = [j for j in acme + globex if j["status"] == "queued"]
    assert _value(m, "lorapool_queue_length") == len(queued) == 3
    assert _value(m, "lorapool_queue_wait_seconds_count") == 1
    assert _value(m, "lorapool_queue_wait_seconds_sum") == 5
    assert _value(m, "lorapool_queue_wait_seconds_bucket", le="1.0") == 0
    assert _value(m, "lorapool_queue_wait_seconds_bucket", le="5.0") == 1

    # Nodes and memory: what GET /v1/nodes says.
    nodes = client.get("/v1/nodes").json()["data"]
    assert _value(m, "lorapool_nodes", state="training") == 1
    assert _value(m, "lorapool_nodes", state="idle") == 1
    for n in nodes:
        assert _value(m, "lorapool_node_memory_bytes", node=n["name"], kind="free") == \
            n["free_memory_bytes"]
        assert _value(m, "lorapool_node_memory_bytes", node=n["name"], kind="promised") == \
            n["reserved_memory_bytes"]
    assert _value(m, "lorapool_pool_free_memory_bytes") == 9 * GiB
    assert _value(m, "lorapool_pool_promised_memory_bytes") == 2 * GiB

    # Step events: three steps, two step intervals, the last tokens/s of the running job.
    assert _value(m, "lorapool_train_steps_total") == 3
    assert _value(m, "lorapool_train_step_seconds_count") == 2
    assert _value(m, "lorapool_job_tokens_per_second", job=ids[0]) == 300.0

    # API latency by route template, never by raw path.
    routes = {s.labels["route"] for s in m["lorapool_http_request_duration_seconds_count"]}
    assert "/v1/fine_tuning/jobs" in routes and "/v1/files" in routes
    assert not any(ids[0] in r for r in routes)
    client.get(f"/v1/fine_tuning/jobs/{ids[1]}")
    client.get("/no/such/path")
    m = _samples(client.get("/metrics", headers={"Authorization": f"Bearer {admin_token}"}).text)
    routes = {s.labels["route"] for s in m["lorapool_http_request_duration_seconds_count"]}
    assert "/v1/fine_tuning/jobs/{job_id}" in routes and "(unmatched)" in routes
    assert not any("/no/such" in r for r in routes)

    # A finished job drops out of the throughput gauge.
    env.store.transition(ids[0], ["running"], "succeeded")
    m = _samples(client.get("/metrics", headers={"Authorization": f"Bearer {admin_token}"}).text)
    assert not m.get("lorapool_job_tokens_per_second")


def test_admin_token_is_still_its_own_tenant(client, env, admin_token):
    r = client.get("/v1/me", headers={"Authorization": f"Bearer {admin_token}"})
    assert r.json() == {"object": "principal", "tenant": "ops", "admin": True}
    assert client.get("/v1/me").json()["admin"] is False
    # The all-tenants list is for admins; a tenant token gets the error shape's 403.
    file_id = upload(client, chat_lines(8)).json()["id"]
    job = client.post("/v1/fine_tuning/jobs",
                      json={"model": "tiny-llama", "training_file": file_id}).json()
    r = client.get("/v1/admin/jobs")
    assert r.status_code == 403 and error_of(r)["code"] == "admin_required"
    r = client.get("/v1/admin/jobs", headers={"Authorization": f"Bearer {admin_token}"})
    assert [(j["id"], j["organization_id"]) for j in r.json()["data"]] == [(job["id"], "acme")]
    # Its own job list is its own tenant's (empty), not everyone's.
    r = client.get("/v1/fine_tuning/jobs", headers={"Authorization": f"Bearer {admin_token}"})
    assert r.json()["data"] == []
