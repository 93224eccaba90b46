"""Baseline: the schema as it stood when lorapool moved to Alembic (every table, column and index).

Revision ID: 0001
Revises:
Create Date: 2025-01-01

The tables are written out here as plain `sa.Table`s, frozen: later changes to the models in
schema.py / federations.py go into new revisions and never into this file. `METADATA` is also
what `db.migrate` uses to catch up a database made by a lorapool before Alembic (tables present,
no `alembic_version`): it creates the tables that database lacks and adds the columns it lacks,
with the defaults below, before stamping it at this revision. So the Python-side `default=`s
(which the ORM models carry and a freshly created table does not need) are kept here on purpose.
"""

from __future__ import annotations

from typing import Any, Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# rowids of deleted rows are never handed out again (cursor pagination keeps its meaning).
_AUTOINC = {"sqlite_autoincrement": True}

METADATA = sa.MetaData()


def _seq() -> sa.Column:
    return sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True)


def _req(name: str, type_: Any, *args: Any, **kw: Any) -> sa.Column:
    """A NOT NULL column (the models' non-Optional `Mapped[...]`)."""
    return sa.Column(name, type_, *args, nullable=False, **kw)


def _opt(name: str, type_: Any, *args: Any, **kw: Any) -> sa.Column:
    return sa.Column(name, type_, *args, nullable=True, **kw)


def _pool_task_columns() -> list[sa.Column]:
    """Columns merges and evaluations share (schema._PoolTaskColumns), in the models' order."""
    return [
        _seq(),
        _req("id", sa.String(64), unique=True),
        _req("tenant", sa.String(64)),
        _req("status", sa.String(32)),
        _opt("idempotency_key", sa.String(255)),
        _req("created_at", sa.BigInteger),
        _opt("started_at", sa.BigInteger),
        _opt("finished_at", sa.BigInteger),
        _opt("node", sa.String(128)),
        _req("attempt", sa.Integer, default=0),
        _opt("error_code", sa.String(64)),
        _opt("error_message", sa.Text),
        _opt("error_param", sa.String(64)),
    ]


sa.Table(
    "tenants", METADATA,
    _seq(),
    _req("name", sa.String(64), unique=True),
    _req("created_at", sa.BigInteger),
    **_AUTOINC,
)

sa.Table(
    "tokens", METADATA,
    _seq(),
    _req("tenant", sa.String(64), sa.ForeignKey("tenants.name"), index=True),
    _req("token_sha256", sa.String(64), unique=True),
    _req("prefix", sa.String(16)),
    _req("created_at", sa.BigInteger),
    **_AUTOINC,
)

sa.Table(
    "models", METADATA,
    _seq(),
    _req("name", sa.String(128), unique=True),
    _req("path", sa.Text),
    _req("format", sa.String(8)),
    _req("sha256", sa.String(64)),
    _req("bytes", sa.BigInteger, default=0),
    _req("trust_remote_code", sa.Boolean, default=False),
    _req("builtin", sa.Boolean, default=False),
    _req("created_at", sa.BigInteger),
    **_AUTOINC,
)

sa.Table(
    "files", METADATA,
    _seq(),
    _req("id", sa.String(64), unique=True),
    _req("tenant", sa.String(64)),
    _req("filename", sa.String(255)),
    _req("bytes", sa.BigInteger),
    _req("sha256", sa.String(64)),
    _req("purpose", sa.String(32)),
    _req("created_at", sa.BigInteger),
    _opt("examples", sa.Integer),
    _opt("format", sa.String(32)),
    _req("artifact_id", sa.String(80), index=True),
    sa.Index("ix_files_tenant_seq", "tenant", "seq"),
    **_AUTOINC,
)

