"""`Store`: the service's state behind plain methods, each its own transaction.

The API and the pool's scheduler thread call these methods; every one opens a session, does
its work, commits, and returns detached records (`records.py`), never live ORM objects. State
changes that race (the scheduler starting a job while a user cancels it) go through
`transition()`, an atomic compare-and-set on the job's status.

Listeners (`add_listener`) hear of every job event and job status change once it is committed,
from whichever thread wrote it; the API's event hub fans them out to stream followers, so no
follower has to ask the database what is new. They hear only of this process's writes.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import re
import secrets
import threading
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterable, Iterator, Literal, Optional

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from .db import WRITE_OPTION, make_engine, migrate
from .exports import ExportStore
from .federations import FederationStore
from .pool_tasks import PoolTaskStore
from .records import (
    ACTIVE,
    AdapterRecord,
    CheckpointRecord,
    EventRecord,
    FileRecord,
    JobRecord,
    JobStatusChange,
    ModelEntry,
)
from .schema import (
    AdapterRow,
    CheckpointRow,
    EventRow,
    FileRow,
    JobRow,
    ModelRow,
    Tenant,
    Token,
)

log = logging.getLogger("lorapool.store")

# A listener hears (topic, item): topic "job:<id>", item an EventRecord or a JobStatusChange.
Listener = Callable[[str, Any], None]

TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
TOKEN_PREFIX = "lp-"


class NotFound(LookupError):
    """The row an update or cursor names does not exist (or is not the caller's)."""


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def _now() -> int:
    return int(time.time())


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _finite(value: Any) -> Any:
    """JSON has no NaN/Infinity (a diverged loss is NaN): store them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# JobRecord field → JobRow attribute, where they differ.
_JOB_ATTR = {"metadata": "metadata_"}
_JOB_FIELDS = frozenset(JobRecord.model_fields)
_JOB_JSON_FIELDS = frozenset({"hyperparameters", "metadata", "result_files", "lora", "spec",
                              "memory_breakdown", "integrations"})


def _job_record(row: JobRow) -> JobRecord:
    fields = {f: getattr(row, _JOB_ATTR.get(f, f)) for f in _JOB_FIELDS}
    fields["integrations"] = fields["integrations"] or []  # NULL in rows made before the column
    return JobRecord(**fields)


# Integer columns a caller may hand a float (a metric, a timestamp): stored as int, so a
# record always reads back valid.
_JOB_INT_FIELDS = frozenset({"created_at", "started_at", "finished_at", "trained_tokens",
                             "estimated_finish", "max_seq_len", "micro_batch_size",
                             "checkpoint_every", "attempt", "step", "total_steps",
                             "predicted_memory", "measured_peak_memory", "seed"})


def _job_values(fields: dict[str, Any]) -> dict[str, Any]:
    """Update values for JobRow from JobRecord field names, refusing names that are not fields."""
    unknown = set(fields) - _JOB_FIELDS
    if unknown:
        raise TypeError(f"not job fields: {', '.join(sorted(unknown))}")
    if {"id", "tenant"} & set(fields):
        raise TypeError("a job's id and tenant never change")
    out = {}
    for k, v in fields.items():
        if k in _JOB_JSON_FIELDS:
            v = _finite(v)
            if k == "memory_breakdown" and v:
                v = {str(name): int(n) for name, n in v.items() if n is not None}
        elif k in _JOB_INT_FIELDS and isinstance(v, float):
            v = int(round(v)) if math.isfinite(v) else None
        out[_JOB_ATTR.get(k, k)] = v
    return out


def _rec(cls: Any, row: Any) -> Any:
    return cls(**{f: getattr(row, f) for f in cls.model_fields})


class Store(PoolTaskStore, FederationStore, ExportStore):
    """See the module docstring. Thread-safe; one per process is enough."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._listeners: list[Listener] = []
        # Held across an event's commit and its announcement, so listeners hear a job's events
        # in commit (seq) order even when several threads write them.
        self._event_lock = threading.Lock()
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write = sessionmaker(self.engine.execution_options(**{WRITE_OPTION: True}),
                                   expire_on_commit=False)
        migrate(self.engine)  # Alembic revisions up to head; see db.py

    def close(self) -> None:
        self.engine.dispose()

    # -- change feed ------------------------------------------------------------------------
    def add_listener(self, listener: Listener) -> None:
        """Call `listener(topic, item)` after each committed job event or status change. It
        runs on the writer's thread, so it must be quick and must not block."""
        self._listeners = [*self._listeners, listener]

    def remove_listener(self, listener: Listener) -> None:
        self._listeners = [fn for fn in self._listeners if fn is not listener]

    def _announce(self, topic: str, item: Any) -> None:
        for fn in self._listeners:
            try:
                fn(topic, item)
            except Exception:  # a listener's bug must not fail the write that is done
                log.exception("store listener failed")

    def _announce_status(self, job_id: str, fields: dict[str, Any]) -> None:
        status = fields.get("status")
        if status is not None and self._listeners:
            self._announce(f"job:{job_id}", JobStatusChange(job_id=job_id, status=status))

    @contextmanager
    def _tx(self, write: bool = True) -> Iterator[Session]:
        maker = self._write if write else self._read
        with maker() as session, session.begin():
            yield session

    # -- tenants and tokens -----------------------------------------------------------------
    @staticmethod
    def check_tenant_name(tenant: str) -> str:
        if not isinstance(tenant, str) or not TENANT_RE.match(tenant):
            raise ValueError(
                f"invalid tenant name {tenant!r}: 1-64 characters, letters, digits, '_', '.', "
                "'-', starting with a letter or digit")
        return tenant

    def ensure_tenant(self, tenant: str) -> None:
        self.check_tenant_name(tenant)
        with self._tx() as s:
            if s.scalar(select(Tenant).where(Tenant.name == tenant)) is None:
                s.add(Tenant(name=tenant, created_at=_now()))

    def list_tenants(self) -> list[str]:
        with self._tx(write=False) as s:
            return list(s.scalars(select(Tenant.name).order_by(Tenant.seq)))

    def create_token(self, tenant: str, *, admin: bool = False) -> str:
        """A new API token for `tenant` (created if new). Only its sha256 is stored. An admin
        token also opens /metrics and the all-tenants views."""
        self.check_tenant_name(tenant)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._tx() as s:
            if s.scalar(select(Tenant).where(Tenant.name == tenant)) is None:
                s.add(Tenant(name=tenant, created_at=_now()))
                s.flush()
            s.add(Token(tenant=tenant, token_sha256=_token_hash(token), prefix=token[:8],
                        created_at=_now(), is_admin=bool(admin)))
        return token

    def tenant_for_token(self, token: Optional[str]) -> Optional[str]:
        found = self.principal_for_token(token)
        return None if found is None else found[0]

    def principal_for_token(self, token: Optional[str]) -> Optional[tuple[str, bool]]:
        """(tenant, is_admin) of a known token, else None."""
        if not token or len(token) > 512:
            return None
        digest = _token_hash(token)
        with self._tx(write=False) as s:
            row = s.scalar(select(Token).where(Token.token_sha256 == digest))
            # The lookup is by hash (an index cannot be constant-time); the final comparison is.
            if row is None or not hmac.compare_digest(row.token_sha256, digest):
                return None
            return row.tenant, bool(row.is_admin)

    def revoke_tokens(self, tenant: str) -> int:
        with self._tx() as s:
            rows = list(s.scalars(select(Token).where(Token.tenant == tenant)))
            for r in rows:
                s.delete(r)
            return len(rows)

    # -- models -----------------------------------------------------------------------------
    def add_model(self, entry: ModelEntry) -> ModelEntry:
        """Register (or re-register, replacing) a base model under `entry.name`."""
        with self._tx() as s:
            row = s.scalar(select(ModelRow).where(ModelRow.name == entry.name))
            values = entry.model_dump()
            if row is None:
                s.add(ModelRow(**values))
            else:
                for k, v in values.items():
                    setattr(row, k, v)
        return entry

    def get_model(self, name: str) -> Optional[ModelEntry]:
        with self._tx(write=False) as s:
            row = s.scalar(select(ModelRow).where(ModelRow.name == name))
            return None if row is None else _rec(ModelEntry, row)

    def list_models(self) -> list[ModelEntry]:
        with self._tx(write=False) as s:
            rows = s.scalars(select(ModelRow).order_by(ModelRow.name))
            return [_rec(ModelEntry, r) for r in rows]

    def remove_model(self, name: str) -> bool:
        with self._tx() as s:
            row = s.scalar(select(ModelRow).where(ModelRow.name == name))
            if row is None:
                return False
            s.delete(row)
            return True

    # -- files ------------------------------------------------------------------------------
    def add_file(
        self,
        *,
        tenant: str,
        filename: str,
        bytes: int,
        sha256: str,
        artifact_id: str,
        purpose: str = "fine-tune",
        examples: Optional[int] = None,
        format: Optional[str] = None,
    ) -> FileRecord:
        row = FileRow(id=new_id("file"), tenant=tenant, filename=filename, bytes=bytes,
                      sha256=sha256, purpose=purpose, created_at=_now(), examples=examples,
                      format=format, artifact_id=artifact_id)
        with self._tx() as s:
            s.add(row)
            s.flush()
            return _rec(FileRecord, row)

    def get_file(self, file_id: str, tenant: Optional[str] = None) -> Optional[FileRecord]:
        """The file, or None when it does not exist or (with `tenant`) belongs to another."""
        with self._tx(write=False) as s:
            row = s.scalar(select(FileRow).where(FileRow.id == file_id))
            if row is None or (tenant is not None and row.tenant != tenant):
                return None
            return _rec(FileRecord, row)

    def list_files(
        self,
        tenant: str,
        *,
        purpose: Optional[str] = None,
        after: Optional[str] = None,
        limit: int = 10_000,
        order: Literal["asc", "desc"] = "desc",
    ) -> tuple[list[FileRecord], bool]:
        q = select(FileRow).where(FileRow.tenant == tenant)
        if purpose:
            q = q.where(FileRow.purpose == purpose)
        with self._tx(write=False) as s:
            q = self._after(s, q, FileRow, after, order, FileRow.tenant == tenant)
            rows = list(s.scalars(q.limit(limit + 1)))
            return [_rec(FileRecord, r) for r in rows[:limit]], len(rows) > limit

    def delete_file(self, file_id: str, tenant: Optional[str] = None) -> Optional[FileRecord]:
        """Remove the file's record; returns it, or None when there was none (for `tenant`)."""
        with self._tx() as s:
            row = s.scalar(select(FileRow).where(FileRow.id == file_id))
            if row is None or (tenant is not None and row.tenant != tenant):
                return None
            rec = _rec(FileRecord, row)
            s.delete(row)
            return rec

    def artifact_referenced(self, artifact_id: str) -> bool:
        """Whether any file, checkpoint or adapter still points at this object."""
        with self._tx(write=False) as s:
            for model, col in ((FileRow, FileRow.artifact_id),
                               (CheckpointRow, CheckpointRow.artifact_id),
                               (AdapterRow, AdapterRow.artifact_id)):
                if s.scalar(select(model.seq).where(col == artifact_id).limit(1)) is not None:
                    return True
        return False

    def active_jobs_using_file(self, file_id: str) -> list[str]:
        with self._tx(write=False) as s:
            q = select(JobRow.id).where(
                JobRow.status.in_(ACTIVE),
                (JobRow.training_file == file_id) | (JobRow.validation_file == file_id),
            ).order_by(JobRow.seq)
            return list(s.scalars(q))

    # -- jobs -------------------------------------------------------------------------------
    def create_job(self, record: JobRecord, *, event: Optional[str] = None,
                   event_data: Optional[dict[str, Any]] = None) -> JobRecord:
        """Insert the job, and its first event (`event`, with `event_data`) in the same
        transaction; with an idempotency key already used by its tenant, return the first job
        instead (compare ids to tell) and write no event."""
        values = _job_values({k: v for k, v in record.model_dump().items()
                              if k not in ("id", "tenant")})
        for attempt in range(2):
            try:
                first_event: Optional[EventRecord] = None
                with self._event_lock if event is not None else nullcontext():
                    with self._tx() as s:
                        if record.idempotency_key is not None:
                            first = s.scalar(select(JobRow).where(
                                JobRow.tenant == record.tenant,
                                JobRow.idempotency_key == record.idempotency_key))
                            if first is not None:
                                return _job_record(first)
                        row = JobRow(id=record.id, tenant=record.tenant, **values)
                        s.add(row)
                        s.flush()
                        created = _job_record(row)
                        if event is not None:
                            ev = EventRow(id=new_id("ftevent"), job_id=record.id,
                                          created_at=_now(), level="info", type="message",
                                          message=str(event),
                                          data=_finite(event_data) if event_data else None)
                            s.add(ev)
                            s.flush()
                            first_event = _rec(EventRecord, ev)
                    if first_event is not None:
                        self._announce(f"job:{record.id}", first_event)
                return created
            except IntegrityError:
                # Backends without BEGIN IMMEDIATE: a concurrent create with the same key won.
                if attempt or record.idempotency_key is None:
                    raise
        raise AssertionError("unreachable")

    def find_job_by_idempotency_key(self, tenant: str, key: str) -> Optional[JobRecord]:
        with self._tx(write=False) as s:
            row = s.scalar(select(JobRow).where(JobRow.tenant == tenant,
                                                JobRow.idempotency_key == key))
            return None if row is None else _job_record(row)

    def get_job(self, job_id: str, tenant: Optional[str] = None) -> Optional[JobRecord]:
        with self._tx(write=False) as s:
            row = s.scalar(select(JobRow).where(JobRow.id == job_id))
            if row is None or (tenant is not None and row.tenant != tenant):
                return None
            return _job_record(row)

    def list_jobs(
        self, tenant: str, after: Optional[str] = None, limit: int = 20,
        *, metadata: Optional[dict[str, str]] = None,
    ) -> tuple[list[JobRecord], bool]:
        """The tenant's jobs, newest first, those after the cursor `after`; (page, has_more)."""
        q = select(JobRow).where(JobRow.tenant == tenant)
        with self._tx(write=False) as s:
            q = self._after(s, q, JobRow, after, "desc", JobRow.tenant == tenant)
            if not metadata:
                rows = list(s.scalars(q.limit(limit + 1)))
            else:
                # JSON queries differ per backend; the filter is applied here instead.
                rows = []
                for r in s.scalars(q):
                    if all((r.metadata_ or {}).get(k) == v for k, v in metadata.items()):
                        rows.append(r)
                        if len(rows) > limit:
                            break
            return [_job_record(r) for r in rows[:limit]], len(rows) > limit

    def jobs_in_status(self, *statuses: str) -> list[JobRecord]:
        """Every job in one of `statuses`, oldest first."""
        with self._tx(write=False) as s:
            q = select(JobRow).where(JobRow.status.in_(statuses)).order_by(JobRow.seq)
            return [_job_record(r) for r in s.scalars(q)]

    def update_job(self, job_id: str, **fields: Any) -> JobRecord:
        values = _job_values(fields)
        with self._tx() as s:
            row = s.scalar(select(JobRow).where(JobRow.id == job_id))
            if row is None:
                raise NotFound(f"no job {job_id}")
            for k, v in values.items():
                setattr(row, k, v)
            s.flush()
            rec = _job_record(row)
        self._announce_status(job_id, fields)
        return rec

    def transition(self, job_id: str, from_statuses: Iterable[str], to_status: str, *,
                   event: Optional[str] = None, **fields: Any) -> bool:
        """Atomically move the job to `to_status` (setting `fields`) if its status is one of
        `from_statuses`; False when it was not (someone else moved it first). With `event`,
        the job's event of that message is written in the same transaction, only if it moved."""
        values = _job_values(fields)
        values["status"] = to_status
        added: Optional[EventRecord] = None
        with self._event_lock if event is not None else nullcontext():
            with self._tx() as s:
                result = s.execute(
                    update(JobRow)
                    .where(JobRow.id == job_id, JobRow.status.in_(list(from_statuses)))
                    .values(**values)
                    .execution_options(synchronize_session=False)
                )
                moved = result.rowcount == 1
                if moved and event is not None:
                    row = EventRow(id=new_id("ftevent"), job_id=job_id, created_at=_now(),
                                   level="info", type="message", message=str(event))
                    s.add(row)
                    s.flush()
                    added = _rec(EventRecord, row)
            if moved:
                self._announce_status(job_id, {"status": to_status})
            if added is not None:
                self._announce(f"job:{job_id}", added)
        return moved

    def request_cancel(self, job_id: str) -> JobRecord:
        return self.update_job(job_id, cancel_requested=True)

    # -- events -----------------------------------------------------------------------------
    def add_event(
        self,
        job_id: str,
        message: str,
        *,
        level: Literal["info", "warn", "error"] = "info",
        type: Literal["message", "metrics"] = "message",
        data: Optional[dict[str, Any]] = None,
    ) -> EventRecord:
        if level not in ("info", "warn", "error"):
            raise ValueError(f"event level must be info, warn or error, not {level!r}")
        if type not in ("message", "metrics"):
            raise ValueError(f"event type must be message or metrics, not {type!r}")
        row = EventRow(id=new_id("ftevent"), job_id=job_id, created_at=_now(), level=level,
                       type=type, message=str(message), data=_finite(data) if data else None)
        with self._event_lock:
            with self._tx() as s:
                s.add(row)
                s.flush()
                rec = _rec(EventRecord, row)
            self._announce(f"job:{job_id}", rec)
        return rec

    def list_events(
        self,
        job_id: str,
        *,
        after: Optional[str] = None,
        limit: int = 20,
        order: Literal["asc", "desc"] = "desc",
    ) -> list[EventRecord]:
        """Events of a job in `order`; with `after` (an event id) only those that come after
        it in that order — older ones for desc (pagination), newer ones for asc (following)."""
        q = select(EventRow).where(EventRow.job_id == job_id)
        with self._tx(write=False) as s:
            q = self._after(s, q, EventRow, after, order, EventRow.job_id == job_id)
            return [_rec(EventRecord, r) for r in s.scalars(q.limit(limit))]

    def events_for_follower(self, job_id: str, *, after: Optional[str] = None,
                            after_seq: Optional[int] = None, limit: int = 500,
                            ) -> tuple[int, list[EventRecord]]:
        """A follower's catch-up read: events of the job after the event `after` (or after
        position `after_seq`), oldest first, and the position they follow (0: the start).
        Raises NotFound for an `after` that is not an event of this job."""
        with self._tx(write=False) as s:
            seq = after_seq or 0
            if after is not None:
                found = s.scalar(select(EventRow.seq).where(EventRow.id == after,
                                                            EventRow.job_id == job_id))
                if found is None:
                    raise NotFound(f"no such event to follow after: {after!r}")
                seq = found
            q = (select(EventRow).where(EventRow.job_id == job_id, EventRow.seq > seq)
                 .order_by(EventRow.seq.asc()).limit(limit))
            return seq, [_rec(EventRecord, r) for r in s.scalars(q)]

    # -- checkpoints ------------------------------------------------------------------------
    def add_checkpoint(self, job_id: str, step: int, artifact_id: str,
                       metrics: Optional[dict[str, Any]] = None) -> CheckpointRecord:
        row = CheckpointRow(id=new_id("ftckpt"), job_id=job_id, step=int(step),
                            artifact_id=artifact_id, metrics=_finite(dict(metrics or {})),
                            created_at=_now())
        with self._tx() as s:
            s.add(row)
            s.flush()
            return _rec(CheckpointRecord, row)

    def list_checkpoints(self, job_id: str) -> list[CheckpointRecord]:
        """The job's checkpoints, oldest first."""
        with self._tx(write=False) as s:
            q = select(CheckpointRow).where(CheckpointRow.job_id == job_id).order_by(
                CheckpointRow.seq)
            return [_rec(CheckpointRecord, r) for r in s.scalars(q)]

    def get_checkpoint(self, checkpoint_id: str) -> Optional[CheckpointRecord]:
        with self._tx(write=False) as s:
            row = s.scalar(select(CheckpointRow).where(CheckpointRow.id == checkpoint_id))
            return None if row is None else _rec(CheckpointRecord, row)

    # -- adapters ---------------------------------------------------------------------------
    def add_adapter(
        self,
        tenant: str,
        base_model: str,
        base_model_sha256: Optional[str],
        job_id: Optional[str],
        artifact_id: str,
        bytes: int,
        sha256: Optional[str],
        metrics: Optional[dict[str, Any]] = None,
    ) -> AdapterRecord:
        row = AdapterRow(id=new_id("ft-adapter"), tenant=tenant, base_model=base_model,
                         base_model_sha256=base_model_sha256, job_id=job_id,
                         artifact_id=artifact_id, bytes=int(bytes), sha256=sha256,
                         metrics=_finite(dict(metrics or {})), created_at=_now())
        with self._tx() as s:
            s.add(row)
            s.flush()
            return _rec(AdapterRecord, row)

    def get_adapter(self, adapter_id: str, tenant: Optional[str] = None) -> Optional[AdapterRecord]:
        """The adapter, or None when missing or (with `tenant`) not the tenant's own."""
        with self._tx(write=False) as s:
            row = s.scalar(select(AdapterRow).where(AdapterRow.id == adapter_id))
            if row is None or (tenant is not None and row.tenant != tenant):
                return None
            return _rec(AdapterRecord, row)

    def list_adapters(self, tenant: str, *, after: Optional[str] = None,
                      limit: int = 10_000) -> tuple[list[AdapterRecord], bool]:
        q = select(AdapterRow).where(AdapterRow.tenant == tenant)
        with self._tx(write=False) as s:
            q = self._after(s, q, AdapterRow, after, "desc", AdapterRow.tenant == tenant)
            rows = list(s.scalars(q.limit(limit + 1)))
            return [_rec(AdapterRecord, r) for r in rows[:limit]], len(rows) > limit

    # -- helpers ----------------------------------------------------------------------------
    @staticmethod
    def _after(s: Session, q: Any, model: Any, after: Optional[str], order: str,
               scope: Any) -> Any:
        """Order `q` by seq and, with a cursor, keep what comes after that row. A cursor out of
        `scope` (another tenant's, another job's) is refused like an unknown one."""
        if order not in ("asc", "desc"):
            raise ValueError(f"order must be asc or desc, not {order!r}")
        q = q.order_by(model.seq.desc() if order == "desc" else model.seq.asc())
        if after is None:
            return q
        seq = s.scalar(select(model.seq).where(model.id == after, scope))
        if seq is None:
            raise NotFound(f"no such item to page after: {after!r}")
        return q.where(model.seq < seq if order == "desc" else model.seq > seq)
