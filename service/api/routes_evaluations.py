"""/v1/evaluations: held-out loss and perplexity of a base model, alone or with an adapter, on
an uploaded file (create, list, get).

The evaluation runs as a pool task on CPU (`pool.task_queue`). Create checks first: the model
is registered, the adapter is the caller's or shared with it (404 otherwise), both are of the
same base model (by hash), and the file is the caller's own.
"""

from __future__ import annotations

from typing import Any, Optional

from fastapi import APIRouter, Body, Depends, Header
from pydantic import Field

from lorapool.types import Evaluation, ListResponse

from ..store import EvaluationRecord, new_id
from .access import evaluation_resource, require_tasks, visible_adapter
from .context import AppContext, context, tenant
from .errors import bad_request
from .evaluation_request import EvaluationParams, check_eval_file, resolve_eval_params
from .idempotency import checked_idempotency_key
from .task_routes import TaskPage, owned_task, queue_task

router = APIRouter(prefix="/v1/evaluations", tags=["evaluations"])



class CreateEvaluationRequest(EvaluationParams):
    model: Optional[str] = Field(None, min_length=1, max_length=128,
                                 description="base model; default: the adapter's")
    adapter: Optional[str] = Field(None, min_length=1, max_length=64,
                                   description="omit to evaluate the base model alone")
    file: str = Field(min_length=1, max_length=64, description="an uploaded file id")


def _model(ctx: AppContext, req: CreateEvaluationRequest, adapter: Any) -> Any:
    name = req.model or (adapter.base_model if adapter is not None else None)
    if name is None:
        raise bad_request("Missing required parameter: 'model' (or give 'adapter', whose base "
                          "model is then used)", param="model",
                          code="missing_required_parameter")
    model = ctx.store.get_model(name)
    if model is None:
        names = [m.name for m in ctx.store.list_models()]
        what = "the adapter's base model" if req.model is None else "model"
        raise bad_request(f"Unknown {what} '{name}'. Available models: {', '.join(names)}",
                          param="model" if req.model else "adapter", code="model_not_found")
    if adapter is not None and adapter.base_model_sha256 and \
            adapter.base_model_sha256 != model.sha256:
        raise bad_request(
            f"Adapter '{adapter.id}' was trained on a different base model ({adapter.base_model},"
            f" sha256 {adapter.base_model_sha256[:12]}…) than '{model.name}' (sha256 "
            f"{model.sha256[:12]}…)", param="adapter", code="incompatible_adapters")
    return model


@router.post("", response_model=Evaluation)
def create_evaluation(
    req: CreateEvaluationRequest = Body(...),
    idempotency_key: Optional[str] = Header(None, alias="Idempotency-Key"),
    owner: str = Depends(tenant),
    ctx: AppContext = Depends(context),
) -> Any:
    require_tasks(ctx, "evaluations")
    idempotency_key = checked_idempotency_key(idempotency_key)
    adapter = visible_adapter(ctx, req.adapter, owner, param="adapter") if req.adapter else None
    model = _model(ctx, req, adapter)
    check_eval_file(ctx, owner, req.file, "file")
    params = resolve_eval_params(ctx, req, adapter)
    record = EvaluationRecord(id=new_id("eval"), tenant=owner, model=model.name,
                              model_sha256=model.sha256, adapter_id=req.adapter,
                              file_id=req.file, params=params, idempotency_key=idempotency_key)
    return queue_task(ctx, "evaluation", record, evaluation_resource)


@router.get("", response_model=ListResponse[Evaluation])
def list_evaluations(page: TaskPage = Depends()) -> Any:
    return page.of("evaluation", evaluation_resource)


@router.get("/{evaluation_id}", response_model=Evaluation)
def get_evaluation(evaluation_id: str, owner: str = Depends(tenant),
                   ctx: AppContext = Depends(context)) -> Any:
    return owned_task(ctx, "evaluation", evaluation_id, owner, evaluation_resource)
