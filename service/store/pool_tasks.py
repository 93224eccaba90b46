"""The store's side of sharing, merges and evaluations, mixed into `Store`.

Kept apart from `store.py` so the tables of issue 6 read as one unit. The same rules hold as
for jobs: every method is one transaction, returns detached records, and status changes that
may race (the pool finishing a merge while the service restarts) go through a compare-and-set.

Visibility: a tenant sees an adapter it owns or one shared with it (`get_visible_adapter`);
everything else answers None, exactly like an id that does not exist.
"""

from __future__ import annotations

import math
import time
from typing import Any, Iterable, Optional, Union

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError

from .records import AdapterRecord, EvaluationRecord, MergeRecord
from .schema import AdapterRow, AdapterShareRow, EvaluationRow, MergeRow

TaskRecord = Union[MergeRecord, EvaluationRecord]

# kind → (row class, record class)
_KINDS: dict[str, tuple[Any, Any]] = {
    "merge": (MergeRow, MergeRecord),
    "evaluation": (EvaluationRow, EvaluationRecord),
}
_FLOAT_FIELDS = frozenset({"relative_error", "deviation_from_exact", "loss", "perplexity"})


def _clean(fields: dict[str, Any]) -> dict[str, Any]:
    # JSON and SQL floats have no NaN/inf: a diverged loss is stored as null.
    return {k: (None if k in _FLOAT_FIELDS and isinstance(v, float) and not math.isfinite(v)
                else v) for k, v in fields.items()}


def _record(cls: Any, row: Any) -> Any:
    return cls(**{f: getattr(row, f) for f in cls.model_fields})


