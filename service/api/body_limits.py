"""Bounds on every request body the API parses as JSON, checked before FastAPI parses it.

FastAPI reads a JSON body whole (`await request.body()`) and hands it to `json.loads`, whose C
parser recurses once per nesting level: an unbounded body can fill memory, and
``{"integrations": [[[[…]]]]}`` ends in a RecursionError. This ASGI middleware reads the body
first (at most `MAX_JSON_BODY_BYTES`: a job request is a few KiB), answers 413 past that and
400 naming the top-level field when arrays/objects nest deeper than `MAX_JSON_BODY_DEPTH`, and
otherwise replays the same bytes to the app. The one streaming route, the file upload, is left
alone: it has its own limit (`LORAPOOL_MAX_UPLOAD_BYTES`) and never buffers the body.
"""

from __future__ import annotations

import re
from typing import Optional

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..train.data_validate import nests_deeper_than
from .errors import APIError, error_response

MAX_JSON_BODY_BYTES = 1024 * 1024
# The deepest real request (method.supervised.hyperparameters.n_epochs) nests 4 levels.
MAX_JSON_BODY_DEPTH = 32
# Routes that stream their body themselves (method, path).
STREAMING_ROUTES = frozenset({("POST", "/v1/files")})

_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}:]', re.DOTALL)


def deep_field(body: bytes, limit: int) -> Optional[str]:
    """The top-level key under which `body` first nests deeper than `limit` (None when that
    happens outside a top-level object's value). Only called once the depth is known to be
    over the limit, so the Python loop stops within `limit` levels of the culprit."""
    depth = 0
    key: Optional[str] = None
    last_string: Optional[bytes] = None
    for m in _TOKEN.finditer(body):
        tok = m.group()
        if tok in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return key
        elif tok in (b"]", b"}"):
            depth -= 1
        elif tok == b":":
            if depth == 1 and last_string is not None:
                key = last_string[1:-1].decode("utf-8", "replace")[:64]
        last_string = tok if tok.startswith(b'"') else None
    return key


def _is_json(content_type: str) -> bool:
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/")
                                          and kind.endswith("+json"))


class JsonBodyGuard:
    """See the module docstring."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_JSON_BODY_BYTES,
                 max_depth: int = MAX_JSON_BODY_DEPTH) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_depth = max_depth

    def _too_large(self) -> APIError:
        return APIError(413, f"Request body too large: the limit for a JSON body is "
                        f"{self.max_bytes} bytes", code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) in STREAMING_ROUTES:
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", ())}
        declared = headers.get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(self._too_large())(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: nothing to answer
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await error_response(self._too_large())(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        if body and _is_json(content_type) and nests_deeper_than(body, self.max_depth):
            field = deep_field(body, self.max_depth)
            where = f"'{field}'" if field else "the body"
            err = APIError(400, f"Invalid value for {where}: arrays/objects nest deeper than "
                           f"{self.max_depth} levels (the limit for a request body)",
                           param=field, code="nesting_too_deep")
            await error_response(err)(scope, receive, send)
            return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls: disconnect notices, as before

        await self.app(scope, replay, send)
