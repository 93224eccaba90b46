"""Federated rounds from the client: `client.federate(...)` and `client.federations`.

Plans as in `_plans.py` (shared by `Client` and `AsyncClient`), plus the two resource classes.
A participant is a dict (or `ParticipantParams`) naming its data: `dataset="NODE:NAME"` (a
node-local data set offered with `lorapool donate --dataset NAME=PATH`, which never leaves its
node) or `training_file` (a "file-…" id, or a local path uploaded first as the caller's file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from . import _plans as plans
from ._base import Call, Plan
from .errors import InvalidParameterError
from .types import Federation, ListResponse, LoraParams

FEDERATIONS = "/v1/federations"
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


class ParticipantParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Optional[str] = None
    tenant: Optional[str] = None
    training_file: Optional[Union[str, Path]] = None
    dataset: Optional[Union[str, dict[str, str]]] = None
    weight: Optional[float] = Field(None, ge=0)


class FederateParams(BaseModel):
    """The arguments of `federate()`, checked before anything is uploaded."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    participants: list[ParticipantParams] = Field(min_length=1)
    rounds: int = Field(ge=1)
    local_steps: Optional[int] = Field(None, ge=1)
    local_epochs: Optional[int] = Field(None, ge=1)
    method: str = "exact"
    params: dict[str, Any] = Field(default_factory=dict)
    min_quorum: Optional[int] = Field(None, ge=1)
    round_deadline_s: Optional[float] = Field(None, gt=0)
    init_adapter: Optional[str] = None
    batch_size: Optional[int] = Field(None, ge=1)
    micro_batch_size: Optional[int] = Field(None, ge=1)
    learning_rate: Optional[float] = Field(None, gt=0)
    lora: Optional[LoraParams] = None
    quantization: Optional[str] = None
    max_seq_len: Optional[int] = Field(None, ge=8)
    seed: Optional[int] = None

    @classmethod
    def check(cls, **kwargs: Any) -> "FederateParams":
        p = plans.checked(cls, "federate", **kwargs)
        if (p.local_steps is None) == (p.local_epochs is None):
            raise InvalidParameterError("local_steps", "give exactly one of local_steps or "
                                        "local_epochs")
        for i, part in enumerate(p.participants):
            if (part.training_file is None) == (part.dataset is None):
                raise InvalidParameterError(f"participants[{i}]", "give exactly one of "
                                            "training_file or dataset ('NODE:NAME')")
        return p


def federate(params: FederateParams) -> Plan:
    """Upload local participant files (the caller's own), then create the federation."""
    body = params.model_dump(exclude_none=True, exclude={"participants"}, mode="json")
    body["participants"] = []
    for i, part in enumerate(params.participants):
        entry = part.model_dump(exclude_none=True, mode="json")
        if part.training_file is not None:
            ref = plans.file_ref(part.training_file, f"participants[{i}].training_file")
            if isinstance(ref, Path):
                uploaded = yield from plans.upload_file(ref, param=f"participants[{i}]"
                                                        ".training_file")
                ref = uploaded.id
            entry["training_file"] = ref
        body["participants"].append(entry)
    return (yield Call("POST", FEDERATIONS, json=body, parse=plans.parse_model(Federation)))


def get_federation(fed_id: str) -> Plan:
    return (yield from plans.get(f"{FEDERATIONS}/{plans._seg(fed_id, 'federation_id')}",
                                 Federation))


def list_federations(after: Optional[str], limit: Optional[int]) -> Plan:
    return (yield from plans.page(FEDERATIONS, Federation, after=after, limit=limit))


def cancel_federation(fed_id: str) -> Plan:
    return (yield Call("POST", f"{FEDERATIONS}/{plans._seg(fed_id, 'federation_id')}/cancel",
                       parse=plans.parse_model(Federation)))


def wait_federation(fed_id: str, *, poll_interval: float = 2.0, timeout: Optional[float] = None,
                    on_update: Optional[Callable[[Federation], None]] = None) -> Plan:
    """Poll until the federation succeeded, failed or was cancelled; returns it."""

    def fetch() -> Plan:
        fed = yield from get_federation(fed_id)
        if on_update is not None:
            on_update(fed)
        return fed

    return (yield from plans.poll_until(fetch, lambda f: f.status in TERMINAL,
                                        what=f"federation {fed_id}",
                                        poll_interval=poll_interval, timeout=timeout))


class Federations:
    """`client.federations`: get, list, cancel, wait."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def get(self, federation_id: str) -> Federation:
        return self._client._run(get_federation(federation_id))

    def list(self, *, after: Optional[str] = None,
             limit: Optional[int] = None) -> ListResponse[Federation]:
        return self._client._run(list_federations(after, limit))

    def cancel(self, federation_id: str) -> Federation:
        return self._client._run(cancel_federation(federation_id))

    def wait(self, federation_id: str, *, poll_interval: float = 2.0,
             timeout: Optional[float] = None) -> Federation:
        return self._client._run(wait_federation(federation_id, poll_interval=poll_interval,
                                                 timeout=timeout))


class AsyncFederations:
    """`AsyncClient.federations`: the same, awaitable."""

    def __init__(self, client: Any) -> None:
        self._client = client

    async def get(self, federation_id: str) -> Federation:
        return await self._client._run(get_federation(federation_id))

    async def list(self, *, after: Optional[str] = None,
                   limit: Optional[int] = None) -> ListResponse[Federation]:
        return await self._client._run(list_federations(after, limit))

    async def cancel(self, federation_id: str) -> Federation:
        return await self._client._run(cancel_federation(federation_id))

    async def wait(self, federation_id: str, *, poll_interval: float = 2.0,
                   timeout: Optional[float] = None) -> Federation:
        return await self._client._run(wait_federation(
            federation_id, poll_interval=poll_interval, timeout=timeout))
