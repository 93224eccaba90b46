"""Adapters in use elsewhere: export (`GET /v1/adapters/{id}/export`), import (`POST
/v1/adapters`) and the base a user needs (`GET /v1/models/{id}/download`, routed from
routes_resources so that it comes before the `{id:path}` model route).

- `peft` exports are small (the adapter only) and built here from the stored folder.
- `merged`, `gguf` and the base need the base model: they run as pool tasks on a node
  (`PoolTasks.request_export`); the answer is the archive once it is built, else `202` with the
  export's status and `Retry-After`. `?wait=S` blocks up to S seconds first; `?prepare=true`
  never sends the archive, only the status (the client polls that, then downloads).
- Import takes a PEFT folder as a .tar.gz/.tar/.zip (multipart `file`, optional
  `base_model`), checks it fully in a temporary folder, and only then stores anything.

Base weights leave the server (a `merged` export, a model download) only where the admin
allows it: `LORAPOOL_ALLOW_MODEL_DOWNLOAD` = `builtin` (default: built-in models, which are
public), `all`, or `none`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tarfile
import tempfile
import time
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Optional

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.background import BackgroundTask

from ..merge.adapter_import import (
    ImportLimits,
    ImportRefused,
    check_adapter,
    check_config,
    unpack_archive,
)
from ..merge.export import FORMATS, PUBLIC_IDS, export_peft, public_id
from ..pool.transfer import content_id, read_folder
from .access import adapter_resource, require_tasks, visible_adapter
from .context import AppContext, context, tenant
from .errors import APIError, bad_request, not_found

router = APIRouter(tags=["export"])

IMPORT_LIMITS = ImportLimits()
RETRY_AFTER_S = 2


def lorapool_version() -> str:
    try:
        return importlib_metadata.version("lorapool")
    except importlib_metadata.PackageNotFoundError:
        return "0.1.0"


def download_allowed(model: Any) -> bool:
    """Whether the admin lets `model`'s weights leave the server (see the module docstring)."""
    policy = os.environ.get("LORAPOOL_ALLOW_MODEL_DOWNLOAD", "builtin").strip().lower()
    if policy in ("all", "1", "true", "yes", "on"):
        return True
    if policy in ("none", "0", "false", "no", "off"):
        return False
    return bool(model.builtin)


def model_details(model: Any) -> dict[str, Any]:
    """The fields GET /v1/models/{id} adds to the OpenAI model object."""
    return {"source": "builtin" if model.builtin else "registered", "format": model.format,
            "sha256": model.sha256, "bytes": model.bytes,
            "public_id": public_id(model.name, builtin=model.builtin),
            "downloadable": download_allowed(model)}


# -- archives ---------------------------------------------------------------------------------


def _archive_response(files: dict[str, tuple[str, int]], artifacts: Any,
                      filename: str) -> FileResponse:
    """A tar.gz of a stored folder (members at the top level), built in a temp file and
    streamed; gzip level 1, since model weights hardly compress and level 9 costs minutes."""
    fd, tmp = tempfile.mkstemp(prefix="lorapool-export-", suffix=".tar.gz")
    os.close(fd)
    try:
        now = int(time.time())
        with tarfile.open(tmp, "w:gz", compresslevel=1) as tar:
            for rel in sorted(files):
                oid, size = files[rel]
                info = tarfile.TarInfo(rel)
                info.size, info.mtime, info.mode = size, now, 0o644
                with artifacts.open(oid) as fh:
                    tar.addfile(info, fh)
    except BaseException:
        os.unlink(tmp)
        raise
    return FileResponse(tmp, media_type="application/gzip", filename=filename,
                        background=BackgroundTask(os.unlink, tmp))


def _folder_response(folder: Path, filename: str) -> FileResponse:
    fd, tmp = tempfile.mkstemp(prefix="lorapool-export-", suffix=".tar.gz")
    os.close(fd)
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            for f in sorted(folder.iterdir()):
                tar.add(f, arcname=f.name, recursive=False)
    except BaseException:
        os.unlink(tmp)
        raise
    return FileResponse(tmp, media_type="application/gzip", filename=filename,
                        background=BackgroundTask(os.unlink, tmp))


def _status_body(state: Any) -> dict[str, Any]:
    rec = state.record
    return {"object": "export", "id": rec.id, "format": rec.format, "status": rec.status,
            "adapter": state.adapter.id if state.adapter is not None else None,
            "model": state.model.name}


