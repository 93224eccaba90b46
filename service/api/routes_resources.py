"""/v1/models, /v1/adapters (list, get, download) and /v1/nodes, plus the unauthenticated
/healthz.

Models are the service's (every tenant sees the same list); adapters are their tenant's own or
shared with it (another tenant gets a 404, as for anything it may not use; see access.py);
nodes come from the executor.
"""

from __future__ import annotations

from typing import Any, Optional

from fastapi import APIRouter, Depends, Query

from lorapool.types import Adapter, ListResponse, Model, Node

from ..store import NotFound
from . import convert
from .access import adapter_resource, visible_adapter
from .archive import folder_archive_response
from .context import AppContext, context, tenant
from .errors import bad_request, not_found
from .local_data import nodes_for

router = APIRouter(tags=["resources"])
health_router = APIRouter(tags=["health"])


@health_router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/v1/models", response_model=ListResponse[Model])
def list_models(
    after: Optional[str] = None,
    limit: int = Query(100, ge=1, le=1000),
    _owner: str = Depends(tenant),
    ctx: AppContext = Depends(context),
) -> Any:
    models = [convert.model(m) for m in ctx.store.list_models()]
    return convert.slice_page(models, after, limit, "model")


# Before the `{model_id:path}` route below, which would otherwise take ".../download" as a name.
@router.get("/v1/models/{model_id:path}/download")
async def download_model(
    model_id: str,
    wait: float = Query(60.0, ge=0, le=600, description="seconds to wait for the pool task"),
    prepare: bool = Query(False, description="answer the status, never the archive"),
    _owner: str = Depends(tenant),
    ctx: AppContext = Depends(context),
) -> Any:
    """The (dequantised) base as an HF folder tar.gz, where the admin allows it."""
    from .routes_export import download_model as download

    return await download(ctx, model_id, wait, prepare)


@router.get("/v1/models/{model_id:path}", response_model=Model)
def get_model(model_id: str, _owner: str = Depends(tenant),
              ctx: AppContext = Depends(context)) -> Any:
    """The model, with its source (built-in or registered), format, content hash and, where
    known, the public id its adapters name as their base."""
    from .routes_export import model_details

    entry = ctx.store.get_model(model_id)
    if entry is None:
        raise not_found("model", model_id)
    return convert.model(entry).model_copy(update=model_details(entry))


@router.get("/v1/adapters", response_model=ListResponse[Adapter])
def list_adapters(
    after: Optional[str] = None,
    limit: int = Query(100, ge=1, le=1000),
    include_shared: bool = Query(False, description="also those shared with you"),
    owner: str = Depends(tenant),
    ctx: AppContext = Depends(context),
) -> Any:
    lister = ctx.store.list_visible_adapters if include_shared else ctx.store.list_adapters
    try:
        recs, more = lister(owner, after=after, limit=limit)
    except NotFound as exc:
        raise bad_request(f"'after' names no adapter of yours: '{after}'", param="after") from exc
    return convert.page([adapter_resource(ctx, r, owner) for r in recs], more)


@router.get("/v1/adapters/{adapter_id}", response_model=Adapter)
def get_adapter(adapter_id: str, owner: str = Depends(tenant),
                ctx: AppContext = Depends(context)) -> Any:
    """An adapter you own or one shared with you."""
    return adapter_resource(ctx, visible_adapter(ctx, adapter_id, owner), owner)


@router.get("/v1/adapters/{adapter_id}/download")
def download_adapter(adapter_id: str, owner: str = Depends(tenant),
                     ctx: AppContext = Depends(context)) -> Any:
    """The PEFT folder as a tar.gz (members at the top level) with a `lorapool.json`."""
    rec = visible_adapter(ctx, adapter_id, owner)
    job = ctx.store.get_job(rec.job_id) if rec.job_id else None
    meta = {
        "adapter_id": rec.id,
        "base_model": rec.base_model,
        "base_model_sha256": rec.base_model_sha256,
        "job_id": rec.job_id,
        "created_at": rec.created_at,
        "sha256": rec.sha256,
        "metrics": rec.metrics,
        "spec": job.spec if job is not None else None,
    }
    return folder_archive_response(ctx.artifacts, rec.artifact_id, meta, f"{rec.id}.tar.gz")


@router.get("/v1/nodes", response_model=ListResponse[Node])
def list_nodes(
    after: Optional[str] = None,
    limit: int = Query(100, ge=1, le=1000),
    owner: str = Depends(tenant),
    ctx: AppContext = Depends(context),
) -> Any:
    return convert.slice_page(nodes_for(ctx, owner), after, limit, "node")
