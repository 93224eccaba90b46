"""Streaming a multipart upload straight into the artifact store, with the size limit.

Starlette's form parser spools a whole upload to a temp file before the route sees it, so an
oversize upload would fill a disk before it is refused. Here the `file` part's bytes go, as
they arrive, into an `ArtifactWriter` (hashing as it writes, in the artifact folder's `tmp/`),
which refuses past the limit and removes what it wrote. After the limit the rest of the body is
read and dropped, so the client gets the 413 instead of a broken pipe.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from python_multipart.multipart import MultipartParser, parse_options_header

from ..artifacts import ArtifactStore, ArtifactTooLarge, ArtifactWriter

MAX_FIELD_BYTES = 4096  # a text field (purpose): anything longer is not a form we expect
MAX_PARTS = 16  # the form has two parts (file, purpose); a few more are tolerated, not thousands


class UploadFormError(ValueError):
    """The form is not what POST /v1/files takes; `.param` names the part at fault."""

    def __init__(self, message: str, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    name: Optional[str] = None
    filename: Optional[str] = None
    value: bytearray = field(default_factory=bytearray)


def boundary_of(content_type: Optional[str]) -> bytes:
    if not content_type:
        raise UploadFormError("POST /v1/files takes multipart/form-data (no Content-Type sent)")
    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        raise UploadFormError(f"POST /v1/files takes multipart/form-data, not "
                              f"{kind.decode('latin-1')}")
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadFormError("multipart/form-data without a boundary")
    return boundary


def clean_filename(raw: Optional[str]) -> str:
    # Only the base name, whatever path or separators a client sent.
    name = os.path.basename((raw or "").replace("\\", "/")).strip()
    name = "".join(ch for ch in name if ch.isprintable())
    return (name or "upload.jsonl")[:255]


class MultipartUpload:
    """Feed it the request body chunk by chunk; `file_id`/`size`/`fields` after `finish()`."""

    def __init__(self, artifacts: ArtifactStore, content_type: Optional[str], max_bytes: int,
                 file_field: str = "file") -> None:
        self.max_bytes = max_bytes
        self.file_field = file_field
        self.artifacts = artifacts
        self.fields: dict[str, str] = {}
        self.filename: Optional[str] = None
        self.too_large = False
        self.artifact_id: Optional[str] = None
        self.size = 0
        self._writer: Optional[ArtifactWriter] = None
        self._part: Optional[_Part] = None
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._files_seen = 0
        self._n_parts = 0
        self._error: Optional[UploadFormError] = None
        self._parser = MultipartParser(boundary_of(content_type), callbacks={
            "on_part_begin": self._on_part_begin,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
            "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value,
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
        })

    # -- parser callbacks -------------------------------------------------------------------
    def _on_part_begin(self) -> None:
        self._n_parts += 1
        if self._n_parts > MAX_PARTS:
            self._fail(UploadFormError(f"too many form parts (the limit is {MAX_PARTS})"))
        self._part = _Part()

    # Part headers are buffered until each ends; python-multipart bounds their size and count
    # per part (a ParseError, answered 400 by the route).
    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        if self._part is None or self._error is not None:
            return
        self._part.headers[bytes(self._header_field).lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        part = self._part
        if part is None or self._error is not None:
            return  # refused already: open no writer
        _, opts = parse_options_header(part.headers.get(b"content-disposition", b""))
        part.name = opts.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in opts:
            part.filename = opts[b"filename"].decode("utf-8", "replace")
        if part.name == self.file_field:
            self._files_seen += 1
            if self._files_seen > 1:
                self._fail(UploadFormError("send exactly one 'file' part", param="file"))
                return
            self.filename = clean_filename(part.filename)
            self._writer = self.artifacts.writer(max_bytes=self.max_bytes)

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        if part is None or self._error is not None:
            return
        if part.name == self.file_field:
            if self._writer is None or self.too_large:
                return  # past the limit: drop the rest
            try:
                self._writer.write(data[start:end])
            except ArtifactTooLarge:
                self.too_large = True
                self._writer = None  # the writer removed its temp file
        else:
            if len(part.value) + (end - start) > MAX_FIELD_BYTES:
                self._fail(UploadFormError(f"form field '{part.name}' is too long",
                                           param=part.name))
                return
            part.value += data[start:end]

    def _on_part_end(self) -> None:
        part = self._part
        if part is None or self._error is not None:
            return
        if part.name != self.file_field and part.name:
            self.fields[part.name] = part.value.decode("utf-8", "replace")
        self._part = None

    def _fail(self, err: UploadFormError) -> None:
        if self._error is None:
            self._error = err
        self.abort()

    # -- driving ----------------------------------------------------------------------------
    def feed(self, chunk: bytes) -> None:
        if chunk and self._error is None:
            self._parser.write(chunk)

    def finish(self) -> None:
        """End of body: raise what went wrong, or commit the file into the store."""
        if self._error is None:
            self._parser.finalize()
        if self._error is not None:
            raise self._error
        if self.too_large:
            return
        if self._writer is None:
            raise UploadFormError("Missing required parameter: 'file' (a multipart file part)",
                                  param="file")
        self.artifact_id, self.size = self._writer.commit()
        self._writer = None

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
