"""Typed errors of the lorapool client.

Every error the client raises on purpose derives from `LorapoolError`, so callers (and the CLI)
can catch one class. HTTP errors carry what the server said: `status_code`, `message`, `type`,
`param` (the field at fault, for 400/422) and `code`, parsed from lorapool's
`{"error": {"message", "type", "param", "code"}}` body (or FastAPI's `{"detail": ...}`).
"""

from __future__ import annotations

from typing import Any, Optional

import httpx


class LorapoolError(Exception):
    """Base of every error the lorapool client raises."""


class InvalidParameterError(LorapoolError, ValueError):
    """A call's argument was refused before anything was sent; `.param` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


class UnsafeArchiveError(LorapoolError):
    """A downloaded archive had a member that would land outside the destination."""


class ArchiveLimitError(UnsafeArchiveError):
    """A downloaded archive is over an extraction limit (total bytes, member count or
    compression ratio); nothing was written. `.limit` names it (``"bytes"``, ``"members"``,
    ``"ratio"``), `.maximum` is the limit and `.actual` what the archive reached (or declared)
    when it was refused."""

    def __init__(self, message: str, *, limit: str, maximum: float, actual: float) -> None:
        super().__init__(message)
        self.limit = limit
        self.maximum = maximum
        self.actual = actual


class JobWaitTimeout(LorapoolError, TimeoutError):
    """`jobs.wait(..., timeout=)` ran out before the job reached a terminal status."""

    def __init__(self, message: str, job: Any = None) -> None:
        super().__init__(message)
        self.job = job


class APIConnectionError(LorapoolError):
    """The server could not be reached (refused, reset, DNS …) after the allowed retries."""

    def __init__(self, message: str = "Connection error.", *,
                 request: Optional[httpx.Request] = None) -> None:
        super().__init__(message)
        self.message = message
        self.request = request


class APITimeoutError(APIConnectionError):
    """The request timed out (after the allowed retries)."""

    def __init__(self, message: str = "Request timed out.", *,
                 request: Optional[httpx.Request] = None) -> None:
        super().__init__(message, request=request)


class APIStatusError(LorapoolError):
    """The server answered with a 4xx/5xx status."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        type: Optional[str] = None,
        param: Optional[str] = None,
        code: Optional[str] = None,
        response: Optional[httpx.Response] = None,
        body: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.type = type
        self.param = param
        self.code = code
        self.response = response
        self.body = body

    def __str__(self) -> str:
        where = f" (param: {self.param})" if self.param else ""
        kind = f" {self.type}" if self.type else ""
        return f"{self.status_code}{kind}: {self.message}{where}"


class BadRequestError(APIStatusError):
    """400 / 422: the request was refused; `.param` names the field when the server knows it."""


# The name issue 3 uses; the same class.
InvalidRequestError = BadRequestError


class AuthenticationError(APIStatusError):
    """401: missing or wrong API key."""


class PermissionDeniedError(APIStatusError):
    """403: the key is valid but may not do this."""


class NotFoundError(APIStatusError):
    """404: no such resource (or it belongs to another tenant)."""


class ConflictError(APIStatusError):
    """409: the resource is in a state that forbids this (e.g. cancelling a finished job)."""


class PayloadTooLargeError(APIStatusError):
    """413: the upload is over the server's limit."""


class RateLimitError(APIStatusError):
    """429: too many requests (retried with back-off before this is raised)."""


class InternalServerError(APIStatusError):
    """5xx: the server failed (retried with back-off for idempotent calls before this is raised)."""


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: BadRequestError,
    429: RateLimitError,
}


def status_error_class(status_code: int) -> type[APIStatusError]:
    if status_code >= 500:
        return InternalServerError
    return _BY_STATUS.get(status_code, APIStatusError)


def _param_from_loc(loc: Any) -> Optional[str]:
    # FastAPI's loc is e.g. ["body", "lora", "r"]; the first item says where, not which field.
    if not isinstance(loc, (list, tuple)):
        return None
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    return ".".join(parts) or None


def error_from_response(response: httpx.Response) -> APIStatusError:
    """Build the typed error for a 4xx/5xx response (its body must already be read)."""
    status = response.status_code
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    message: Optional[str] = None
    type_: Optional[str] = None
    param: Optional[str] = None
    code: Optional[str] = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        message, type_ = err.get("message"), err.get("type")
        param, code = err.get("param"), err.get("code")
    elif isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        if isinstance(detail, list) and detail and isinstance(detail[0], dict):
            # FastAPI request validation: name the first bad field, count the rest.
            first = detail[0]
            param = _param_from_loc(first.get("loc"))
            message = str(first.get("msg", "invalid request"))
            if len(detail) > 1:
                message += f" (and {len(detail) - 1} more)"
            type_ = "invalid_request_error"
        else:
            message = str(detail)
    if not message:
        text = response.text.strip()
        message = text[:500] if text else (response.reason_phrase or f"HTTP {status}")
    return status_error_class(status)(
        message, status_code=status, type=type_, param=param, code=code,
        response=response, body=body,
    )


class APIResponseValidationError(LorapoolError):
    """A 2xx response whose body is not what this client expects (a server/client mismatch)."""
