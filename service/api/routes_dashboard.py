"""The web dashboard: static files at `/` and `/ui/…`, plus the two small reads it needs.

The pages are plain ES modules and a vendored chart library (static/vendor/, with its
license); no build step. They talk to the same REST API with the same bearer token, which
the page keeps in sessionStorage only. Every static answer carries a strict
Content-Security-Policy (scripts and styles from this origin only, no inline script, no
frames), `nosniff` and no referrer, so server text that reached a page could not run there.

`GET /v1/me` tells the page who its token is (tenant, admin?); `GET /v1/admin/jobs` lists
every tenant's jobs, for admin tokens only (the dashboard's admin view).
"""

from __future__ import annotations

import mimetypes
from pathlib import Path
from typing import Any, Optional

from fastapi import APIRouter, Depends, Query
from fastapi.responses import FileResponse

from lorapool.types import FineTuningJob, ListResponse

from ..store.records import ACTIVE, TERMINAL
from . import convert
from .context import AppContext, Principal, admin, context, principal
from .errors import not_found

router = APIRouter(tags=["dashboard"])

# Routes left out of the OpenAPI document (metrics.RouteTemplates labels requests by these too).
UNDOCUMENTED_ROUTES = ("/", "/ui/{path:path}")
STATIC_DIR = Path(__file__).with_name("static")
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; font-src 'self'; form-action 'self'; base-uri 'none'; "
       "frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Small files, changed with each release: revalidate rather than serve a stale page.
    "Cache-Control": "no-cache",
}
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".txt": "text/plain"}


def _static(relative: str) -> FileResponse:
    root = STATIC_DIR.resolve()
    path = (root / relative).resolve()
    # Only regular files inside static/ of a known type: no traversal, no directory listing.
    if not path.is_relative_to(root) or not path.is_file() or path.suffix not in _TYPES:
        raise not_found("file", relative)
    media = _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0]
    return FileResponse(path, media_type=media, headers=SECURITY_HEADERS)


@router.get("/", include_in_schema=False)
def index() -> Any:
    return _static("index.html")


@router.get("/ui/{path:path}", include_in_schema=False)
def static_file(path: str) -> Any:
    return _static(path)


@router.get("/v1/me")
def me(who: Principal = Depends(principal)) -> dict[str, Any]:
    """The caller: `{"tenant": NAME, "admin": bool}`."""
    return {"object": "principal", "tenant": who.tenant, "admin": who.admin}


@router.get("/v1/admin/jobs", response_model=ListResponse[FineTuningJob])
def all_jobs(
    status: Optional[str] = Query(None, description="only jobs in this status"),
    limit: int = Query(100, ge=1, le=1000),
    _admin: Principal = Depends(admin),
    ctx: AppContext = Depends(context),
) -> Any:
    """Every tenant's jobs, newest first (admin tokens only); `organization_id` is the tenant."""
    statuses = sorted(ACTIVE | TERMINAL) if status is None else [status]
    recs = ctx.store.jobs_in_status(*statuses)[::-1]
    return convert.page([convert.job(r) for r in recs[:limit]], len(recs) > limit)
