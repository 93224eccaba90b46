"""The `Idempotency-Key` header of the create routes (jobs, merges, evaluations): a retried
POST with the same key returns what the first one made instead of making a second."""

from __future__ import annotations

from typing import Optional

from .errors import bad_request

MAX_IDEMPOTENCY_KEY = 255


def checked_idempotency_key(raw: Optional[str]) -> Optional[str]:
    """The key without surrounding blanks, or None when none was sent; a 400 when it is empty
    or longer than `MAX_IDEMPOTENCY_KEY`."""
    if raw is None:
        return None
    key = raw.strip()
    if not key or len(key) > MAX_IDEMPOTENCY_KEY:
        raise bad_request(f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} characters",
                          param="Idempotency-Key")
    return key
