"""/v1/merges: merge adapters on the pool (create, list, get).

Create refuses everything it can before storing anything: adapters the caller may not use (404,
as for ids that do not exist), adapters of different base models (by hash), incompatible
target modules, shapes or ranks, bad parameters — each a 4xx naming the field. Those checks
read only the adapters' headers (`merge.preflight`); the merge itself runs as a pool task
(`pool.task_queue`) that produces a new adapter owned by the caller. An `Idempotency-Key`
makes a retried create return the first merge.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Optional

from fastapi import APIRouter, Body, Depends, Header
from pydantic import BaseModel, ConfigDict, Field

from lorapool.types import ListResponse, Merge

from ..merge import MergeError
from ..merge.preflight import (
    AdapterHeader,
    MergeRequestError,
    check_merge_request,
    read_safetensors_shapes,
)
from ..store import AdapterRecord, MergeRecord, new_id
from .access import merge_resource, require_tasks, visible_adapter
from .context import AppContext, context, tenant
from .errors import APIError, bad_request
from .evaluation_request import EvaluationParams, check_eval_file, resolve_eval_params
from .idempotency import checked_idempotency_key
from .task_routes import TaskPage, owned_task, queue_task

router = APIRouter(prefix="/v1/merges", tags=["merges"])

MAX_ADAPTERS = 16
AdapterId = Annotated[str, Field(min_length=1, max_length=64)]


class CreateMergeRequest(BaseModel):
    """The body of POST /v1/merges (the merge library's arguments, by peft's names)."""

    model_config = ConfigDict(extra="forbid")

    adapters: list[AdapterId] = Field(min_length=1, max_length=MAX_ADAPTERS)
    method: str = Field(min_length=1, max_length=32,
                        description="naive, exact, svd, ties, dare_linear, dare_ties, "
                        "magnitude_prune, or a *_svd variant of the last four")
    weights: Optional[list[float]] = Field(
        None, max_length=MAX_ADAPTERS,
        description="one per adapter; default: their training-sample counts (FedAvg)")
    normalize_weights: bool = True
    density: Optional[float] = Field(None, description="ties/dare/magnitude_prune: (0, 1]")
    majority_sign_method: Literal["total", "frequency"] = "total"
    target_rank: Optional[int] = Field(None, ge=1, le=4096,
                                       description="svd and *_svd: default the largest rank")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="dare: the random drops' seed")
    name: Optional[str] = Field(None, min_length=1, max_length=128)
    suffix: Optional[str] = Field(None, min_length=1, max_length=64,
                                  pattern=r"^[A-Za-z0-9_.-]+$")
    evaluate_on: Optional[str] = Field(None, min_length=1, max_length=64,
                                       description="a file id: evaluate the result on it")
    evaluation: Optional[EvaluationParams] = Field(
        None, description="how to evaluate with evaluate_on (default: as the inputs trained)")


def _read_json(ctx: AppContext, manifest: dict[str, Any], name: str, label: str) -> dict:
    if name not in manifest:
        raise MergeError(f"{label}: the stored adapter has no {name}")
    try:
        data = json.loads(ctx.artifacts.read_bytes(manifest[name][0]))
    except (ValueError, UnicodeDecodeError) as exc:
        raise MergeError(f"{label}: its {name} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MergeError(f"{label}: its {name} is not a JSON object")
    return data


def _header(ctx: AppContext, rec: AdapterRecord) -> AdapterHeader:
    """Config, metadata and tensor shapes of a stored adapter (its header bytes only)."""
    manifest = ctx.artifacts.manifest(rec.artifact_id)
    if "adapter_model.safetensors" not in manifest:
        raise MergeError(f"{rec.id}: the stored adapter has no adapter_model.safetensors")
    with ctx.artifacts.open(manifest["adapter_model.safetensors"][0]) as fh:
        shapes = read_safetensors_shapes(fh)
    return AdapterHeader(label=rec.id,
                         config=_read_json(ctx, manifest, "adapter_config.json", rec.id),
                         metadata=_read_json(ctx, manifest, "lorapool.json", rec.id),
                         shapes=shapes)


def _same_base(recs: list[AdapterRecord]) -> None:
    first = recs[0]
    for rec in recs[1:]:
        if rec.base_model_sha256 != first.base_model_sha256:
            raise APIError(400, f"Adapters are for different base models: {first.id} "
                           f"({first.base_model}, sha256 {str(first.base_model_sha256)[:12]}…) "
                           f"vs {rec.id} ({rec.base_model}, sha256 "
                           f"{str(rec.base_model_sha256)[:12]}…)",
                           param="adapters", code="incompatible_adapters")


def _preflight(ctx: AppContext, req: CreateMergeRequest, recs: list[AdapterRecord]) -> None:
    try:
        check_merge_request([_header(ctx, r) for r in recs], req.method, weights=req.weights,
                            target_rank=req.target_rank, density=req.density,
                            majority_sign=req.majority_sign_method,
                            normalize_weights=req.normalize_weights)
    except MergeRequestError as exc:
        param = exc.param
        if param == "majority_sign":
            param = "majority_sign_method"
        message = str(exc).replace("majority_sign:", "majority_sign_method:")
        raise bad_request(f"Invalid merge request: {message}", param=param) from exc
    except MergeError as exc:  # the adapters themselves do not go together
        raise APIError(400, f"Cannot merge these adapters: {exc}", param="adapters",
                       code="incompatible_adapters") from exc


@router.post("", response_model=Merge)
def create_merge(
    req: CreateMergeRequest = Body(...),
    idempotency_key: Optional[str] = Header(None, alias="Idempotency-Key"),
    owner: str = Depends(tenant),
    ctx: AppContext = Depends(context),
) -> Any:
    require_tasks(ctx, "merges")
    idempotency_key = checked_idempotency_key(idempotency_key)
    recs = [visible_adapter(ctx, a, owner, param=f"adapters[{i}]")
            for i, a in enumerate(req.adapters)]
    _same_base(recs)
    _preflight(ctx, req, recs)
    params: dict[str, Any] = {"normalize_weights": req.normalize_weights,
                              "majority_sign": req.majority_sign_method, "seed": req.seed}
    if req.density is not None:
        params["density"] = req.density
    if req.target_rank is not None:
        params["target_rank"] = req.target_rank
    if req.evaluate_on is not None:
        check_eval_file(ctx, owner, req.evaluate_on, "evaluate_on")
        params["evaluation"] = resolve_eval_params(ctx, req.evaluation, recs[0])
    elif req.evaluation is not None:
        raise bad_request("'evaluation' applies only with 'evaluate_on'", param="evaluation")
    record = MergeRecord(id=new_id("merge"), tenant=owner, method=req.method,
                         adapters=list(req.adapters), weights=req.weights, params=params,
                         name=req.name, suffix=req.suffix, evaluate_on=req.evaluate_on,
                         idempotency_key=idempotency_key)
    return queue_task(ctx, "merge", record, merge_resource)


@router.get("", response_model=ListResponse[Merge])
def list_merges(page: TaskPage = Depends()) -> Any:
    return page.of("merge", merge_resource)


@router.get("/{merge_id}", response_model=Merge)
def get_merge(merge_id: str, owner: str = Depends(tenant),
              ctx: AppContext = Depends(context)) -> Any:
    return owned_task(ctx, "merge", merge_id, owner, merge_resource)
