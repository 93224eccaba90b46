"""Sampling parameters and chat messages of one request, checked against their limits
(OpenAI's names and ranges). Light: the API checks requests with it without importing torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

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


ROLES = ("system", "user", "assistant", "developer", "tool")


def check_messages(messages: Any) -> list[dict[str, str]]:
    """Messages as [{"role", "content": str}], or a 400 naming the message at fault. OpenAI's
    list-of-parts content is accepted when every part is text."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidRequest(f"{where} must be an object with role and content",
                                 param=where)
        role = m.get("role")
        if role not in ROLES:
            raise InvalidRequest(f"{where}.role must be one of {', '.join(ROLES)}, got "
                                 f"{role!r}", param=f"{where}.role")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text"
                        and isinstance(part.get("text"), str)):
                    raise InvalidRequest(f"{where}.content: only text parts are supported",
                                         param=f"{where}.content")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise InvalidRequest(f"{where}.content must be a string", param=f"{where}.content")
        # "developer" is OpenAI's newer name for the system role; templates know "system".
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out
