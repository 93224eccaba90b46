"""The OpenAPI document, corrected to say what the API really does.

FastAPI derives the document from the routes; a few truths it cannot see are added here, once,
when the document is first built:

- errors are 400 (not FastAPI's 422) in the shape `{"error": {message, type, param, code}}`,
  and every operation can answer 401; those with an id in the path 404; JSON bodies 413;
- the upload (`POST /v1/files`) reads its multipart body itself, so its form (a `file` of at
  most `LORAPOOL_MAX_UPLOAD_BYTES`, a `purpose`) is declared here, with that limit;
- bearer authentication;
- `links` between operations (a file → a job that trains on it → the adapter it made), so a
  stateful tester (schemathesis) can chain real ids instead of guessing them.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from lorapool.types import ErrorResponse

from .body_limits import MAX_JSON_BODY_BYTES, MAX_JSON_BODY_DEPTH

_ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
_ERRORS = {
    "400": "Invalid request: `error.param` names the field at fault",
    "401": "Missing or unknown API key",
    "404": "No such resource (or it belongs to another tenant)",
    "413": "Request body over its limit",
}

FILES = "/v1/files"
JOBS = "/v1/fine_tuning/jobs"


def _error_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR_REF}}}


def _op_ids(doc: dict[str, Any]) -> dict[tuple[str, str], str]:
    return {(method.upper(), path): op["operationId"]
            for path, ops in doc["paths"].items() for method, op in ops.items()
            if isinstance(op, dict) and "operationId" in op}


def _links(doc: dict[str, Any]) -> None:
    ids = _op_ids(doc)

    def link(method: str, path: str, description: str, **kw: Any) -> tuple[str, dict[str, Any]]:
        return ids[(method, path)], {"operationId": ids[(method, path)],
                                     "description": description, **kw}

    file_id = {"parameters": {"file_id": "$response.body#/id"}}
    job_id = {"parameters": {"job_id": "$response.body#/id"}}
    plan: dict[tuple[str, str], dict[str, tuple[str, dict[str, Any]]]] = {
        ("POST", FILES): {
            "GetFile": link("GET", f"{FILES}/{{file_id}}", "the uploaded file", **file_id),
            "CreateJobFromFile": link(
                "POST", JOBS, "a fine-tuning job that trains on this file",
                requestBody={"training_file": "$response.body#/id"}),
            "DeleteFile": link("DELETE", f"{FILES}/{{file_id}}", "remove the file", **file_id),
        },
        ("POST", JOBS): {
            "GetJob": link("GET", f"{JOBS}/{{job_id}}", "the new job", **job_id),
            "CancelJob": link("POST", f"{JOBS}/{{job_id}}/cancel", "cancel it", **job_id),
            "ListJobEvents": link("GET", f"{JOBS}/{{job_id}}/events", "its events", **job_id),
            "ListJobCheckpoints": link("GET", f"{JOBS}/{{job_id}}/checkpoints",
                                       "its checkpoints", **job_id),
        },
        ("GET", f"{JOBS}/{{job_id}}"): {
            "GetAdapter": link("GET", "/v1/adapters/{adapter_id}",
                               "the adapter a succeeded job made (fine_tuned_model)",
                               parameters={"adapter_id": "$response.body#/fine_tuned_model"}),
            "DownloadAdapter": link("GET", "/v1/adapters/{adapter_id}/download",
                                    "download that adapter",
                                    parameters={"adapter_id":
                                                "$response.body#/fine_tuned_model"}),
        },
    }
    for (method, path), links in plan.items():
        ok = doc["paths"][path][method.lower()]["responses"]["200"]
        ok.setdefault("links", {}).update({name: spec for name, (_, spec) in links.items()})


def _upload_body(doc: dict[str, Any], max_upload_bytes: int) -> None:
    op = doc["paths"][FILES]["post"]
    op["requestBody"] = {"required": True, "content": {"multipart/form-data": {
        "schema": {
            "type": "object", "required": ["file", "purpose"],
            "properties": {
                "file": {"type": "string", "format": "binary", "maxLength": max_upload_bytes,
                         "description": f"JSONL training data, at most {max_upload_bytes} bytes "
                         "(LORAPOOL_MAX_UPLOAD_BYTES); one example per line, each line at "
                         "most 8 MiB and nesting at most 64 levels"},
                "purpose": {"type": "string", "enum": ["fine-tune"]},
            },
        },
    }}}
    op["x-max-upload-bytes"] = max_upload_bytes


def build(app: FastAPI, max_upload_bytes: int) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, description=app.description,
                      routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.setdefault("ErrorResponse", ErrorResponse.model_json_schema(
        ref_template="#/components/schemas/{model}"))
    for name, sub in schemas["ErrorResponse"].pop("$defs", {}).items():
        schemas.setdefault(name, sub)
    doc["components"]["securitySchemes"] = {
        "bearerAuth": {"type": "http", "scheme": "bearer",
                       "description": "an API token (lorapool token create)"}}
    doc["security"] = [{"bearerAuth": []}]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)  # request validation answers 400 (errors.py)
            if path == "/healthz":
                op["security"] = []
                continue
            wanted = ["400", "401"] + (["404"] if "{" in path else [])
            if method in ("post", "put", "patch"):
                wanted.append("413")
                if path != FILES and "requestBody" in op:
                    op["requestBody"]["x-max-bytes"] = MAX_JSON_BODY_BYTES
                    op["requestBody"]["x-max-depth"] = MAX_JSON_BODY_DEPTH
            for status in wanted:
                responses.setdefault(status, _error_response(_ERRORS[status]))
    _upload_body(doc, max_upload_bytes)
    _links(doc)
    text = str(doc)
    for unused in ("HTTPValidationError", "ValidationError"):  # only the 422s named them
        if f"#/components/schemas/{unused}'" not in text:
            schemas.pop(unused, None)
    return doc


def install(app: FastAPI, max_upload_bytes: int) -> None:
    """Serve the corrected document at /openapi.json (built once, on first request)."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app, max_upload_bytes)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
