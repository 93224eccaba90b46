"""What every route needs — settings, store, artifacts, executor — and the auth dependency.

`create_app` puts one `AppContext` on `app.state`; routes get it with `Depends(context)` and the
caller's tenant with `Depends(tenant)`. Authentication: `Authorization: Bearer <token>`, the
token's sha256 looked up in the store; anything else is a 401 before the route runs. A known
token then spends one request of its rate limit (`limits.py`), else a 429. `Depends(admin)`
lets only admin tokens through (a tenant token gets a 403).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from ..artifacts import ArtifactStore
from ..config import Settings
from ..store import Store
from .errors import APIError
from .event_hub import EventHub
from .limits import Limits

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
    # Event streams: the hub that feeds them (app.py subscribes it to the store), a comment
    # line after this many quiet seconds (keeps proxies from closing the connection and
    # notices a dropped client), how long a stream waits for trailing events once its job
    # ended, how long a dropped slow follower may take to read its last message, and the
    # database look at this interval for writes of other processes (0: this process is the
    # only writer, the default).
    hub: EventHub = field(default_factory=EventHub)
    limits: Limits = field(default_factory=Limits)
    sse_keepalive: float = 15.0
    sse_linger: float = 0.3
    sse_drop_grace: float = 10.0
    sse_fallback_poll: float = 0.0

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


@dataclass(frozen=True)
class Principal:
    """Who a request's token belongs to: its tenant, and whether it is an admin token."""

    tenant: str
    admin: bool = False


_PRINCIPAL_KEY = "lorapool.principal"


def principal(request: Request) -> Principal:
    """The caller behind the request's bearer token, else a 401 (spends one request of the
    token's rate limit). Kept in the request's own scope, so several dependencies of one
    request check it once (never on `request.state`, which a server may share from lifespan)."""
    cached = request.scope.get(_PRINCIPAL_KEY)
    if isinstance(cached, Principal):
        return cached
    header = request.headers.get("authorization")
    if not header:
        raise APIError(401, "Missing API key: send the header 'Authorization: Bearer <token>' "
                       "(make a token with `lorapool token create --tenant NAME`)",
                       code="missing_api_key", headers=_AUTH_HEADERS)
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(401, "Malformed Authorization header: expected 'Bearer <token>'",
                       code="invalid_api_key", headers=_AUTH_HEADERS)
    ctx = context(request)
    found = ctx.store.principal_for_token(token.strip())
    if found is None:
        message = "Invalid API key"
        if not ctx.store.list_tenants():  # the usual cause: a token made for another data dir
            message += (": no tenant exists yet: create a token with `lorapool token create "
                        f"--tenant NAME --data-dir {ctx.settings.data_dir}`")
        raise APIError(401, message, code="invalid_api_key", headers=_AUTH_HEADERS)
    ctx.limits.check_rate(hashlib.sha256(token.strip().encode("utf-8")).hexdigest())
    request.scope[_PRINCIPAL_KEY] = who = Principal(*found)
    return who


def tenant(request: Request) -> str:
    """The tenant the request's bearer token belongs to, else a 401."""
    return principal(request).tenant


def admin(request: Request) -> Principal:
    """The caller if its token is an admin token: none is a 401, a tenant token a 403."""
    who = principal(request)
    if not who.admin:
        raise APIError(403, "This needs an admin token (`lorapool token create --admin`)",
                       code="admin_required")
    return who