async def _pool_export(ctx: AppContext, fmt: str, model: Any, adapter: Any, *, wait: float,
                       prepare: bool, filename: str) -> Any:
    require_tasks(ctx, "exports")
    state = ctx.tasks.request_export(fmt, model, adapter,
                                     base_id=public_id(model.name, builtin=model.builtin))
    rec = state.record  # the task loop updates it in place
    deadline = time.monotonic() + wait
    while rec.status in ("queued", "running") and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    if rec.status == "failed":
        raise APIError(422 if rec.error_code in ("invalid_export", "invalid_format") else 500,
                       f"The export failed: {rec.error_message}",
                       code=rec.error_code or "export_failed", param="format")
    if rec.status != "succeeded":
        return JSONResponse(_status_body(state), status_code=202,
                            headers={"Retry-After": str(RETRY_AFTER_S)})
    if prepare:
        return JSONResponse(_status_body(state))
    files = ctx.artifacts.manifest(rec.artifact_id)
    return await asyncio.to_thread(_archive_response, files, ctx.artifacts, filename)


# -- export -----------------------------------------------------------------------------------


@router.get("/v1/adapters/{adapter_id}/export")
async def export_adapter(
    adapter_id: str,
    format: str = Query(..., description="peft | merged | gguf"),
    wait: float = Query(60.0, ge=0, le=600, description="seconds to wait for a pool export"),
    prepare: bool = Query(False, description="answer the export's status, never the archive"),
    owner: str = Depends(tenant),
    ctx: AppContext = Depends(context),
) -> Any:
    """The adapter as a tar.gz in `format`; see the module docstring."""
    rec = visible_adapter(ctx, adapter_id, owner)
    if format not in FORMATS:
        raise bad_request(f"format must be one of {', '.join(FORMATS)}, got '{format}'",
                          param="format")
    model = ctx.store.get_model(rec.base_model)
    if format == "peft":
        base_id = public_id(rec.base_model, builtin=bool(model and model.builtin))
        if prepare:
            return {"object": "export", "id": None, "format": "peft", "status": "succeeded",
                    "adapter": rec.id, "model": rec.base_model}
        return await asyncio.to_thread(_peft_response, ctx, rec, base_id)
    if model is None:
        raise APIError(409, f"the adapter's base model '{rec.base_model}' is no longer "
                       "registered, so it cannot be merged or converted", code="model_not_found",
                       param="format")
    if rec.base_model_sha256 and model.sha256 != rec.base_model_sha256:
        raise APIError(409, f"model '{model.name}' was registered again with other weights "
                       "since this adapter was trained", code="model_changed", param="format")
    if format == "merged" and not download_allowed(model):
        raise APIError(403, f"the admin does not allow model '{model.name}' to be downloaded, "
                       "and a merged export contains it (LORAPOOL_ALLOW_MODEL_DOWNLOAD)",
                       code="download_not_allowed", param="format")
    return await _pool_export(ctx, format, model, rec, wait=wait, prepare=prepare,
                              filename=f"{rec.id}-{format}.tar.gz")


def _peft_response(ctx: AppContext, rec: Any, base_id: str) -> FileResponse:
    job = ctx.store.get_job(rec.job_id) if rec.job_id else None
    extra = {"job_id": rec.job_id, "sha256": rec.sha256, "created_at": rec.created_at,
             "metrics": rec.metrics or {}}
    if job is not None:
        extra["spec"] = job.spec
    with tempfile.TemporaryDirectory(prefix="lorapool-peft-") as tmp:
        src = ctx.artifacts.get_dir(rec.artifact_id, Path(tmp) / "src")
        meta_path = src / "lorapool.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        if job is None and meta.get("spec") is not None:
            extra["spec"] = meta["spec"]
        extra["metrics"] = {**(meta.get("metrics") or {}), **extra["metrics"]}
        out = export_peft(src, Path(tmp) / "out", adapter_id=rec.id, base_id=base_id,
                          base_sha256=rec.base_model_sha256, version=lorapool_version(),
                          extra_metadata=extra)
        return _folder_response(out, f"{rec.id}-peft.tar.gz")


# -- the base ---------------------------------------------------------------------------------


