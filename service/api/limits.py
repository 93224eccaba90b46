"""Request-rate and open-stream limits, answered with 429 and a Retry-After that says when.

- Rate: a token bucket per API token (keyed by the token's sha256, never the token itself):
  `rate` requests a second on average, bursts up to `burst`. LORAPOOL_RATE_LIMIT="RATE" or
  "RATE,BURST" (default "20,100"; "0" or "off" turns it off).
- Streams: at most LORAPOOL_MAX_STREAMS_PER_TENANT open event streams per tenant (default 64;
  0 turns it off). A slot is taken when the stream is accepted and given back when its
  response ends, however it ends.
- Chats: at most LORAPOOL_MAX_CHATS_PER_TENANT chat/completions generations in flight per
  tenant (default 4; 0 turns it off), so one tenant cannot take every inference worker. A slot
  is taken before the request goes to the pool and given back when its reply ends (finished,
  failed, or its client left).

Both live in this process's memory (like the event hub): several server processes each
enforce their own.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping, Optional

from .errors import APIError

RATE_ENV = "LORAPOOL_RATE_LIMIT"
STREAMS_ENV = "LORAPOOL_MAX_STREAMS_PER_TENANT"
CHATS_ENV = "LORAPOOL_MAX_CHATS_PER_TENANT"
DEFAULT_MAX_CHATS = 4
# A generation takes seconds (max_tokens is capped): a short wait usually finds a free slot.
CHAT_RETRY_AFTER = 2.0
DEFAULT_RATE = 20.0
DEFAULT_BURST = 100
DEFAULT_MAX_STREAMS = 64
# A full stream slot frees when some stream ends: no way to know when; ask for a short wait.
STREAM_RETRY_AFTER = 5.0


@dataclass(frozen=True)
class LimitSettings:
    rate: float = DEFAULT_RATE  # requests per second per token; 0: no rate limit
    burst: int = DEFAULT_BURST
    max_streams_per_tenant: int = DEFAULT_MAX_STREAMS  # 0: no limit
    max_chats_per_tenant: int = DEFAULT_MAX_CHATS  # 0: no limit

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "LimitSettings":
        env = os.environ if environ is None else environ
        rate, burst = DEFAULT_RATE, DEFAULT_BURST
        raw = (env.get(RATE_ENV) or "").strip()
        if raw:
            rate, burst = _parse_rate(raw)
        streams = _parse_count(env, STREAMS_ENV, DEFAULT_MAX_STREAMS)
        chats = _parse_count(env, CHATS_ENV, DEFAULT_MAX_CHATS)
        return cls(rate=rate, burst=burst, max_streams_per_tenant=streams,
                   max_chats_per_tenant=chats)


def _parse_count(env: Mapping[str, str], name: str, default: int) -> int:
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{name}={raw!r}: expected a whole number ≥ 0 (0: no limit)")
    return value


def _parse_rate(raw: str) -> tuple[float, int]:
    if raw.lower() in ("off", "0", "none"):
        return 0.0, 0
    rate_s, _, burst_s = raw.partition(",")
    try:
        rate = float(rate_s)
        burst = int(burst_s) if burst_s.strip() else max(1, math.ceil(rate * 5))
    except ValueError:
        rate, burst = -1.0, -1
    if not (math.isfinite(rate) and rate > 0 and burst >= 1):
        raise ValueError(f"{RATE_ENV}={raw!r}: expected 'RATE' or 'RATE,BURST' (requests per "
                         "second per token, e.g. '20,100'), or 'off'")
    return rate, burst


class TokenBuckets:
    """One bucket per key; `take(key)` spends one request or says how long to wait."""

    def __init__(self, rate: float, burst: int, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at

    def take(self, key: str, now: Optional[float] = None) -> Optional[float]:
        """None: allowed. Else the seconds until one request will be allowed again."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, at = self._buckets.pop(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                wait = None
            else:
                self._buckets[key] = (tokens, now)
                wait = (1.0 - tokens) / self.rate
            # Least recently used first; a forgotten key starts full again, which only errs
            # on the side of the caller.
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
            return wait


class StreamSlots:
    """Counts open streams per tenant."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}

    def acquire(self, tenant: str) -> bool:
        with self._lock:
            n = self._open.get(tenant, 0)
            if self.limit and n >= self.limit:
                return False
            self._open[tenant] = n + 1
            return True

    def release(self, tenant: str) -> None:
        with self._lock:
            n = self._open.get(tenant, 0) - 1
            if n > 0:
                self._open[tenant] = n
            else:
                self._open.pop(tenant, None)

    def open(self, tenant: str) -> int:
        with self._lock:
            return self._open.get(tenant, 0)

    def snapshot(self) -> dict[str, int]:
        """Open streams of every tenant that has any."""
        with self._lock:
            return dict(self._open)


def _retry_headers(seconds: float) -> dict[str, str]:
    # Retry-After takes whole seconds; retry-after-ms (as OpenAI sends it) the precise wait.
    return {"Retry-After": str(max(1, math.ceil(seconds))),
            "retry-after-ms": str(max(1, math.ceil(seconds * 1000)))}


class Limits:
    """The limits one app enforces (see the module docstring)."""

    def __init__(self, settings: Optional[LimitSettings] = None) -> None:
        self.settings = settings or LimitSettings.from_env()
        s = self.settings
        self.buckets = TokenBuckets(s.rate, s.burst) if s.rate > 0 else None
        self.streams = StreamSlots(s.max_streams_per_tenant)
        self.chats = StreamSlots(s.max_chats_per_tenant)

    def check_rate(self, token_sha256: str) -> None:
        if self.buckets is None:
            return
        wait = self.buckets.take(token_sha256)
        if wait is not None:
            s = self.settings
            raise APIError(
                429, f"Rate limit reached for this API key: {s.rate:g} requests per second "
                f"(bursts up to {s.burst}). Retry after {wait:.2f} s.",
                code="rate_limit_exceeded", headers=_retry_headers(wait))

    def open_stream(self, tenant: str) -> None:
        """Take a stream slot for `tenant` or raise the 429; pair with `close_stream`."""
        if not self.streams.acquire(tenant):
            raise APIError(
                429, f"Too many open event streams for tenant '{tenant}': the limit is "
                f"{self.streams.limit}. Close one, or retry after {STREAM_RETRY_AFTER:g} s.",
                code="too_many_streams", headers=_retry_headers(STREAM_RETRY_AFTER))

    def close_stream(self, tenant: str) -> None:
        self.streams.release(tenant)

    def open_chat(self, tenant: str) -> None:
        """Take a chat-generation slot for `tenant` or raise the 429; pair with `close_chat`."""
        if not self.chats.acquire(tenant):
            raise APIError(
                429, f"Too many chat completions in flight for tenant '{tenant}': the limit is "
                f"{self.chats.limit} at once ({CHATS_ENV}). Retry after "
                f"{CHAT_RETRY_AFTER:g} s, or wait for one of them to finish.",
                code="too_many_chats", headers=_retry_headers(CHAT_RETRY_AFTER))

    def close_chat(self, tenant: str) -> None:
        self.chats.release(tenant)
