"""`create_app`: the FastAPI application over a store, an artifact store and an executor.

`lorapool serve` (service/server.py) builds the real parts — the Ray executor included — and
hands them in; tests hand in their own executor. The app itself holds no state besides them.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

from fastapi import FastAPI

from ..admin import sync_builtin_models
from ..artifacts import ArtifactStore
from ..config import Settings
from ..store import Store
from . import errors, openapi, routes_metrics
from .body_limits import JsonBodyGuard
from .context import AppContext
from .event_hub import EventHub
from .limits import Limits
from .routes_chat import router as chat_router
from .routes_dashboard import router as dashboard_router
from .routes_evaluations import router as evaluations_router
from .routes_export import router as export_router
from .routes_federations import router as federations_router
from .routes_files import router as files_router
from .routes_jobs import router as jobs_router
from .routes_merges import router as merges_router
from .routes_resources import health_router
from .routes_resources import router as resources_router
from .routes_sharing import router as sharing_router

log = logging.getLogger("lorapool.api")


def create_app(settings: Settings, store: Store, artifacts: ArtifactStore,
               executor: Any, *, tasks: Any = None, limits: Optional[Limits] = None,
               hub: Optional[EventHub] = None, **stream_options: float) -> FastAPI:
    """The REST API (see DESIGN.md, "Contracts"); `executor` is a `pool.executor.JobExecutor`,
    `tasks` the `pool.task_queue.PoolTasks` that runs merges and evaluations (None: this
    server answers 503 to them). `limits` default to the LORAPOOL_* variables (limits.py);
    `hub` to a new hub fed by `store`; `stream_options` set AppContext's `sse_*` fields."""
    try:
        # The built-in demo model must be in the store for jobs (and the scheduler) to name it.
        sync_builtin_models(store)
    except Exception:
        log.exception("could not register the built-in models")
    app = FastAPI(title="lorapool", version="0.1.0",
                  description="QLoRA fine-tuning on pooled GPUs; OpenAI fine-tuning API shape.")
    app.state.ctx = AppContext(settings=settings, store=store, artifacts=artifacts,
                               executor=executor, tasks=tasks,
                               **_stream_context(store, limits, hub, stream_options))
    errors.install(app)
    app.add_middleware(JsonBodyGuard)  # bounded size and nesting for every JSON body
    openapi.install(app, settings.max_upload_bytes)  # limits, 400s, links (see openapi.py)
    app.include_router(health_router)
    app.include_router(files_router)
    app.include_router(jobs_router)
    app.include_router(federations_router)
    app.include_router(resources_router)
    app.include_router(sharing_router)
    app.include_router(merges_router)
    app.include_router(evaluations_router)
    app.include_router(export_router)
    app.include_router(chat_router)
    app.include_router(dashboard_router)  # the web UI at / (static) and /v1/me
    routes_metrics.install(app)  # /metrics for admin tokens, API latency middleware
    return app


FALLBACK_POLL_ENV = "LORAPOOL_EVENTS_FALLBACK_POLL"


def _stream_context(store: Store, limits: Optional[Limits], hub: Optional[EventHub],
                    options: dict[str, float]) -> dict[str, Any]:
    """The event hub (fed by the store's writes), the limits and the stream settings."""
    unknown = {k for k in options if not k.startswith("sse_")}
    if unknown:
        raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
    if hub is None:
        hub = EventHub()
        store.add_listener(hub.publish)
    out: dict[str, Any] = {"hub": hub, "limits": limits or Limits(), **options}
    raw = os.environ.get(FALLBACK_POLL_ENV, "").strip()
    if raw and "sse_fallback_poll" not in options:
        try:
            poll = float(raw)
        except ValueError:
            poll = -1.0
        if not poll >= 0:
            raise ValueError(f"{FALLBACK_POLL_ENV}={raw!r}: expected seconds ≥ 0 (0: off)")
        out["sse_fallback_poll"] = poll
    return out
