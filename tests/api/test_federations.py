"""/v1/federations and node-local data sets through the API (a recording executor, no Ray):
every bad field is a 400 naming it; tenancy; what a stored federation looks like."""

from __future__ import annotations

from typing import Any

import pytest

from lorapool.types import Node, NodeDataset

ACME_NODE = Node(id="n1", name="desk-a", datasets=[
    NodeDataset(name="sales", examples=24, lines=24, format="chat", valid=True,
                tenants=["acme", "globex"]),
    NodeDataset(name="broken", valid=False, tenants=["acme"],
                errors=["training file has 1 invalid line(s):", "line 2: invalid JSON"]),
    NodeDataset(name="payroll", examples=9, lines=9, format="chat", valid=True,
                tenants=["hr"]),
])


@pytest.fixture
def api(client, env):
    env.executor.node_list = [ACME_NODE]
    return client


def _file(client, tenant_headers=None) -> str:
    data = b"".join(b'{"messages": [{"role": "user", "content": "q%d"}, '
                    b'{"role": "assistant", "content": "a"}]}\n' % i for i in range(4))
    r = client.post("/v1/files", files={"file": ("t.jsonl", data)}, data={"purpose": "fine-tune"},
                    headers=tenant_headers)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def _body(**kw: Any) -> dict[str, Any]:
    body = {"model": "tiny-llama", "rounds": 2, "local_steps": 3,
            "participants": [{"name": "sales", "dataset": "desk-a:sales"}]}
    body.update(kw)
    return body


def _err(r) -> dict[str, Any]:
    assert r.status_code == 400, r.text
    return r.json()["error"]


@pytest.mark.parametrize("change, param, words", [
    ({"local_steps": None}, "local_steps", "exactly one"),
    ({"local_epochs": 1}, "local_steps", "exactly one"),
    ({"method": "average"}, "method", "unknown merge method"),
    ({"method": "ties"}, "params.density", "required"),
    ({"params": {"target_rank": 2}}, "params", "unknown"),
    ({"min_quorum": 2}, "min_quorum", "exceeds"),
    ({"participants": [{"name": "x"}]}, "participants[0]", "exactly one"),
    ({"participants": [{"dataset": "nowhere:sales"}]}, "participants[0].dataset",
     "no node named 'nowhere'"),
    ({"participants": [{"dataset": "desk-a:broken"}]}, "participants[0].dataset", "line 2"),
    ({"participants": [{"dataset": "desk-a:sales", "tenant": "nobody"}]},
     "participants[0].tenant", "no tenant"),
    ({"participants": [{"dataset": "desk-a:sales"}, {"dataset": "desk-a:sales"}]},
     "participants", "unique"),
    ({"participants": [{"name": "a", "dataset": "desk-a:sales", "weight": 1},
                       {"name": "b", "dataset": "desk-a:sales"}]},
     "participants[1].weight", "every participant"),
])
def test_bad_fields_are_400s_naming_them(api, change, param, words):
    body = {k: v for k, v in _body(**change).items() if v is not None}
    err = _err(api.post("/v1/federations", json=body))
    assert err["param"] == param and words in err["message"], err


def test_another_tenants_or_unknown_file_is_refused(api, env):
    theirs = _file(api, env.headers("globex"))
    err = _err(api.post("/v1/federations", json=_body(participants=[
        {"training_file": theirs}])))
    assert err["param"] == "participants[0].training_file"
    mine = _file(api)
    err = _err(api.post("/v1/federations", json=_body(participants=[
        {"training_file": mine, "tenant": "globex"}])))
    assert "private to their tenant" in err["message"]


def test_created_federation_is_stored_and_tenant_scoped(api, env):
    mine = _file(api)
    r = api.post("/v1/federations", json=_body(participants=[
        {"name": "hq", "training_file": mine, "weight": 2},
        {"name": "sales", "dataset": {"node": "desk-a", "name": "sales"}, "tenant": "globex",
         "weight": 1}], method="svd", min_quorum=1, round_deadline_s=30))
    assert r.status_code == 200, r.text
    fed = r.json()
    assert fed["status"] == "running" and fed["rounds_total"] == 2 and fed["local_steps"] == 3
    assert fed["participants"][1]["dataset"] == "desk-a:sales"
    assert fed["participants"][1]["examples"] == 24 and fed["min_quorum"] == 1
    stored = env.store.get_federation(fed["id"])
    assert stored.weights == {"hq": 2.0, "sales": 1.0} and stored.spec["max_steps"] == 3
    # The participant tenant reads it; a stranger does not; only the creator lists it.
    other = {"Authorization": env.headers("globex")["Authorization"]}
    assert api.get(f"/v1/federations/{fed['id']}", headers=other).status_code == 200
    assert api.get("/v1/federations", headers=other).json()["data"] == []
    assert [f["id"] for f in api.get("/v1/federations").json()["data"]] == [fed["id"]]
    assert api.post(f"/v1/federations/{fed['id']}/cancel", headers=other).status_code == 404
    assert api.post(f"/v1/federations/{fed['id']}/cancel").status_code == 200
    assert env.store.get_federation(fed["id"]).cancel_requested
    assert api.get("/v1/federations/fed-nope").status_code == 404


def test_routes_need_a_token(api):
    for method, path in (("GET", "/v1/federations"), ("POST", "/v1/federations"),
                         ("GET", "/v1/federations/x"), ("POST", "/v1/federations/x/cancel")):
        assert api.request(method, path, headers={"Authorization": ""}).status_code == 401


def test_a_job_on_a_node_local_data_set_is_pinned_and_checked(api, env):
    r = api.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "dataset": "desk-a:sales"})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["dataset"] == "desk-a:sales" and job["training_file"] is None
    assert env.executor.placements[-1] == {"node": "desk-a"}
    assert env.store.get_job(job["id"]).dataset == {"node": "desk-a", "name": "sales",
                                                     "examples": 24}
    err = _err(api.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama",
                                                       "dataset": "desk-a:broken"}))
    assert err["param"] == "dataset" and "line 2: invalid JSON" in err["message"]
    err = _err(api.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-llama", "dataset": "desk-a:sales", "training_file": "file-x"}))
    assert err["param"] == "training_file"
    err = _err(api.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-llama", "dataset": "desk-a:sales", "init_adapter": "ft-adapter-x"}))
    assert err["param"] == "init_adapter"


def test_a_data_set_not_granted_to_the_tenant_is_not_offered_to_it(api, env):
    # The donor granted "payroll" to hr only: acme can neither train on it nor see it.
    r = api.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama",
                                                "dataset": "desk-a:payroll"})
    err = _err(r)
    assert err["param"] == "dataset" and "offers no data set 'payroll'" in err["message"]
    assert "payroll" not in err["message"].split("it offers:")[1]
    err = _err(api.post("/v1/federations", json=_body(
        participants=[{"dataset": "desk-a:payroll"}])))
    assert err["param"] == "participants[0].dataset"
    nodes = api.get("/v1/nodes").json()["data"]
    assert sorted(d["name"] for d in nodes[0]["datasets"]) == ["broken", "sales"]
    assert all("tenants" not in d for d in nodes[0]["datasets"])