async def download_model(ctx: AppContext, model_id: str, wait: float, prepare: bool) -> Any:
    """The (dequantised) base as an HF folder tar.gz, where the admin allows it."""
    model = ctx.store.get_model(model_id)
    if model is None:
        raise not_found("model", model_id)
    if not download_allowed(model):
        raise APIError(403, f"the admin does not allow model '{model_id}' to be downloaded "
                       "(LORAPOOL_ALLOW_MODEL_DOWNLOAD)", code="download_not_allowed")
    safe = model_id.replace("/", "--")
    return await _pool_export(ctx, "base", model, None, wait=wait, prepare=prepare,
                              filename=f"{safe}.tar.gz")


# -- import -----------------------------------------------------------------------------------


def _resolve_base(ctx: AppContext, requested: Optional[str], config: dict[str, Any]) -> Any:
    if requested:
        model = ctx.store.get_model(requested)
        if model is None:
            raise bad_request(f"base_model '{requested}' is not a registered model",
                              param="base_model")
        return model
    named = str(config.get("base_model_name_or_path") or "")
    candidates = [named] + [k for k, v in PUBLIC_IDS.items() if v == named]
    for name in candidates:
        model = ctx.store.get_model(name) if name else None
        if model is not None:
            return model
    raise bad_request(f"adapter_config.json names base '{named}', which is no registered "
                      "model; pass base_model", param="base_model")


def _import(ctx: AppContext, owner: str, archive: Path, requested: Optional[str],
            work: Path) -> Any:
    folder = unpack_archive(archive, work / "adapter", IMPORT_LIMITS)
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImportRefused(f"adapter_config.json is not valid JSON: {exc}",
                            "adapter_config.json") from None
    if not isinstance(config, dict):
        raise ImportRefused("adapter_config.json must be a JSON object", "adapter_config.json")
    check_config(config)  # a broken config is the first thing to say, before the base
    model = _resolve_base(ctx, requested, config)
    check_adapter(folder, model_path=model.path)
    # Recorded like a trained adapter: the registered base's name and hash, so merges,
    # evaluations and exports treat it as one of the base's adapters.
    config["base_model_name_or_path"] = model.name
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    (folder / "lorapool.json").write_text(json.dumps({
        "format": "lorapool-adapter/1", "base_model": model.name,
        "base_model_sha256": model.sha256, "n_examples": None, "spec": None,
        "metrics": {}, "job_id": None, "imported": True}, indent=2))
    files = read_folder(folder)
    artifact_id = ctx.artifacts.put_files(files)
    try:
        return ctx.store.add_adapter(
            tenant=owner, base_model=model.name, base_model_sha256=model.sha256, job_id=None,
            artifact_id=artifact_id, bytes=sum(len(b) for b in files.values()),
            sha256=content_id(files), metrics={"imported": True})
    except BaseException:
        ctx.artifacts.delete(artifact_id)
        raise


@router.post("/v1/adapters")
async def import_adapter(request: Request, owner: str = Depends(tenant),
                         ctx: AppContext = Depends(context)) -> Any:
    """Import a PEFT folder archive (multipart `file`, optional `base_model`)."""
    limit = IMPORT_LIMITS.max_archive_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + 64 * 1024:
        raise APIError(413, f"the archive is larger than the limit of {limit} bytes",
                       param="file", code="file_too_large")
    try:
        form = await request.form(max_files=1, max_fields=4)
    except Exception as exc:  # starlette's parser: not multipart, too many parts, …
        raise bad_request(f"POST /v1/adapters takes multipart/form-data with a 'file' part "
                          f"({exc})", param="file") from None
    upload = form.get("file")
    requested = form.get("base_model")
    if upload is None or isinstance(upload, str):
        raise bad_request("no 'file' part (the adapter archive)", param="file")
    work = Path(tempfile.mkdtemp(prefix="lorapool-import-"))
    try:
        archive = work / "upload"
        with open(archive, "wb") as out:
            written = 0
            while chunk := await upload.read(1 << 20):
                written += len(chunk)
                if written > limit:
                    raise APIError(413, f"the archive is larger than the limit of {limit} "
                                   "bytes", param="file", code="file_too_large")
                out.write(chunk)
        try:
            rec = await asyncio.to_thread(_import, ctx, owner, archive,
                                          str(requested) if requested else None, work)
        except ImportRefused as exc:
            raise bad_request(exc.message, param=exc.param) from None
        return adapter_resource(ctx, rec, owner)
    finally:
        await form.close()
        shutil.rmtree(work, ignore_errors=True)
