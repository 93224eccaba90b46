"""Who may use an adapter, and the REST views of adapters, merges and evaluations.

A tenant may use (get, download, merge, evaluate) an adapter it owns or one its owner shared
with it; for anything else the answer is the 404 of an id that does not exist, so a tenant
cannot probe for other tenants' adapters. Only the owner sees whom an adapter is shared with.
"""

from __future__ import annotations

from typing import Any, Optional

from lorapool.types import Adapter, Evaluation, JobError, Merge

from ..store import AdapterRecord, EvaluationRecord, MergeRecord
from . import convert
from .context import AppContext
from .errors import APIError, not_found


def visible_adapter(ctx: AppContext, adapter_id: str, tenant: str,
                    param: Optional[str] = None) -> AdapterRecord:
    """The adapter if `tenant` owns it or it is shared with `tenant`, else a 404."""
    rec = ctx.store.get_visible_adapter(adapter_id, tenant)
    if rec is None:
        raise not_found("adapter", adapter_id, param=param)
    return rec


def require_tasks(ctx: AppContext, what: str) -> None:
    if ctx.tasks is None:
        raise APIError(503, f"This server runs no pool tasks, so it cannot run {what}",
                       code="pool_unavailable")


def adapter_resource(ctx: AppContext, rec: AdapterRecord, viewer: str) -> Adapter:
    merge = ctx.store.merge_for_adapter(rec.id)
    update: dict[str, Any] = {"owner": rec.tenant,
                              "merge_id": merge.id if merge is not None else None,
                              "name": merge.name if merge is not None else None}
    if viewer == rec.tenant:  # other recipients are none of a recipient's business
        update["shared_with"] = ctx.store.adapter_shares(rec.id)
    return convert.adapter(rec).model_copy(update=update)


def _error(rec: Any) -> Optional[JobError]:
    if not (rec.error_code or rec.error_message):
        return None
    return JobError(code=rec.error_code or "error", message=rec.error_message or "",
                    param=rec.error_param)


def merge_resource(rec: MergeRecord) -> Merge:
    return Merge(
        id=rec.id, created_at=rec.created_at, started_at=rec.started_at,
        finished_at=rec.finished_at, status=rec.status,  # type: ignore[arg-type]
        adapters=list(rec.adapters), method=rec.method, weights=rec.weights,
        applied_weights=rec.applied_weights,
        params={k: v for k, v in rec.params.items() if k != "evaluation"},
        name=rec.name, suffix=rec.suffix, evaluate_on=rec.evaluate_on,
        result_adapter=rec.result_adapter, rank=rec.rank, relative_error=rec.relative_error,
        deviation_from_exact=rec.deviation_from_exact, evaluation_id=rec.evaluation_id,
        node=rec.node, error=_error(rec))


def evaluation_resource(rec: EvaluationRecord) -> Evaluation:
    return Evaluation(
        id=rec.id, created_at=rec.created_at, started_at=rec.started_at,
        finished_at=rec.finished_at, status=rec.status,  # type: ignore[arg-type]
        model=rec.model, adapter=rec.adapter_id, file=rec.file_id, params=dict(rec.params),
        merge_id=rec.merge_id, loss=rec.loss, perplexity=rec.perplexity, tokens=rec.tokens,
        examples=rec.examples, node=rec.node, error=_error(rec))
