"""GET /metrics: the Prometheus exposition, for admin tokens only (see metrics.py).

`install(app)` gives the app its metrics registry, the latency middleware and the store
listener that feeds the step metrics; a tenant token gets a 403 and no token a 401, in the
API's error shape, like any other route.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from .context import Principal, admin
from .metrics import LatencyMiddleware, RouteTemplates, ServiceMetrics
from .routes_dashboard import UNDOCUMENTED_ROUTES

router = APIRouter(tags=["metrics"])


def install(app: FastAPI) -> None:
    ctx = app.state.ctx
    metrics = ServiceMetrics(ctx.store, ctx.executor.nodes)
    app.state.metrics = metrics
    ctx.store.add_listener(metrics.listen)
    app.add_middleware(LatencyMiddleware, metrics=metrics,
                       templates=RouteTemplates(app, UNDOCUMENTED_ROUTES))
    app.include_router(router)


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(request: Request, _admin: Principal = Depends(admin)) -> Response:
    """Jobs by state and tenant, queue, nodes and GPU memory, step time, tokens/s, and API
    latency, in Prometheus' text format."""
    # The collectors read the database and the executor: off the event loop.
    body = await run_in_threadpool(generate_latest, request.app.state.metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST,
                    headers={"Cache-Control": "no-store"})
