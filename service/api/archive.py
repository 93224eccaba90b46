"""A stored folder (adapter, checkpoint) as a downloadable tar.gz with a `lorapool.json`.

Members sit at the archive's top level (`adapter_config.json`, `adapter_model.safetensors`,
…, `lorapool.json`), so extracting into a folder gives a PEFT folder that
`PeftModel.from_pretrained` loads as is. The archive is built in a temp file (adapters are
megabytes) and streamed; the temp file goes when the response is sent.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
import time
from typing import Any

from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from ..artifacts import ArtifactError, ArtifactStore
from .errors import APIError

METADATA_FILE = "lorapool.json"


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(mtime)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def build_archive(artifacts: ArtifactStore, manifest_id: str, meta: dict[str, Any],
                  dest: str) -> None:
    """Write the tar.gz of the stored folder plus lorapool.json (`meta` over any the folder
    already has) to `dest`."""
    files = artifacts.manifest(manifest_id)
    merged: dict[str, Any] = {}
    if METADATA_FILE in files:
        try:
            merged = json.loads(artifacts.read_bytes(files[METADATA_FILE][0]))
        except (ValueError, UnicodeDecodeError):
            merged = {}
        if not isinstance(merged, dict):
            merged = {}
    merged.update(meta)
    now = time.time()
    with tarfile.open(dest, "w:gz") as tar:
        for rel in sorted(files):
            if rel == METADATA_FILE:
                continue
            oid, size = files[rel]
            info = tarfile.TarInfo(rel)
            info.size = size
            info.mtime = int(now)
            info.mode = 0o644
            with artifacts.open(oid) as fh:
                tar.addfile(info, fh)
        _add_bytes(tar, METADATA_FILE,
                   json.dumps(merged, indent=2, sort_keys=True, default=str).encode(), now)


def folder_archive_response(artifacts: ArtifactStore, manifest_id: str, meta: dict[str, Any],
                            filename: str) -> FileResponse:
    fd, tmp = tempfile.mkstemp(prefix="lorapool-dl-", suffix=".tar.gz")
    os.close(fd)
    try:
        build_archive(artifacts, manifest_id, meta, tmp)
    except ArtifactError as exc:
        os.unlink(tmp)
        raise APIError(500, f"The stored folder is damaged: {exc}", code="internal_error") from exc
    except BaseException:
        os.unlink(tmp)
        raise
    return FileResponse(tmp, media_type="application/gzip", filename=filename,
                        background=BackgroundTask(os.unlink, tmp))
