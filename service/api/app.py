"""`create_app`: the FastAPI application over a store, an artifact store and an executor.

`lorapool serve` (service/server.py) builds the real parts — the Ray executor included — and
hands them in; tests hand in their own executor. The app itself holds no state besides them.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI

from ..admin import sync_builtin_models
from ..artifacts import ArtifactStore
from ..config import Settings
from ..store import Store
from . import errors
from .context import AppContext
from .routes_chat import router as chat_router
from .routes_evaluations import router as evaluations_router
from .routes_federations import router as federations_router
from .routes_files import router as files_router
from .routes_jobs import router as jobs_router
from .routes_merges import router as merges_router
from .routes_resources import health_router
from .routes_resources import router as resources_router
from .routes_sharing import router as sharing_router

log = logging.getLogger("lorapool.api")


def create_app(settings: Settings, store: Store, artifacts: ArtifactStore,
               executor: Any, *, tasks: Any = None) -> FastAPI:
    """The REST API (see DESIGN.md, "Contracts"); `executor` is a `pool.executor.JobExecutor`,
    `tasks` the `pool.task_queue.PoolTasks` that runs merges and evaluations (None: this
    server answers 503 to them)."""
    try:
        # The built-in demo model must be in the store for jobs (and the scheduler) to name it.
        sync_builtin_models(store)
    except Exception:
        log.exception("could not register the built-in models")
    app = FastAPI(title="lorapool", version="0.1.0",
                  description="QLoRA fine-tuning on pooled GPUs; OpenAI fine-tuning API shape.")
    app.state.ctx = AppContext(settings=settings, store=store, artifacts=artifacts,
                               executor=executor, tasks=tasks)
    errors.install(app)
    app.include_router(health_router)
    app.include_router(files_router)
    app.include_router(jobs_router)
    app.include_router(federations_router)
    app.include_router(resources_router)
    app.include_router(sharing_router)
    app.include_router(merges_router)
    app.include_router(evaluations_router)
    app.include_router(chat_router)
    return app
