"""The store's side of exports (a merged model, a GGUF adapter, the dequantised base): one
`exports` row per export, mixed into `Store`.

An export is derived data keyed by (format, model sha256, adapter key): the same inputs always
give the same files, so requests share one. Its record survives a restart, so a finished
export's artifact is served again without rebuilding it and a queued or running one is picked
up again by the next server (service/pool/task_queue.py). The pool's task loop is the only
writer after create.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict
from sqlalchemy import BigInteger, Index, Integer, String, Text, select, update
from sqlalchemy.orm import Mapped, mapped_column

from .schema import Base


class ExportRow(Base):
    __tablename__ = "exports"
    __table_args__ = (
        Index("ix_exports_key_seq", "format", "model_sha256", "adapter_key", "seq"),
        Index("ix_exports_status_seq", "status", "seq"),
        {"sqlite_autoincrement": True},
    )

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    format: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(128))
    model_sha256: Mapped[str] = mapped_column(String(64))
    adapter_id: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    adapter_key: Mapped[str] = mapped_column(String(128))  # "" for the base itself
    base_id: Mapped[str] = mapped_column(String(256))
    status: Mapped[str] = mapped_column(String(32))
    artifact_id: Mapped[Optional[str]] = mapped_column(String(128), nullable=True)
    error_code: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    error_message: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    node: Mapped[Optional[str]] = mapped_column(String(128), nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[int] = mapped_column(BigInteger)


class ExportRecord(BaseModel):
    """A detached copy of an `exports` row."""

    model_config = ConfigDict(from_attributes=True, extra="forbid")

    id: str
    format: str
    model: str
    model_sha256: str
    adapter_id: Optional[str] = None
    adapter_key: str = ""
    base_id: str
    status: str = "queued"
    artifact_id: Optional[str] = None
    error_code: Optional[str] = None
    error_message: Optional[str] = None
    attempt: int = 0
    node: Optional[str] = None
    created_at: int = 0
    updated_at: int = 0

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.format, self.model_sha256, self.adapter_key)


_SETTABLE = frozenset({"status", "artifact_id", "error_code", "error_message", "attempt",
                       "node"})


class ExportStore:
    """Mixin for `Store` (which provides `_tx`)."""

    def create_export(self, record: ExportRecord) -> ExportRecord:
        now = int(time.time())
        values = record.model_dump()
        values["created_at"] = values["created_at"] or now
        values["updated_at"] = now
        with self._tx() as s:  # type: ignore[attr-defined]
            row = ExportRow(**values)
            s.add(row)
            s.flush()
            return ExportRecord.model_validate(row)

    def get_export(self, export_id: str) -> Optional[ExportRecord]:
        with self._tx(write=False) as s:  # type: ignore[attr-defined]
            row = s.scalar(select(ExportRow).where(ExportRow.id == export_id))
            return None if row is None else ExportRecord.model_validate(row)

    def latest_export(self, key: tuple[str, str, str]) -> Optional[ExportRecord]:
        """The newest export of (format, model sha256, adapter key), whatever its status."""
        fmt, model_sha256, adapter_key = key
        with self._tx(write=False) as s:  # type: ignore[attr-defined]
            row = s.scalar(select(ExportRow).where(
                ExportRow.format == fmt, ExportRow.model_sha256 == model_sha256,
                ExportRow.adapter_key == adapter_key).order_by(ExportRow.seq.desc()).limit(1))
            return None if row is None else ExportRecord.model_validate(row)

    def exports_in_status(self, *statuses: str) -> list[ExportRecord]:
        """Every export in one of `statuses`, oldest first."""
        with self._tx(write=False) as s:  # type: ignore[attr-defined]
            q = select(ExportRow).where(ExportRow.status.in_(statuses)).order_by(ExportRow.seq)
            return [ExportRecord.model_validate(r) for r in s.scalars(q)]

    def update_export(self, export_id: str, **fields: Any) -> bool:
        """Set `fields` (status, artifact_id, error_*, attempt, node); False when no such id."""
        unknown = set(fields) - _SETTABLE
        if unknown:
            raise TypeError(f"cannot set {sorted(unknown)}")
        fields["updated_at"] = int(time.time())
        with self._tx() as s:  # type: ignore[attr-defined]
            result = s.execute(update(ExportRow).where(ExportRow.id == export_id)
                               .values(**fields).execution_options(synchronize_session=False))
            return result.rowcount == 1
