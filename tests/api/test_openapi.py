"""/openapi.json tells the truth: the limits the API enforces, its real error responses and
the links between operations (issue 12, "Schema that tells the truth")."""

from __future__ import annotations

from typing import Any

import pytest

from .conftest import chat_lines, upload


@pytest.fixture
def file_id(client) -> str:
    return upload(client, chat_lines(4)).json()["id"]


def _doc(client: Any) -> dict[str, Any]:
    r = client.get("/openapi.json")
    assert r.status_code == 200
    return r.json()


def test_job_request_limits_are_in_the_schema(client):
    schemas = _doc(client)["components"]["schemas"]
    hp = schemas["HyperparametersIn"]["properties"]
    n_epochs = next(s for s in hp["n_epochs"]["anyOf"] if s.get("type") == "integer")
    assert (n_epochs["minimum"], n_epochs["maximum"]) == (1, 100)
    lrm = next(s for s in hp["learning_rate_multiplier"]["anyOf"] if s.get("type") == "number")
    assert (lrm["exclusiveMinimum"], lrm["maximum"]) == (0, 100)
    job = schemas["CreateJobRequest"]["properties"]
    assert (job["max_seq_len"]["minimum"], job["max_seq_len"]["maximum"]) == (8, 32768)
    assert job["model"]["maxLength"] == 128
    metadata = next(s for s in job["metadata"]["anyOf"] if s.get("type") == "object")
    assert metadata["maxProperties"] == 16 and metadata["propertyNames"]["maxLength"] == 64
    assert metadata["additionalProperties"]["maxLength"] == 512
    suffix = next(s for s in job["suffix"]["anyOf"] if s.get("type") == "string")
    assert suffix["pattern"] and suffix["maxLength"] == 64


def test_limits_in_the_schema_are_the_ones_enforced(client, file_id):
    """A value just past a stated bound is refused, one at the bound accepted."""
    base = {"model": "tiny-llama", "training_file": file_id}
    over = client.post("/v1/fine_tuning/jobs",
                       json={**base, "hyperparameters": {"n_epochs": 101}})
    assert over.status_code == 400 and over.json()["error"]["param"] == "hyperparameters.n_epochs"
    at = client.post("/v1/fine_tuning/jobs", json={**base, "hyperparameters": {"n_epochs": 100}})
    assert at.status_code == 200, at.text
    too_many = {f"k{i}": "v" for i in range(17)}
    r = client.post("/v1/fine_tuning/jobs", json={**base, "metadata": too_many})
    assert r.status_code == 400 and r.json()["error"]["param"] == "metadata"


def test_upload_form_and_its_size_limit_are_declared(client, env):
    op = _doc(client)["paths"]["/v1/files"]["post"]
    form = op["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["file", "purpose"]
    assert form["properties"]["file"]["maxLength"] == env.settings.max_upload_bytes
    assert form["properties"]["purpose"]["enum"] == ["fine-tune"]
    assert "413" in op["responses"]
    files = _doc(client)["paths"]["/v1/files"]["get"]
    lengths = {p["name"]: [s.get("maxLength") for s in p["schema"]["anyOf"]]
               for p in files["parameters"] if p["name"] in ("after", "purpose")}
    assert lengths == {"after": [64, None], "purpose": [64, None]}  # string | null


def test_errors_are_declared_as_400_in_the_error_shape(client):
    doc = _doc(client)
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert "422" not in op["responses"], (method, path)
            if path != "/healthz":
                assert op["responses"]["400"]["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/ErrorResponse"}, (method, path)
    detail = doc["components"]["schemas"]["ErrorDetail"]
    assert set(detail["properties"]) == {"message", "type", "param", "code"}
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"


def test_links_chain_file_to_job_to_adapter(client):
    paths = _doc(client)["paths"]
    ops = {op["operationId"]: (m, p) for p, o in paths.items() for m, op in o.items()}
    upload_links = paths["/v1/files"]["post"]["responses"]["200"]["links"]
    to_job = upload_links["CreateJobFromFile"]
    assert ops[to_job["operationId"]] == ("post", "/v1/fine_tuning/jobs")
    assert to_job["requestBody"] == {"training_file": "$response.body#/id"}
    job_links = paths["/v1/fine_tuning/jobs"]["post"]["responses"]["200"]["links"]
    assert job_links["GetJob"]["parameters"] == {"job_id": "$response.body#/id"}
    get_job_links = paths["/v1/fine_tuning/jobs/{job_id}"]["get"]["responses"]["200"]["links"]
    to_adapter = get_job_links["GetAdapter"]
    assert ops[to_adapter["operationId"]] == ("get", "/v1/adapters/{adapter_id}")
    assert to_adapter["parameters"] == {"adapter_id": "$response.body#/fine_tuned_model"}
