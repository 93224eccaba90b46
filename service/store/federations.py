"""The store's side of federated rounds: one `federations` row per federation, mixed into `Store`.

A federation's whole course lives in its row: the request (`model`, `spec`, `participants`,
`rounds_total`, aggregation `method`/`params`/`weights`, `quorum`, `deadline_s`) and what
happened (`rounds`: per round its jobs, who took part and who dropped out and why, the global
adapter and metrics). The driver (service/pool/federation.py) is the only writer after create;
status changes go through a compare-and-set like jobs'.

Visibility: the creator sees its federations; so does every tenant named as a participant
(read only), since its data trained them.
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Optional

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    Index,
    Integer,
    String,
    Text,
    select,
    update,
)
from sqlalchemy.orm import Mapped, mapped_column

from .schema import Base

FEDERATION_TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


class FederationRow(Base):
    __tablename__ = "federations"
    __table_args__ = (
        Index("ix_federations_tenant_seq", "tenant", "seq"),
        Index("ix_federations_status_seq", "status", "seq"),
        {"sqlite_autoincrement": True},
    )

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    tenant: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[int] = mapped_column(BigInteger)
    finished_at: Mapped[Optional[int]] = mapped_column(BigInteger, nullable=True)
    model: Mapped[str] = mapped_column(String(128))
    model_sha256: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    participants: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    tenants: Mapped[list[str]] = mapped_column(JSON, default=list)
    rounds_total: Mapped[int] = mapped_column(Integer)
    method: Mapped[str] = mapped_column(String(32))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    weights: Mapped[Optional[dict[str, float]]] = mapped_column(JSON, nullable=True)
    quorum: Mapped[int] = mapped_column(Integer)
    deadline_s: Mapped[float] = mapped_column(Float)
    rounds: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    global_adapter: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    error_code: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    error_message: Mapped[Optional[str]] = mapped_column(Text, nullable=True)


class FederationRecord(BaseModel):
    """A detached copy of a federations row (see the module docstring)."""

    model_config = ConfigDict(from_attributes=True, extra="forbid")

    id: str
    tenant: str
    status: str = "running"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    finished_at: Optional[int] = None
    model: str
    model_sha256: Optional[str] = None
    spec: dict[str, Any] = Field(default_factory=dict)  # TrainSpec fields but base_model
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    # [{"name", "tenant", "training_file" | "dataset": {"node","name","examples"}, "weight"}]
    participants: list[dict[str, Any]] = Field(default_factory=list)
    tenants: list[str] = Field(default_factory=list)  # who may read it
    rounds_total: int
    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    weights: Optional[dict[str, float]] = None
    quorum: int
    deadline_s: float
    rounds: list[dict[str, Any]] = Field(default_factory=list)
    global_adapter: Optional[str] = None
    cancel_requested: bool = False
    error_code: Optional[str] = None
    error_message: Optional[str] = None

    @property
    def terminal(self) -> bool:
        return self.status in FEDERATION_TERMINAL


_FIELDS = frozenset(FederationRecord.model_fields)


def _record(row: FederationRow) -> FederationRecord:
    return FederationRecord(**{f: getattr(row, f) for f in _FIELDS})


class FederationStore:
    """Mixin for `Store` (which provides `_tx` and `_after`)."""

    def create_federation(self, rec: FederationRecord) -> FederationRecord:
        row = FederationRow(**rec.model_dump())
        with self._tx() as s:  # type: ignore[attr-defined]
            s.add(row)
            s.flush()
            return _record(row)

    def get_federation(self, fed_id: str, tenant: Optional[str] = None
                       ) -> Optional[FederationRecord]:
        """The federation, or None when missing or (with `tenant`) not visible to it."""
        with self._tx(write=False) as s:  # type: ignore[attr-defined]
            row = s.scalar(select(FederationRow).where(FederationRow.id == fed_id))
            if row is None or (tenant is not None and tenant != row.tenant
                               and tenant not in (row.tenants or [])):
                return None
            return _record(row)

    def list_federations(self, tenant: str, *, after: Optional[str] = None,
                         limit: int = 100) -> tuple[list[FederationRecord], bool]:
        """The tenant's own federations, newest first (participants find theirs by id)."""
        scope = FederationRow.tenant == tenant
        with self._tx(write=False) as s:  # type: ignore[attr-defined]
            q = self._after(s, select(FederationRow).where(scope),  # type: ignore[attr-defined]
                            FederationRow, after, "desc", scope)
            rows = list(s.scalars(q.limit(limit + 1)))
            return [_record(r) for r in rows[:limit]], len(rows) > limit

    def federations_in_status(self, *statuses: str) -> list[FederationRecord]:
        with self._tx(write=False) as s:  # type: ignore[attr-defined]
            q = select(FederationRow).where(FederationRow.status.in_(statuses)).order_by(
                FederationRow.seq)
            return [_record(r) for r in s.scalars(q)]

    def update_federation(self, fed_id: str, *, from_statuses: Optional[Iterable[str]] = None,
                          **fields: Any) -> bool:
        """Set `fields`; with `from_statuses`, only while the status is one of them (CAS)."""
        unknown = set(fields) - _FIELDS
        if unknown or "id" in fields or "tenant" in fields:
            raise TypeError(f"not updatable federation fields: {sorted(unknown or fields)}")
        q = update(FederationRow).where(FederationRow.id == fed_id)
        if from_statuses is not None:
            q = q.where(FederationRow.status.in_(list(from_statuses)))
        with self._tx() as s:  # type: ignore[attr-defined]
            return s.execute(q.values(**fields)).rowcount == 1
