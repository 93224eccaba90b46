"""/v1/files: upload (validated, stored by content hash), list, get, delete, content.

An upload streams into the artifact store under the size limit, then the whole file is
validated (`train.data.validate_dataset`: format, every bad line with its number). A refused
upload — too large, invalid, interrupted — leaves no object and no temp file behind. The same
bytes uploaded twice are two file records sharing one stored object.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Optional

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from lorapool.types import FileDeleted, FileObject, ListResponse

from ..store import NotFound
from . import convert
from .context import AppContext, context, tenant
from .errors import APIError, bad_request, not_found
from .upload import MultipartUpload, UploadFormError

log = logging.getLogger("lorapool.api")

router = APIRouter(prefix="/v1/files", tags=["files"])

PURPOSES = ("fine-tune",)
# Multipart framing around the file; a declared body longer than limit + this is refused
# before a byte of it is read.
_FRAMING_SLACK = 64 * 1024


def _human(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:g} {unit}"
    return f"{n} bytes"


def _too_large(limit: int) -> APIError:
    return APIError(413, f"File too large: the upload limit is {_human(limit)} ({limit} bytes; "
                    "LORAPOOL_MAX_UPLOAD_BYTES)", param="file", code="file_too_large")


def _forget_object(ctx: AppContext, artifact_id: str) -> None:
    """Remove a stored object unless some record still points at it."""
    with ctx.objects_lock:
        if not ctx.store.artifact_referenced(artifact_id):
            ctx.artifacts.delete(artifact_id)


def _validate_and_record(ctx: AppContext, owner: str, artifact_id: str, size: int,
                         filename: str, purpose: str) -> FileObject:
    from ..train.data import validate_dataset  # the trainer's; imported only when needed
    from ..train.errors import DataError

    try:
        report = validate_dataset(ctx.artifacts.path(artifact_id))
    except DataError as exc:
        _forget_object(ctx, artifact_id)
        raise APIError(400, f"Invalid training file '{filename}': {exc.message}", param="file",
                       code=exc.code or "invalid_file_format") from exc
    except FileNotFoundError as exc:
        raise APIError(409, "The stored upload was removed by a concurrent delete; upload "
                       "again", code="conflict") from exc
    except BaseException:
        _forget_object(ctx, artifact_id)
        raise
    with ctx.objects_lock:
        if not ctx.artifacts.exists(artifact_id):
            raise APIError(409, "The stored upload was removed by a concurrent delete; upload "
                           "again", code="conflict")
        rec = ctx.store.add_file(
            tenant=owner, filename=filename, bytes=size, sha256=artifact_id.split(":", 1)[1],
            artifact_id=artifact_id, purpose=purpose, examples=report.n_examples,
            format=str(report.format))
    return convert.file(rec)


@router.post("", response_model=FileObject)
async def create_file(request: Request, owner: str = Depends(tenant),
                      ctx: AppContext = Depends(context)) -> Any:
    limit = ctx.settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + _FRAMING_SLACK:
        raise _too_large(limit)
    try:
        upload = MultipartUpload(ctx.artifacts, request.headers.get("content-type"), limit)
    except UploadFormError as exc:
        raise bad_request(str(exc), param=exc.param, code="invalid_form") from exc
    try:
        # Disk writes of one chunk are short; the loop stays responsive enough.
        async for chunk in request.stream():
            upload.feed(chunk)
        upload.finish()
    except UploadFormError as exc:
        upload.abort()
        raise bad_request(str(exc), param=exc.param, code="invalid_form") from exc
    except ClientDisconnect as exc:
        upload.abort()
        log.info("upload interrupted by the client; nothing kept")
        # Nobody is left to read this; answering (not raising) keeps it out of the error log.
        raise bad_request("The upload was interrupted", param="file",
                          code="upload_interrupted") from exc
    except Exception as exc:
        upload.abort()
        if type(exc).__name__.endswith("ParseError"):  # python-multipart's malformed-body errors
            raise bad_request(f"Malformed multipart body: {exc}", code="invalid_form") from exc
        raise
    except BaseException:  # cancelled mid-stream (server shutdown): still leave nothing
        upload.abort()
        raise
    if upload.too_large:
        raise _too_large(limit)
    assert upload.artifact_id is not None
    purpose = upload.fields.get("purpose")
    if purpose not in PURPOSES:
        await run_in_threadpool(_forget_object, ctx, upload.artifact_id)
        if purpose is None:
            raise bad_request("Missing required parameter: 'purpose' (use 'fine-tune')",
                              param="purpose", code="missing_required_parameter")
        raise bad_request(f"Invalid value for 'purpose': {purpose!r}; lorapool accepts "
                          f"{', '.join(repr(p) for p in PURPOSES)}", param="purpose",
                          code="invalid_value")
    return await run_in_threadpool(_validate_and_record, ctx, owner, upload.artifact_id,
                                   upload.size, upload.filename or "upload.jsonl", purpose)


@router.get("", response_model=ListResponse[FileObject])
def list_files(
    purpose: Optional[str] = Query(None, max_length=64),
    after: Optional[str] = Query(None, max_length=64),
    limit: int = Query(10_000, ge=1, le=10_000),
    order: Literal["asc", "desc"] = "desc",
    owner: str = Depends(tenant),
    ctx: AppContext = Depends(context),
) -> Any:
    try:
        recs, more = ctx.store.list_files(owner, purpose=purpose, after=after, limit=limit,
                                          order=order)
    except NotFound as exc:
        raise bad_request(f"'after' names no file of yours: '{after}'", param="after") from exc
    return convert.page([convert.file(r) for r in recs], more)


@router.get("/{file_id}", response_model=FileObject)
def get_file(file_id: str, owner: str = Depends(tenant), ctx: AppContext = Depends(context)) -> Any:
    rec = ctx.store.get_file(file_id, owner)
    if rec is None:
        raise not_found("file", file_id)
    return convert.file(rec)


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, owner: str = Depends(tenant),
                ctx: AppContext = Depends(context)) -> Any:
    if ctx.store.get_file(file_id, owner) is None:
        raise not_found("file", file_id)
    users = ctx.store.active_jobs_using_file(file_id)
    if users:
        raise APIError(409, f"File '{file_id}' is used by job(s) not yet finished: "
                       f"{', '.join(users)}; cancel them or wait", param="file_id",
                       code="file_in_use")
    with ctx.objects_lock:
        rec = ctx.store.delete_file(file_id, owner)
        if rec is None:
            raise not_found("file", file_id)
        if not ctx.store.artifact_referenced(rec.artifact_id):
            ctx.artifacts.delete(rec.artifact_id)
    return FileDeleted(id=file_id, deleted=True)


@router.get("/{file_id}/content")
def file_content(file_id: str, owner: str = Depends(tenant),
                 ctx: AppContext = Depends(context)) -> Any:
    rec = ctx.store.get_file(file_id, owner)
    if rec is None:
        raise not_found("file", file_id)
    path = ctx.artifacts.path(rec.artifact_id)
    if not path.is_file():
        raise APIError(500, f"The stored content of '{file_id}' is missing", code="internal_error")
    return FileResponse(path, media_type="application/octet-stream", filename=rec.filename)