sa.Table(
    "jobs", METADATA,
    _seq(),
    _req("id", sa.String(64), unique=True),
    _req("tenant", sa.String(64)),
    _req("model", sa.String(128)),
    _opt("model_sha256", sa.String(64)),
    _req("status", sa.String(32)),
    _req("created_at", sa.BigInteger),
    _opt("started_at", sa.BigInteger),
    _opt("finished_at", sa.BigInteger),
    _opt("fine_tuned_model", sa.String(128)),
    _opt("training_file", sa.String(64)),
    _opt("validation_file", sa.String(64)),
    _req("hyperparameters", sa.JSON, default=dict),
    _opt("trained_tokens", sa.BigInteger),
    _req("seed", sa.BigInteger, default=42),
    _opt("estimated_finish", sa.BigInteger),
    _opt("metadata", sa.JSON),
    _opt("suffix", sa.String(64)),
    _req("result_files", sa.JSON, default=list),
    _req("lora", sa.JSON, default=dict),
    _req("quantization", sa.String(8), default="nf4"),
    _req("max_seq_len", sa.Integer, default=1024),
    _opt("micro_batch_size", sa.Integer),
    _opt("learning_rate", sa.Float),
    _opt("checkpoint_every", sa.Integer),
    _req("spec", sa.JSON, default=dict),
    _req("placement", sa.JSON, default=dict),
    _opt("dataset", sa.JSON),
    _opt("init_adapter", sa.String(64)),
    _opt("idempotency_key", sa.String(255)),
    _req("cancel_requested", sa.Boolean, default=False),
    _opt("node_id", sa.String(128)),
    _req("attempt", sa.Integer, default=0),
    _opt("step", sa.Integer),
    _opt("total_steps", sa.Integer),
    _opt("predicted_memory", sa.BigInteger),
    _opt("measured_peak_memory", sa.BigInteger),
    _req("memory_breakdown", sa.JSON, default=dict),
    _opt("error_code", sa.String(64)),
    _opt("error_message", sa.Text),
    _opt("error_param", sa.String(64)),
    _opt("adapter_id", sa.String(64)),
    sa.UniqueConstraint("tenant", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
    sa.Index("ix_jobs_tenant_seq", "tenant", "seq"),
    sa.Index("ix_jobs_status_seq", "status", "seq"),
    **_AUTOINC,
)

sa.Table(
    "events", METADATA,
    _seq(),
    _req("id", sa.String(64), unique=True),
    _req("job_id", sa.String(64), sa.ForeignKey("jobs.id")),
    _req("created_at", sa.BigInteger),
    _req("level", sa.String(8)),
    _req("type", sa.String(16)),
    _req("message", sa.Text),
    _opt("data", sa.JSON),
    sa.Index("ix_events_job_seq", "job_id", "seq"),
    **_AUTOINC,
)

sa.Table(
    "checkpoints", METADATA,
    _seq(),
    _req("id", sa.String(64), unique=True),
    _req("job_id", sa.String(64), sa.ForeignKey("jobs.id")),
    _req("step", sa.Integer),
    _req("artifact_id", sa.String(80)),
    _req("metrics", sa.JSON, default=dict),
    _req("created_at", sa.BigInteger),
    sa.Index("ix_checkpoints_job_seq", "job_id", "seq"),
    **_AUTOINC,
)

sa.Table(
    "adapters", METADATA,
    _seq(),
    _req("id", sa.String(64), unique=True),
    _req("tenant", sa.String(64)),
    _req("base_model", sa.String(128)),
    _opt("base_model_sha256", sa.String(64)),
    _opt("job_id", sa.String(64), index=True),
    _req("artifact_id", sa.String(80)),
    _req("bytes", sa.BigInteger, default=0),
    _opt("sha256", sa.String(64)),
    _req("metrics", sa.JSON, default=dict),
    _req("created_at", sa.BigInteger),
    sa.Index("ix_adapters_tenant_seq", "tenant", "seq"),
    **_AUTOINC,
)

sa.Table(
    "adapter_shares", METADATA,
    _seq(),
    _req("adapter_id", sa.String(64), index=True),
    _req("tenant", sa.String(64)),
    _req("created_at", sa.BigInteger),
    sa.UniqueConstraint("adapter_id", "tenant", name="uq_adapter_shares_adapter_tenant"),
    sa.Index("ix_adapter_shares_tenant", "tenant"),
    **_AUTOINC,
)

sa.Table(
    "merges", METADATA,
    _req("method", sa.String(32)),
    _req("adapters", sa.JSON, default=list),
    _opt("weights", sa.JSON),
    _req("params", sa.JSON, default=dict),
    _opt("name", sa.String(128)),
    _opt("suffix", sa.String(64)),
    _opt("evaluate_on", sa.String(64)),
    _opt("result_adapter", sa.String(64), index=True),
    _opt("applied_weights", sa.JSON),
    _opt("rank", sa.Integer),
    _opt("relative_error", sa.Float),
    _opt("deviation_from_exact", sa.Float),
    _opt("evaluation_id", sa.String(64)),
    *_pool_task_columns(),
    sa.UniqueConstraint("tenant", "idempotency_key", name="uq_merges_tenant_idempotency_key"),
    sa.Index("ix_merges_tenant_seq", "tenant", "seq"),
    sa.Index("ix_merges_status_seq", "status", "seq"),
    **_AUTOINC,
)

sa.Table(
    "evaluations", METADATA,
    _req("model", sa.String(128)),
    _opt("model_sha256", sa.String(64)),
    _opt("adapter_id", sa.String(64)),
    _req("file_id", sa.String(64)),
    _req("params", sa.JSON, default=dict),
    _opt("merge_id", sa.String(64)),
    _opt("loss", sa.Float),
    _opt("perplexity", sa.Float),
    _opt("tokens", sa.BigInteger),
    _opt("examples", sa.Integer),
    *_pool_task_columns(),
    sa.UniqueConstraint("tenant", "idempotency_key",
                        name="uq_evaluations_tenant_idempotency_key"),
    sa.Index("ix_evaluations_tenant_seq", "tenant", "seq"),
    sa.Index("ix_evaluations_status_seq", "status", "seq"),
    **_AUTOINC,
)

sa.Table(
    "federations", METADATA,
    _seq(),
    _req("id", sa.String(64), unique=True),
    _req("tenant", sa.String(64)),
    _req("status", sa.String(32)),
    _req("created_at", sa.BigInteger),
    _opt("finished_at", sa.BigInteger),
    _req("model", sa.String(128)),
    _opt("model_sha256", sa.String(64)),
    _req("spec", sa.JSON, default=dict),
    _req("hyperparameters", sa.JSON, default=dict),
    _req("participants", sa.JSON, default=list),
    _req("tenants", sa.JSON, default=list),
    _req("rounds_total", sa.Integer),
    _req("method", sa.String(32)),
    _req("params", sa.JSON, default=dict),
    _opt("weights", sa.JSON),
    _req("quorum", sa.Integer),
    _req("deadline_s", sa.Float),
    _req("rounds", sa.JSON, default=list),
    _opt("global_adapter", sa.String(64)),
    _req("cancel_requested", sa.Boolean, default=False),
    _opt("error_code", sa.String(64)),
    _opt("error_message", sa.Text),
    sa.Index("ix_federations_tenant_seq", "tenant", "seq"),
    sa.Index("ix_federations_status_seq", "status", "seq"),
    **_AUTOINC,
)


def upgrade() -> None:
    # The frozen tables as written above, through the same DDL `create_all` of the models gave
    # before Alembic (so a database made either way has the same schema). Statements rather than
    # `create_all` so that `--sql` (offline) mode can print them too.
    for table in METADATA.sorted_tables:
        op.execute(sa.schema.CreateTable(table))
        for index in sorted(table.indexes, key=lambda i: i.name or ""):
            op.execute(sa.schema.CreateIndex(index))


def downgrade() -> None:
    for table in reversed(METADATA.sorted_tables):
        op.execute(sa.schema.DropTable(table))
