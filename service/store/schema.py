"""The database tables (SQLAlchemy 2 declarative ORM).

Every table has an integer `seq` (autoincrement, never reused) for stable ordering and cursor
pagination, and resources have a public string `id` ("ftjob-…", "file-…"). Tenants are referred
to by name. Structured fields are JSON columns, so any SQLAlchemy backend works.
"""

from __future__ import annotations

from typing import Any, Optional

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# sqlite_autoincrement: rowids of deleted rows are never handed out again, so a cursor
# (`after=<id>`) keeps meaning the same place in the list.
_TABLE_ARGS = {"sqlite_autoincrement": True}


class Base(DeclarativeBase):
    pass


class Tenant(Base):
    __tablename__ = "tenants"
    __table_args__ = (_TABLE_ARGS,)

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[int] = mapped_column(BigInteger)


class Token(Base):
    __tablename__ = "tokens"
    __table_args__ = (_TABLE_ARGS,)

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(ForeignKey("tenants.name"), index=True)
    # Only the sha256 of the token is kept; a stolen database yields no usable token.
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # to recognise a token in a list
    created_at: Mapped[int] = mapped_column(BigInteger)
    # An admin token may also read /metrics and every tenant's jobs (the dashboard's admin
    # views); it still acts as its own tenant everywhere else.
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class ModelRow(Base):
    __tablename__ = "models"
    __table_args__ = (_TABLE_ARGS,)

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    path: Mapped[str] = mapped_column(Text)
    format: Mapped[str] = mapped_column(String(8))
    sha256: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    trust_remote_code: Mapped[bool] = mapped_column(Boolean, default=False)
    builtin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[int] = mapped_column(BigInteger)


class FileRow(Base):
    __tablename__ = "files"
    __table_args__ = (Index("ix_files_tenant_seq", "tenant", "seq"), _TABLE_ARGS)

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    tenant: Mapped[str] = mapped_column(String(64))
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    purpose: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[int] = mapped_column(BigInteger)
    examples: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    format: Mapped[Optional[str]] = mapped_column(String(32), nullable=True)
    artifact_id: Mapped[str] = mapped_column(String(80), index=True)


class JobRow(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
        Index("ix_jobs_tenant_seq", "tenant", "seq"),
        Index("ix_jobs_status_seq", "status", "seq"),
        _TABLE_ARGS,
    )

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    tenant: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(128))
    model_sha256: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    status: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[int] = mapped_column(BigInteger)
    started_at: Mapped[Optional[int]] = mapped_column(BigInteger, nullable=True)
    finished_at: Mapped[Optional[int]] = mapped_column(BigInteger, nullable=True)
    fine_tuned_model: Mapped[Optional[str]] = mapped_column(String(128), nullable=True)
    training_file: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    validation_file: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    trained_tokens: Mapped[Optional[int]] = mapped_column(BigInteger, nullable=True)
    seed: Mapped[int] = mapped_column(BigInteger, default=42)
    estimated_finish: Mapped[Optional[int]] = mapped_column(BigInteger, nullable=True)
    # OpenAI's `integrations` (experiment trackers the server logs the run to).
    integrations: Mapped[Optional[list[Any]]] = mapped_column(JSON, nullable=True)
    # `metadata` is taken by SQLAlchemy's declarative base; the column keeps the REST name.
    metadata_: Mapped[Optional[dict[str, str]]] = mapped_column("metadata", JSON, nullable=True)
    suffix: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    result_files: Mapped[list[str]] = mapped_column(JSON, default=list)
    lora: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    quantization: Mapped[str] = mapped_column(String(8), default="nf4")
    max_seq_len: Mapped[int] = mapped_column(Integer, default=1024)
    micro_batch_size: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    learning_rate: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    checkpoint_every: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    placement: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    dataset: Mapped[Optional[dict[str, Any]]] = mapped_column(JSON, nullable=True)
    init_adapter: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    idempotency_key: Mapped[Optional[str]] = mapped_column(String(255), nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    node_id: Mapped[Optional[str]] = mapped_column(String(128), nullable=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    step: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    total_steps: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    predicted_memory: Mapped[Optional[int]] = mapped_column(BigInteger, nullable=True)
    measured_peak_memory: Mapped[Optional[int]] = mapped_column(BigInteger, nullable=True)
    memory_breakdown: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)
    error_code: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    error_message: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
    error_param: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    adapter_id: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)


