"""Every error the API returns, in the OpenAI shape `{"error": {message, type, param, code}}`.

Handlers raise `APIError`; FastAPI's request validation errors, pydantic errors from building
a job, unknown routes and unexpected exceptions are converted here too, so a client always
gets one JSON shape, with `param` naming the field at fault where there is one.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorapool.types import ErrorDetail, ErrorResponse

log = logging.getLogger("lorapool.api")

_TYPES = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
          409: "conflict_error", 413: "invalid_request_error", 429: "rate_limit_error"}


class APIError(Exception):
    """An error response: HTTP status, a message naming the problem, the param at fault."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None,
                 code: Optional[str] = None, type: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status) or (
            "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers


def bad_request(message: str, param: Optional[str] = None,
                code: Optional[str] = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def not_found(what: str, ident: str, param: Optional[str] = None) -> APIError:
    # The same answer whether the thing does not exist or belongs to another tenant.
    return APIError(404, f"No {what} with id '{ident}'", param=param, code="not_found")


def error_response(err: APIError) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(message=err.message, type=err.type, param=err.param,
                                           code=err.code))
    return JSONResponse(body.model_dump(), status_code=err.status, headers=err.headers)


# -- pydantic errors → one message naming every bad param ---------------------------------
_LOC_SOURCES = {"body", "query", "path", "header", "cookie"}


def _is_field(part: Any) -> bool:
    # Union members and validators show up in `loc` ("int", "literal['auto']",
    # "function-after[...]"): they are not field names.
    if isinstance(part, int):
        return True
    s = str(part)
    return not (s in ("int", "float", "str", "bool", "list", "dict", "none", "json-or-python")
                or s.startswith(("literal[", "function-", "union[", "tagged-union[", "is-instance[",
                                 "constrained-", "nullable[", "lax-", "json-")))


def param_of(loc: Iterable[Any], rename: Optional[dict[str, str]] = None) -> Optional[str]:
    parts = list(loc)
    if parts and parts[0] in _LOC_SOURCES:
        parts = parts[1:]
    parts = [p for p in parts if _is_field(p)]
    if not parts:
        return None
    param = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in parts)
    param = param.replace(".[", "[")
    if rename:
        head = str(parts[0])
        if head in rename:
            param = rename[head] + param[len(head):]
    return param


def _describe(err: dict[str, Any], param: Optional[str]) -> str:
    kind, msg = err.get("type", ""), err.get("msg", "invalid value")
    if kind == "missing":
        return f"Missing required parameter: '{param}'"
    if kind == "extra_forbidden":
        return f"Unknown parameter: '{param}'"
    if kind == "json_invalid":
        return f"The request body is not valid JSON: {err.get('ctx', {}).get('error', msg)}"
    value = err.get("input")
    shown = ""
    if isinstance(value, (int, float, str, bool)) and len(repr(value)) <= 80:
        shown = f" (got {value!r})"
    msg = msg.removeprefix("Value error, ")
    return f"Invalid value for '{param}': {msg}{shown}" if param else f"{msg}{shown}"


def validation_error(errors: list[dict[str, Any]],
                     rename: Optional[dict[str, str]] = None) -> APIError:
    """One 400 for a list of pydantic errors: the first bad param, and every problem."""
    by_param: dict[Optional[str], list[dict[str, Any]]] = {}
    for e in errors:
        by_param.setdefault(param_of(e.get("loc", ()), rename), []).append(e)
    parts = []
    for param, errs in by_param.items():
        # A union (e.g. "auto" | int) fails once per member; the literal's complaint
        # ("Input should be 'auto'") hides the useful one, so drop it when there are others.
        useful = [e for e in errs if e.get("type") != "literal_error"] or errs
        msgs = list(dict.fromkeys(_describe(e, param) for e in useful))
        parts.append("; ".join(msgs))
    first = next(iter(by_param), None)
    kind = errors[0].get("type") if errors else None
    code = "missing_required_parameter" if kind == "missing" else (
        "unknown_parameter" if kind == "extra_forbidden" else "invalid_value")
    return APIError(400, ". ".join(parts), param=first, code=code)


def from_pydantic(exc: ValidationError, rename: Optional[dict[str, str]] = None) -> APIError:
    return validation_error(exc.errors(include_url=False), rename)  # type: ignore[arg-type]


_BODY_PARSE_FAILED = "There was an error parsing the body"


# -- installing the handlers ----------------------------------------------------------------
def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = "No such route"
        if exc.status_code == 400 and message == _BODY_PARSE_FAILED:
            # FastAPI's words for a body json.loads refused with something other than a
            # JSONDecodeError (e.g. an integer past Python's digit limit): say what it was.
            cause = exc.__cause__
            message = ("The request body could not be parsed as JSON"
                       + (f": {cause}" if cause is not None else ""))[:500]
            code = "invalid_json"
        return error_response(APIError(exc.status_code, message, code=code,
                                       headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in a request")
        return error_response(APIError(500, f"Internal server error ({type(exc).__name__})",
                                       code="internal_error"))
