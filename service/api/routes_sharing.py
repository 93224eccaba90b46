"""/v1/adapters/{id}/share: the owner lets another tenant use an adapter, or stops letting it.

A shared adapter can be read (get, download), merged and evaluated by the tenant it is shared
with, never shared on or deleted by it. Revocation takes effect for whatever starts after it:
a merge queued before the revocation fails when it starts instead of reading the adapter.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends
from pydantic import BaseModel, ConfigDict, Field

from lorapool.types import Adapter

from ..store import Store
from .access import adapter_resource, visible_adapter
from .context import AppContext, context, tenant
from .errors import APIError, bad_request

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])


class ShareRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: str = Field(min_length=1, max_length=64, description="The tenant to share with.")


def _owned(ctx: AppContext, adapter_id: str, owner: str) -> Any:
    rec = visible_adapter(ctx, adapter_id, owner)
    if rec.tenant != owner:
        raise APIError(403, f"Only the owner of adapter '{adapter_id}' may share it or revoke "
                       "its shares", code="permission_denied")
    return rec


def _target(ctx: AppContext, name: str, owner: str) -> str:
    try:
        Store.check_tenant_name(name)
    except ValueError as exc:
        raise bad_request(f"Invalid value for 'tenant': {exc}", param="tenant") from exc
    if name == owner:
        raise bad_request("Invalid value for 'tenant': an adapter is always shared with its "
                          "owner", param="tenant")
    if name not in ctx.store.list_tenants():
        raise bad_request(f"Invalid value for 'tenant': no tenant named '{name}'",
                          param="tenant", code="tenant_not_found")
    return name


@router.post("/{adapter_id}/share", response_model=Adapter)
def share_adapter(adapter_id: str, req: ShareRequest = Body(...),
                  owner: str = Depends(tenant), ctx: AppContext = Depends(context)) -> Any:
    """Share the adapter with `tenant` (sharing twice is sharing once)."""
    rec = _owned(ctx, adapter_id, owner)
    ctx.store.share_adapter(rec.id, _target(ctx, req.tenant, owner))
    return adapter_resource(ctx, rec, owner)


@router.delete("/{adapter_id}/share/{share_tenant}", response_model=Adapter)
def unshare_adapter(adapter_id: str, share_tenant: str, owner: str = Depends(tenant),
                    ctx: AppContext = Depends(context)) -> Any:
    """Revoke `share_tenant`'s use of the adapter. Idempotent: revoking a share that does not
    exist changes nothing and answers the same."""
    rec = _owned(ctx, adapter_id, owner)
    ctx.store.unshare_adapter(rec.id, share_tenant)
    return adapter_resource(ctx, rec, owner)
