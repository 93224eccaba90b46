"""What every route needs — settings, store, artifacts, executor — and the auth dependency.

`create_app` puts one `AppContext` on `app.state`; routes get it with `Depends(context)` and the
caller's tenant with `Depends(tenant)`. Authentication: `Authorization: Bearer <token>`, the
token's sha256 looked up in the store; anything else is a 401 before the route runs.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from ..artifacts import ArtifactStore
from ..config import Settings
from ..store import Store
from .errors import APIError

log = logging.getLogger("lorapool.api")


@dataclass
class AppContext:
    settings: Settings
    store: Store
    artifacts: ArtifactStore
    executor: Any  # a pool.executor.JobExecutor
    # pool.task_queue.PoolTasks (merges, evaluations); None: this server runs no pool tasks.
    tasks: Any = None
    # Guards "is this stored object still referenced?" against a concurrent upload of the
    # same bytes, so deleting a file never pulls an object from under a new one.
    objects_lock: threading.Lock = field(default_factory=threading.Lock)
    sse_poll_interval: float = 0.5
    sse_keepalive: float = 10.0

    def wake_tasks(self) -> None:
        try:
            self.tasks.wake()
        except Exception:  # the record is safely queued; the task loop's own poll will find it
            log.exception("tasks.wake() failed")

    def wake(self) -> None:
        try:
            self.executor.wake()
        except Exception:  # the job is safely queued; the scheduler's own poll will find it
            log.exception("executor.wake() failed")


def context(request: Request) -> AppContext:
    return request.app.state.ctx


_AUTH_HEADERS = {"WWW-Authenticate": "Bearer"}


def tenant(request: Request) -> str:
    """The tenant the request's bearer token belongs to, else a 401."""
    header = request.headers.get("authorization")
    if not header:
        raise APIError(401, "Missing API key: send the header 'Authorization: Bearer <token>' "
                       "(make a token with `lorapool token create --tenant NAME`)",
                       code="missing_api_key", headers=_AUTH_HEADERS)
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(401, "Malformed Authorization header: expected 'Bearer <token>'",
                       code="invalid_api_key", headers=_AUTH_HEADERS)
    name = context(request).store.tenant_for_token(token.strip())
    if name is None:
        raise APIError(401, "Invalid API key", code="invalid_api_key", headers=_AUTH_HEADERS)
    return name
