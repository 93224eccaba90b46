"""What the routes of the pool-task kinds (/v1/merges, /v1/evaluations) do alike.

Each kind keeps its own FastAPI routes, for their typed responses and OpenAPI schema; they call
these helpers with their kind ("merge" or "evaluation", as the store names it) and the function
that turns a stored record into its API resource.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Optional, TypeVar

from fastapi import Depends, Query

from ..store import NotFound
from ..store.pool_tasks import TaskRecord
from . import convert
from .context import AppContext, context, tenant
from .errors import bad_request, not_found

TaskKind = Literal["merge", "evaluation"]
Resource = TypeVar("Resource")
ToResource = Callable[[Any], Resource]


def queue_task(ctx: AppContext, kind: TaskKind, record: TaskRecord,
               to_resource: ToResource[Resource]) -> Resource:
    """Store a new task and wake the task loop; a replayed Idempotency-Key gets the first
    record back (another id), which is already queued, so nothing is woken for it."""
    stored = ctx.store.create_task(kind, record)
    if stored.id == record.id:
        ctx.wake_tasks()
    return to_resource(stored)


class TaskPage:
    """The list routes' query (`after`, `limit`) with the caller and the app context, as one
    FastAPI dependency (`page: TaskPage = Depends()`): its parameters are the route's own in
    the OpenAPI document."""

    def __init__(self, after: Optional[str] = None, limit: int = Query(20, ge=1, le=100),
                 owner: str = Depends(tenant), ctx: AppContext = Depends(context)) -> None:
        self.after, self.limit, self.owner, self.ctx = after, limit, owner, ctx

    def of(self, kind: TaskKind, to_resource: ToResource[Any]) -> Any:
        """One page of the owner's tasks of this kind, newest first; 400 naming 'after' when
        the cursor is no task of the owner's."""
        try:
            recs, more = self.ctx.store.list_tasks(kind, self.owner, after=self.after,
                                                   limit=self.limit)
        except NotFound as exc:
            raise bad_request(f"'after' names no {kind} of yours: '{self.after}'",
                              param="after") from exc
        return convert.page([to_resource(r) for r in recs], more)


def owned_task(ctx: AppContext, kind: TaskKind, task_id: str, owner: str,
               to_resource: ToResource[Resource]) -> Resource:
    """The owner's task; 404 alike for a missing id and another tenant's."""
    rec = ctx.store.get_task(kind, task_id, owner)
    if rec is None:
        raise not_found(kind, task_id)
    return to_resource(rec)