class EventRow(Base):
    __tablename__ = "events"
    __table_args__ = (Index("ix_events_job_seq", "job_id", "seq"), _TABLE_ARGS)

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    created_at: Mapped[int] = mapped_column(BigInteger)
    level: Mapped[str] = mapped_column(String(8))
    type: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[Optional[dict[str, Any]]] = mapped_column(JSON, nullable=True)


class CheckpointRow(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (Index("ix_checkpoints_job_seq", "job_id", "seq"), _TABLE_ARGS)

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    step: Mapped[int] = mapped_column(Integer)
    artifact_id: Mapped[str] = mapped_column(String(80))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[int] = mapped_column(BigInteger)


class AdapterRow(Base):
    __tablename__ = "adapters"
    __table_args__ = (Index("ix_adapters_tenant_seq", "tenant", "seq"), _TABLE_ARGS)

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    tenant: Mapped[str] = mapped_column(String(64))
    base_model: Mapped[str] = mapped_column(String(128))
    base_model_sha256: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    job_id: Mapped[Optional[str]] = mapped_column(String(64), nullable=True, index=True)
    artifact_id: Mapped[str] = mapped_column(String(80))
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    sha256: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[int] = mapped_column(BigInteger)


# -- sharing, merges and evaluations (issue 6) ----------------------------------------------


class AdapterShareRow(Base):
    """`tenant` may use (get, download, merge, evaluate) adapter `adapter_id` it does not own."""

    __tablename__ = "adapter_shares"
    __table_args__ = (
        UniqueConstraint("adapter_id", "tenant", name="uq_adapter_shares_adapter_tenant"),
        Index("ix_adapter_shares_tenant", "tenant"),
        _TABLE_ARGS,
    )

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    adapter_id: Mapped[str] = mapped_column(String(64), index=True)
    tenant: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[int] = mapped_column(BigInteger)


class _PoolTaskColumns:
    """What merges and evaluations share: a tenant's request run once on the pool."""

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    tenant: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(32))
    idempotency_key: Mapped[Optional[str]] = mapped_column(String(255), nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    started_at: Mapped[Optional[int]] = mapped_column(BigInteger, nullable=True)
    finished_at: Mapped[Optional[int]] = mapped_column(BigInteger, nullable=True)
    node: Mapped[Optional[str]] = mapped_column(String(128), nullable=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    error_code: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    error_message: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
    error_param: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)


class MergeRow(_PoolTaskColumns, Base):
    __tablename__ = "merges"
    __table_args__ = (
        UniqueConstraint("tenant", "idempotency_key", name="uq_merges_tenant_idempotency_key"),
        Index("ix_merges_tenant_seq", "tenant", "seq"),
        Index("ix_merges_status_seq", "status", "seq"),
        _TABLE_ARGS,
    )

    method: Mapped[str] = mapped_column(String(32))
    adapters: Mapped[list[str]] = mapped_column(JSON, default=list)
    weights: Mapped[Optional[list[float]]] = mapped_column(JSON, nullable=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    name: Mapped[Optional[str]] = mapped_column(String(128), nullable=True)
    suffix: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    evaluate_on: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    result_adapter: Mapped[Optional[str]] = mapped_column(String(64), nullable=True, index=True)
    applied_weights: Mapped[Optional[list[float]]] = mapped_column(JSON, nullable=True)
    rank: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    relative_error: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    deviation_from_exact: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    evaluation_id: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)


class EvaluationRow(_PoolTaskColumns, Base):
    __tablename__ = "evaluations"
    __table_args__ = (
        UniqueConstraint("tenant", "idempotency_key",
                         name="uq_evaluations_tenant_idempotency_key"),
        Index("ix_evaluations_tenant_seq", "tenant", "seq"),
        Index("ix_evaluations_status_seq", "status", "seq"),
        _TABLE_ARGS,
    )

    model: Mapped[str] = mapped_column(String(128))
    model_sha256: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    adapter_id: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    file_id: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    merge_id: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    loss: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    perplexity: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    tokens: Mapped[Optional[int]] = mapped_column(BigInteger, nullable=True)
    examples: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
