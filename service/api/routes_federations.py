"""/v1/federations: federated rounds across participants whose data stay where they are.

POST checks everything before storing: the model, each participant's data (an uploaded file of
the caller's own, or a node-local data set some node offers and validated), that each
participant's job fits some node (its data set's node, when pinned), the aggregation method
and its parameters, weights, quorum and deadline. The federation is then stored `running`; the
driver (service/pool/federation.py) runs its rounds as ordinary pool jobs.

Who sees what: the creator owns the federation, its jobs and its global adapters; tenants named
as participants may read the federation (GET by id). Uploaded files are private to their
tenant, so another tenant takes part through a node-local data set (on its own machine).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

from fastapi import APIRouter, Body, Depends, Query
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lorapool.types import (
    Federation,
    FederationParticipant,
    FederationRound,
    JobError,
    ListResponse,
    LoraParams,
)

from ..merge.errors import MergeError
from ..merge.federation import check_method
from ..store import NotFound, new_id
from ..store.federations import FederationRecord
from ..train.spec import TrainSpec
from . import convert
from .context import AppContext, context, tenant
from .errors import APIError, bad_request, from_pydantic, not_found
from .job_request import CreateJobRequest, HyperparametersIn, resolve
from .local_data import check_dataset, check_init_adapter

router = APIRouter(prefix="/v1/federations", tags=["federations"])

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class ParticipantIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Optional[str] = Field(None, pattern=NAME_PATTERN)
    tenant: Optional[str] = Field(None, min_length=1, max_length=64)
    training_file: Optional[str] = Field(None, min_length=1, max_length=64)
    dataset: Optional[Union[str, dict[str, str]]] = None
    weight: Optional[float] = Field(None, ge=0)


class CreateFederationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=128)
    participants: list[ParticipantIn] = Field(min_length=1, max_length=64)
    rounds: int = Field(ge=1, le=1000)
    local_steps: Optional[int] = Field(None, ge=1, le=1_000_000)
    local_epochs: Optional[int] = Field(None, ge=1, le=100)
    method: str = "exact"
    params: dict[str, Any] = Field(default_factory=dict)
    min_quorum: Optional[int] = Field(None, ge=1)
    round_deadline_s: float = Field(3600.0, gt=0, le=7 * 86400)
    init_adapter: Optional[str] = Field(None, min_length=1, max_length=64)
    # The participants' local training (as for a job).
    batch_size: Optional[int] = Field(None, ge=1, le=1024)
    micro_batch_size: Optional[int] = Field(None, ge=1, le=1024)
    learning_rate: Optional[float] = Field(None, gt=0, le=1.0)
    lora: Optional[LoraParams] = None
    quantization: str = "nf4"
    max_seq_len: int = Field(1024, ge=8, le=32768)
    seed: Optional[int] = Field(None, ge=0, le=2**31 - 1)


def _spec(req: CreateFederationRequest, model: Any) -> tuple[TrainSpec, dict[str, Any]]:
    if (req.local_steps is None) == (req.local_epochs is None):
        raise bad_request("give exactly one of 'local_steps' (optimizer steps per round) or "
                          "'local_epochs' (passes over each participant's data per round)",
                          param="local_steps")
    try:
        job_req = CreateJobRequest(
            model=req.model,
            hyperparameters=HyperparametersIn(n_epochs=req.local_epochs or 1,
                                              batch_size=req.batch_size or "auto"),
            lora=req.lora, quantization=req.quantization, max_seq_len=req.max_seq_len,
            micro_batch_size=req.micro_batch_size, learning_rate=req.learning_rate,
            seed=req.seed)
    except ValidationError as exc:
        raise from_pydantic(exc, {"hyperparameters.n_epochs": "local_epochs",
                                  "hyperparameters.batch_size": "batch_size"}) from exc
    spec, hyper = resolve(job_req, model)
    if req.local_steps is not None:
        spec = spec.model_copy(update={"max_steps": req.local_steps})
    return spec, hyper


def _participants(ctx: AppContext, owner: str, req: CreateFederationRequest,
                  spec: TrainSpec) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    tenants = set(ctx.store.list_tenants())
    weighted = [p.weight is not None for p in req.participants]
    for i, p in enumerate(req.participants):
        at = f"participants[{i}]"
        if (p.training_file is None) == (p.dataset is None):
            raise bad_request(f"{at}: give exactly one of 'training_file' or 'dataset' "
                              "('NODE:NAME', a node-local data set)", param=at)
        who = p.tenant or owner
        if who not in tenants:
            raise bad_request(f"{at}.tenant: no tenant named '{who}'", param=f"{at}.tenant")
        entry: dict[str, Any] = {"tenant": who}
        if p.training_file is not None:
            rec = ctx.store.get_file(p.training_file, owner)
            if who != owner or rec is None or rec.purpose != "fine-tune":
                why = ("uploaded files are private to their tenant: another tenant takes part "
                       "with a node-local data set on its own machine" if who != owner else
                       "no fine-tune file of yours with this id")
                raise bad_request(f"{at}.training_file: '{p.training_file}': {why}",
                                  param=f"{at}.training_file", code="file_not_found")
            entry.update(training_file=rec.id, examples=rec.examples)
            default_name = who if who != owner else f"file-{i + 1}"
        else:
            ds = check_dataset(ctx, p.dataset, f"{at}.dataset", who)
            entry.update(dataset=ds, examples=ds["examples"])
            default_name = ds["name"]
        entry["name"] = p.name or default_name
        if any(weighted) and p.weight is None:
            raise bad_request(f"{at}.weight: give a weight for every participant or for none "
                              "(none: each participant's example count, FedAvg)",
                              param=f"{at}.weight")
        if p.weight is not None:
            if not math.isfinite(p.weight):
                raise bad_request(f"{at}.weight: must be a finite number", param=f"{at}.weight")
            entry["weight"] = float(p.weight)
        placement = {"node": entry["dataset"]["node"]} if "dataset" in entry else {}
        refusal = ctx.executor.check_fits(spec, placement)
        if refusal:
            raise APIError(400, f"{at}: no node can hold this participant's job: {refusal}",
                           param=at, code="insufficient_memory")
        out.append(entry)
    names = [e["name"] for e in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise bad_request(f"participants: names must be unique; {dupes} used more than once "
                          "(give each a 'name')", param="participants")
    if any(weighted) and sum(e["weight"] for e in out) <= 0:
        raise bad_request("participants: the weights must not all be 0",
                          param="participants[0].weight")
    return out


@router.post("", response_model=Federation)
def create_federation(req: CreateFederationRequest = Body(...), owner: str = Depends(tenant),
                      ctx: AppContext = Depends(context)) -> Any:
    model = ctx.store.get_model(req.model)
    if model is None:
        raise bad_request(f"Unknown model '{req.model}'", param="model", code="model_not_found")
    try:
        check_method(req.method, req.params)
    except MergeError as exc:
        msg = str(exc)
        param = msg.split(":", 1)[0] if msg.startswith(("method", "params")) else "method"
        raise bad_request(msg, param=param) from None
    spec, hyper = _spec(req, model)
    participants = _participants(ctx, owner, req, spec)
    quorum = req.min_quorum or len(participants)
    if quorum > len(participants):
        raise bad_request(f"min_quorum ({quorum}) exceeds the number of participants "
                          f"({len(participants)})", param="min_quorum")
    check_init_adapter(ctx, owner, req.init_adapter, model.sha256)
    weights = ({p["name"]: p["weight"] for p in participants}
               if "weight" in participants[0] else None)
    rec = FederationRecord(
        id=new_id("fed"), tenant=owner, status="running", model=model.name,
        model_sha256=model.sha256, spec=spec.model_dump(mode="json", exclude={"base_model"}),
        hyperparameters=hyper, participants=participants,
        tenants=sorted({p["tenant"] for p in participants} | {owner}),
        rounds_total=req.rounds, method=req.method, params=dict(req.params), weights=weights,
        quorum=quorum, deadline_s=req.round_deadline_s, global_adapter=req.init_adapter)
    return federation(ctx.store.create_federation(rec))


@router.get("", response_model=ListResponse[Federation])
def list_federations(after: Optional[str] = None, limit: int = Query(20, ge=1, le=100),
                     owner: str = Depends(tenant), ctx: AppContext = Depends(context)) -> Any:
    try:
        recs, more = ctx.store.list_federations(owner, after=after, limit=limit)
    except NotFound as exc:
        raise bad_request(f"'after' names no federation of yours: '{after}'",
                          param="after") from exc
    return convert.page([federation(r) for r in recs], more)


@router.get("/{fed_id}", response_model=Federation)
def get_federation(fed_id: str, owner: str = Depends(tenant),
                   ctx: AppContext = Depends(context)) -> Any:
    rec = ctx.store.get_federation(fed_id, owner)
    if rec is None:
        raise not_found("federation", fed_id)
    return federation(rec)


@router.post("/{fed_id}/cancel", response_model=Federation)
def cancel_federation(fed_id: str, owner: str = Depends(tenant),
                      ctx: AppContext = Depends(context)) -> Any:
    """Stop after the current round's jobs are cancelled; only the creator may."""
    rec = ctx.store.get_federation(fed_id, owner)
    if rec is None or rec.tenant != owner:
        raise not_found("federation", fed_id)
    if not rec.terminal:
        ctx.store.update_federation(fed_id, from_statuses={"running"}, cancel_requested=True)
    return federation(ctx.store.get_federation(fed_id) or rec)


def federation(rec: FederationRecord) -> Federation:
    """The REST shape of a stored federation."""
    error = None
    if rec.error_code or rec.error_message:
        error = JobError(code=rec.error_code or "error", message=rec.error_message or "")
    participants = [FederationParticipant(
        name=p["name"], tenant=p.get("tenant"), training_file=p.get("training_file"),
        dataset=f"{p['dataset']['node']}:{p['dataset']['name']}" if p.get("dataset") else None,
        examples=p.get("examples"), weight=p.get("weight")) for p in rec.participants]
    return Federation(
        id=rec.id, created_at=rec.created_at, finished_at=rec.finished_at,
        organization_id=rec.tenant, status=rec.status,  # type: ignore[arg-type]
        model=rec.model, participants=participants, rounds_total=rec.rounds_total,
        current_round=len(rec.rounds), method=rec.method, params=rec.params,
        min_quorum=rec.quorum, round_deadline_s=rec.deadline_s,
        local_steps=rec.spec.get("max_steps"),
        local_epochs=None if rec.spec.get("max_steps") else rec.spec.get("n_epochs"),
        rounds=[FederationRound(**r) for r in rec.rounds], global_adapter=rec.global_adapter,
        error=error)


