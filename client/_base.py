"""The transport-independent half of the client: settings, requests as data, retry timing, SSE.

The sync and async clients share everything here and in `_plans.py`; they differ only in how
they perform the steps (`httpx.Client` vs `httpx.AsyncClient`, `time.sleep` vs `asyncio.sleep`).
An API operation is a *plan*: a generator that yields steps (`Call`, `Sleep`, `Emit`, stream
steps) and receives each step's result, so its logic (pagination, polling, reconnecting) is
written once.
"""

from __future__ import annotations

import email.utils
import json
import os
import random
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Optional, Union

import httpx

from .errors import APIConnectionError, APITimeoutError

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
BASE_URL_ENV = "LORAPOOL_BASE_URL"
API_KEY_ENV = "LORAPOOL_API_KEY"
DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_RETRIES = 2
IDEMPOTENCY_HEADER = "Idempotency-Key"

# Statuses worth retrying: the server may answer differently next time.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("lorapool")
    except Exception:  # not installed (running from a source tree)
        return "0"


def new_idempotency_key() -> str:
    return f"lorapool-{uuid.uuid4()}"


# -- steps of a plan -------------------------------------------------------------------------


@dataclass
class Call:
    """One HTTP request; its result is `parse(response)` once the status is 2xx."""

    method: str
    path: str
    parse: Callable[[httpx.Response], Any] = lambda r: r.json()
    params: Optional[dict[str, Any]] = None
    json: Any = None
    data: Optional[dict[str, Any]] = None
    # Multipart uploads: form name -> (filename, local path); opened afresh for each attempt.
    files: Optional[dict[str, tuple[str, Path]]] = None
    headers: dict[str, str] = field(default_factory=dict)
    timeout: Optional[httpx.Timeout] = None

    @property
    def idempotent(self) -> bool:
        # A POST is safe to repeat when it carries an idempotency key: the server dedupes it.
        return self.method.upper() in IDEMPOTENT_METHODS or IDEMPOTENCY_HEADER in self.headers


@dataclass
class Sleep:
    seconds: float


@dataclass
class Emit:
    """Hand a value to the caller of an iterating plan (e.g. one JobEvent)."""

    value: Any


@dataclass
class OpenStream:
    """Open a streaming response (retried like `call`); the result is a stream handle."""

    call: Call


@dataclass
class ReadEvent:
    """The next Server-Sent Event of `stream`, or None at its end."""

    stream: Any


@dataclass
class CloseStream:
    stream: Any


@dataclass
class Download:
    """Stream the body of `call` into the file `dest`; the result is the byte count.
    Past `max_bytes` the download stops with ArchiveLimitError."""

    call: Call
    dest: Path
    max_bytes: Optional[int] = None


Step = Union[Call, Sleep, Emit, OpenStream, ReadEvent, CloseStream, Download]
Plan = Generator[Step, Any, Any]


# -- settings and requests -------------------------------------------------------------------


def resolve_base_url(base_url: Optional[str]) -> str:
    url = (base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).strip().rstrip("/")
    # Accept the OpenAI-SDK style ".../v1" too: our paths carry the /v1 themselves.
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


def resolve_api_key(api_key: Optional[str]) -> Optional[str]:
    return api_key or os.environ.get(API_KEY_ENV) or None


def make_timeout(timeout: Union[float, httpx.Timeout, None]) -> httpx.Timeout:
    if isinstance(timeout, httpx.Timeout):
        return timeout
    if timeout is None:
        return httpx.Timeout(None)
    # A dead host should fail fast even when reads may legitimately take long.
    return httpx.Timeout(timeout, connect=min(float(timeout), 10.0))


def stream_timeout(timeout: httpx.Timeout) -> httpx.Timeout:
    """An event stream is quiet while a long step runs: allow long reads, keep connect short."""
    read = None if timeout.read is None else max(timeout.read, 300.0)
    return httpx.Timeout(connect=timeout.connect, read=read, write=timeout.write,
                         pool=timeout.pool)


