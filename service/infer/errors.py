"""Errors of the inference library, each with a stable `code` and the request field at fault."""

from __future__ import annotations

from typing import Optional


class InferenceError(Exception):
    """Generation cannot run: `code` is stable, `param` names the request field when one is
    at fault, `status` is the HTTP status an API should answer with."""

    code = "inference_error"
    status = 500

    def __init__(self, message: str, *, code: Optional[str] = None,
                 param: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "param": self.param,
                "status": self.status}


class InvalidRequest(InferenceError):
    """The request itself is wrong (a limit, a range, a shape): a 400."""

    code = "invalid_value"
    status = 400


class AdapterRefused(InvalidRequest):
    """The adapter folder is not one this library loads (no safetensors, pickle weights)."""

    code = "invalid_adapter"
