"""Errors the trainer raises, each with a stable `code` the service stores on the failed job.

`retryable` tells the service whether another attempt (on another node) could succeed: bad data
or a diverging loss fail the job at once; an out-of-memory that auto-fit could not absorb may
succeed on a bigger GPU.
"""

from __future__ import annotations

from dataclasses import dataclass


class TrainError(Exception):
    """Base class: a run that cannot go on."""

    code: str = "training_error"
    retryable: bool = False

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code


@dataclass(frozen=True)
class LineError:
    """One bad line of a data file (1-based line number)."""

    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


class DataError(TrainError):
    """The data set is empty, unreadable, or has invalid lines; `errors` lists every one."""

    code = "invalid_training_file"

    def __init__(self, message: str, errors: list[LineError] | None = None, *, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.errors: list[LineError] = list(errors or [])


class ModelLoadError(TrainError):
    """The base model cannot be found, read or quantised as asked."""

    code = "model_load_error"


class NonFiniteLossError(TrainError):
    """The loss became NaN or infinite: the run diverged."""

    code = "non_finite_loss"


class OutOfMemoryError(TrainError):
    """Out of GPU memory even at micro-batch 1."""

    code = "out_of_memory"
    retryable = True