def default_headers(api_key: Optional[str]) -> dict[str, str]:
    headers = {"User-Agent": f"lorapool-python/{_version()}", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def build_request(http: Union[httpx.Client, httpx.AsyncClient], call: Call,
                  files: ExitStack) -> httpx.Request:
    """An httpx request for `call`; upload files are opened on `files` (closed by the caller)."""
    kwargs: dict[str, Any] = {}
    if call.params:
        kwargs["params"] = {k: v for k, v in call.params.items() if v is not None}
    if call.json is not None:
        kwargs["json"] = call.json
    if call.data:
        kwargs["data"] = call.data
    if call.files:
        kwargs["files"] = {
            name: (filename, files.enter_context(open(path, "rb")), "application/octet-stream")
            for name, (filename, path) in call.files.items()
        }
    if call.timeout is not None:
        kwargs["timeout"] = call.timeout
    return http.build_request(call.method, call.path, headers=call.headers, **kwargs)


# -- retries ---------------------------------------------------------------------------------


@dataclass
class RetryPolicy:
    max_retries: int = DEFAULT_MAX_RETRIES
    initial_delay: float = 0.5
    max_delay: float = 8.0
    # Retry-After above this is not honoured as such (a server asking for minutes is down).
    max_retry_after: float = 60.0

    def backoff(self, attempt: int) -> float:
        """Exponential back-off with up to 25 % jitter down, so clients do not retry in step."""
        delay = min(self.initial_delay * (2.0 ** attempt), self.max_delay)
        return delay * (1.0 - 0.25 * random.random())

    def retry_after(self, response: httpx.Response) -> Optional[float]:
        value = response.headers.get("retry-after-ms")
        if value is not None:
            try:
                return float(value) / 1000.0
            except ValueError:
                pass
        value = response.headers.get("retry-after")
        if value is None:
            return None
        try:
            return float(value)
        except ValueError:
            parsed = email.utils.parsedate_tz(value)
            if parsed is None:
                return None
            return float(email.utils.mktime_tz(parsed) - time.time())

    def delay_for_response(self, call: Call, response: httpx.Response,
                           attempt: int) -> Optional[float]:
        """Seconds to wait before retrying after `response`, or None to give up."""
        if attempt >= self.max_retries or response.status_code not in RETRY_STATUSES:
            return None
        # A 429 is refused before the server acts on the request, so even a POST without an
        # idempotency key is safe to send again.
        if not call.idempotent and response.status_code != 429:
            return None
        after = self.retry_after(response)
        if after is not None and 0 <= after <= self.max_retry_after:
            return after
        return self.backoff(attempt)

    def delay_for_error(self, call: Call, exc: httpx.TransportError,
                        attempt: int) -> Optional[float]:
        """Seconds to wait before retrying after a transport error, or None to give up."""
        if attempt >= self.max_retries:
            return None
        # Nothing reached the server when the connection could not be made: always safe.
        never_sent = isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))
        if never_sent or call.idempotent:
            return self.backoff(attempt)
        return None


def wrap_transport_error(exc: httpx.TransportError,
                         request: Optional[httpx.Request] = None) -> APIConnectionError:
    if request is None:
        try:
            request = exc.request
        except RuntimeError:  # an httpx error raised without a request attached
            request = None
    where = f" ({request.method} {request.url})" if request is not None else ""
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"Request timed out{where}: {detail}", request=request)
    return APIConnectionError(f"Connection error{where}: {detail}", request=request)


# -- Server-Sent Events ----------------------------------------------------------------------


@dataclass
class SSEMessage:
    data: str
    event: str = "message"
    id: Optional[str] = None
    retry: Optional[int] = None

    def json(self) -> Any:
        return json.loads(self.data)


class SSEDecoder:
    """Turns the lines of a text/event-stream into messages (the WHATWG algorithm, minus BOM)."""

    def __init__(self) -> None:
        self._data: list[str] = []
        self._event = ""
        self._id: Optional[str] = None
        self._retry: Optional[int] = None

    def feed(self, line: str) -> Optional[SSEMessage]:
        line = line.rstrip("\r\n")
        if not line:
            if not self._data and not self._event and self._id is None:
                return None
            msg = SSEMessage(data="\n".join(self._data), event=self._event or "message",
                             id=self._id, retry=self._retry)
            self._data, self._event, self._id, self._retry = [], "", None, None
            return msg if msg.data or msg.event != "message" else None
        if line.startswith(":"):  # comment / keep-alive
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isdigit():
            self._retry = int(value)
        return None