class PoolTaskStore:
    """Mixin for `Store` (which provides `_tx` and `_after`)."""

    # -- sharing ----------------------------------------------------------------------------
    def share_adapter(self, adapter_id: str, tenant: str) -> bool:
        """Let `tenant` use the adapter; False when it already could (no change)."""
        try:
            with self._tx() as s:  # type: ignore[attr-defined]
                exists = s.scalar(select(AdapterShareRow.seq).where(
                    AdapterShareRow.adapter_id == adapter_id, AdapterShareRow.tenant == tenant))
                if exists is not None:
                    return False
                s.add(AdapterShareRow(adapter_id=adapter_id, tenant=tenant,
                                      created_at=int(time.time())))
                return True
        except IntegrityError:  # a concurrent identical share won
            return False

    def unshare_adapter(self, adapter_id: str, tenant: str) -> bool:
        """Revoke `tenant`'s use of the adapter; False when it had none."""
        with self._tx() as s:  # type: ignore[attr-defined]
            rows = list(s.scalars(select(AdapterShareRow).where(
                AdapterShareRow.adapter_id == adapter_id, AdapterShareRow.tenant == tenant)))
            for r in rows:
                s.delete(r)
            return bool(rows)

    def adapter_shares(self, adapter_id: str) -> list[str]:
        """The tenants the adapter is shared with, in the order they were added."""
        with self._tx(write=False) as s:  # type: ignore[attr-defined]
            q = select(AdapterShareRow.tenant).where(
                AdapterShareRow.adapter_id == adapter_id).order_by(AdapterShareRow.seq)
            return list(s.scalars(q))

    def get_visible_adapter(self, adapter_id: str, tenant: str) -> Optional[AdapterRecord]:
        """The adapter when `tenant` owns it or it is shared with `tenant`, else None."""
        with self._tx(write=False) as s:  # type: ignore[attr-defined]
            row = s.scalar(select(AdapterRow).where(AdapterRow.id == adapter_id))
            if row is None:
                return None
            if row.tenant != tenant and s.scalar(select(AdapterShareRow.seq).where(
                    AdapterShareRow.adapter_id == adapter_id,
                    AdapterShareRow.tenant == tenant)) is None:
                return None
            return _record(AdapterRecord, row)

    def list_visible_adapters(self, tenant: str, *, after: Optional[str] = None,
                              limit: int = 10_000) -> tuple[list[AdapterRecord], bool]:
        """The tenant's own adapters and those shared with it, newest first."""
        shared = select(AdapterShareRow.adapter_id).where(AdapterShareRow.tenant == tenant)
        scope = or_(AdapterRow.tenant == tenant, AdapterRow.id.in_(shared))
        with self._tx(write=False) as s:  # type: ignore[attr-defined]
            q = self._after(s, select(AdapterRow).where(scope), AdapterRow,  # type: ignore
                            after, "desc", scope)
            rows = list(s.scalars(q.limit(limit + 1)))
            return [_record(AdapterRecord, r) for r in rows[:limit]], len(rows) > limit

    # -- merges and evaluations -------------------------------------------------------------
    def create_task(self, kind: str, record: TaskRecord) -> TaskRecord:
        """Insert a merge or evaluation; with an idempotency key its tenant already used,
        return the first record instead (compare ids to tell)."""
        row_cls, rec_cls = _KINDS[kind]
        values = _clean(record.model_dump())
        for attempt in range(2):
            try:
                with self._tx() as s:  # type: ignore[attr-defined]
                    if record.idempotency_key is not None:
                        first = s.scalar(select(row_cls).where(
                            row_cls.tenant == record.tenant,
                            row_cls.idempotency_key == record.idempotency_key))
                        if first is not None:
                            return _record(rec_cls, first)
                    row = row_cls(**values)
                    s.add(row)
                    s.flush()
                    return _record(rec_cls, row)
            except IntegrityError:
                if attempt or record.idempotency_key is None:
                    raise
        raise AssertionError("unreachable")

    def get_task(self, kind: str, task_id: str,
                 tenant: Optional[str] = None) -> Optional[TaskRecord]:
        """The record, or None when missing or (with `tenant`) another tenant's."""
        row_cls, rec_cls = _KINDS[kind]
        with self._tx(write=False) as s:  # type: ignore[attr-defined]
            row = s.scalar(select(row_cls).where(row_cls.id == task_id))
            if row is None or (tenant is not None and row.tenant != tenant):
                return None
            return _record(rec_cls, row)

    def list_tasks(self, kind: str, tenant: str, *, after: Optional[str] = None,
                   limit: int = 20) -> tuple[list[TaskRecord], bool]:
        """The tenant's records, newest first, after the cursor `after`; (page, has_more)."""
        row_cls, rec_cls = _KINDS[kind]
        scope = row_cls.tenant == tenant
        with self._tx(write=False) as s:  # type: ignore[attr-defined]
            q = self._after(s, select(row_cls).where(scope), row_cls,  # type: ignore
                            after, "desc", scope)
            rows = list(s.scalars(q.limit(limit + 1)))
            return [_record(rec_cls, r) for r in rows[:limit]], len(rows) > limit

    def tasks_in_status(self, kind: str, *statuses: str) -> list[TaskRecord]:
        """Every record in one of `statuses`, oldest first."""
        row_cls, rec_cls = _KINDS[kind]
        with self._tx(write=False) as s:  # type: ignore[attr-defined]
            q = select(row_cls).where(row_cls.status.in_(statuses)).order_by(row_cls.seq)
            return [_record(rec_cls, r) for r in s.scalars(q)]

    def transition_task(self, kind: str, task_id: str, from_statuses: Iterable[str],
                        to_status: str, **fields: Any) -> bool:
        """Atomically set status `to_status` (and `fields`) if the status is one of
        `from_statuses`; False when it was not."""
        row_cls, rec_cls = _KINDS[kind]
        unknown = set(fields) - set(rec_cls.model_fields)
        if unknown or {"id", "tenant"} & set(fields):
            raise TypeError(f"cannot set {sorted(unknown | ({'id', 'tenant'} & set(fields)))}")
        values = _clean(fields)
        values["status"] = to_status
        with self._tx() as s:  # type: ignore[attr-defined]
            result = s.execute(
                update(row_cls)
                .where(row_cls.id == task_id, row_cls.status.in_(list(from_statuses)))
                .values(**values)
                .execution_options(synchronize_session=False))
            return result.rowcount == 1

    def merge_for_adapter(self, adapter_id: str) -> Optional[MergeRecord]:
        """The merge that produced adapter `adapter_id`, if one did."""
        with self._tx(write=False) as s:  # type: ignore[attr-defined]
            row = s.scalar(select(MergeRow).where(MergeRow.result_adapter == adapter_id))
            return None if row is None else _record(MergeRecord, row)
