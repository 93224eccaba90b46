"""Sampling parameters of one request and their limits (OpenAI's names and ranges)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

from .errors import InvalidRequest

# The most tokens one request may ask for: generation holds a base (and its lock) while it
# runs, so one caller must not hold it for minutes.
MAX_TOKENS_LIMIT = 4096
MAX_STOP_SEQUENCES = 4  # as OpenAI
MAX_STOP_LENGTH = 256


@dataclass(frozen=True)
class SamplingParams:
    """`temperature` 0 means greedy; `seed` makes sampling repeatable; `stop` strings are cut
    from the output exactly (the stop string itself is not returned)."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise InvalidRequest("max_tokens must be an integer", param="max_tokens")
        if not 1 <= self.max_tokens <= MAX_TOKENS_LIMIT:
            raise InvalidRequest(f"max_tokens must be between 1 and {MAX_TOKENS_LIMIT}, got "
                                 f"{self.max_tokens}", param="max_tokens")
        if not 0.0 <= float(self.temperature) <= 2.0:
            raise InvalidRequest(f"temperature must be between 0 and 2, got {self.temperature}",
                                 param="temperature")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise InvalidRequest(f"top_p must be greater than 0 and at most 1, got "
                                 f"{self.top_p}", param="top_p")
        if len(self.stop) > MAX_STOP_SEQUENCES:
            raise InvalidRequest(f"stop takes at most {MAX_STOP_SEQUENCES} sequences, got "
                                 f"{len(self.stop)}", param="stop")
        for s in self.stop:
            if not isinstance(s, str) or not s or len(s) > MAX_STOP_LENGTH:
                raise InvalidRequest(f"each stop sequence must be a non-empty string of at "
                                     f"most {MAX_STOP_LENGTH} characters", param="stop")
        if self.seed is not None and (isinstance(self.seed, bool)
                                      or not isinstance(self.seed, int)):
            raise InvalidRequest("seed must be an integer", param="seed")

    @staticmethod
    def stops(stop: Union[None, str, Sequence[str]]) -> tuple[str, ...]:
        """OpenAI's `stop` (null, a string or a list of strings) as a tuple."""
        if stop is None:
            return ()
        if isinstance(stop, str):
            return (stop,)
        return tuple(stop)
