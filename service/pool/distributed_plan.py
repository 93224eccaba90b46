"""Planning a data-parallel job over several nodes: who trains, with what micro-batch and share.

Pure data, no Ray, so the scheduler, the launcher (distributed.py) and tests share it.

- `order_candidates`: same machine packed first — nodes are grouped by machine (IP), the
  machine offering the most candidate nodes first, so NCCL talks over NVLink/PCIe where it can
  and over the office network only when it must.
- `plan_workers`: for each chosen node, the largest micro-batch whose memory estimate fits its
  card (halving from the job's own, as auto-fit does), and a share of each step's rows in
  proportion to its measured speed (1.0 when unknown), so a fast card does not wait for a slow
  one. The effective batch and the loss normalisation do not change: the trainer normalises
  by the label count of the whole step over all ranks.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from ..train.spec import DeviceInfo, TrainSpec


@dataclass
class Candidate:
    """A node the job may use (the scheduler's choice, or every fitting node)."""

    node_id: str
    name: str = ""
    ip: str = ""
    agent: Optional[str] = None  # the NodeAgent's actor name there, for its working folder
    device: Optional[DeviceInfo] = None
    speed: Optional[float] = None  # measured relative speed (higher is faster)


@dataclass
class WorkerPlan:
    node_id: str
    name: str
    agent: Optional[str]
    micro_batch_size: int
    weight: float
    rows_per_step: int = 0
    grad_accum: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def order_candidates(cands: list[Candidate]) -> list[Candidate]:
    """Same machine packed first (stable within a machine)."""
    per_ip = Counter(c.ip for c in cands)
    return sorted(cands, key=lambda c: (-per_ip[c.ip], c.ip))


def fit_micro_batch(spec: TrainSpec, device: Optional[DeviceInfo]) -> int:
    """The largest micro-batch (the job's, halved as needed) whose estimate fits `device`'s
    free memory; the job's own when the card is unknown, 1 when even 1 does not fit (the
    trainer's out-of-memory fallback is the last word)."""
    if device is None or device.kind != "cuda" or not (device.free_memory or device.total_memory):
        return spec.micro_batch_size
    from ..train.memory import estimate_memory

    free = device.free_memory if device.free_memory is not None else device.total_memory
    micro = spec.micro_batch_size
    probe = spec.model_copy(update={"device": "auto"})
    while micro > 1:
        try:
            est = estimate_memory(probe.model_copy(update={"micro_batch_size": micro}), device)
        except Exception:  # noqa: BLE001 — no readable config: the trainer's OOM fallback decides
            return spec.micro_batch_size
        if est.total <= free:
            break
        micro //= 2
    return max(1, micro)


def plan_workers(spec: TrainSpec, chosen: list[Candidate]) -> list[WorkerPlan]:
    """One plan per chosen node, in the given order (see the module docstring)."""
    from ..train.distributed import split_counts

    plans = [WorkerPlan(node_id=c.node_id, name=c.name or c.node_id[:8], agent=c.agent,
                        micro_batch_size=fit_micro_batch(spec, c.device),
                        weight=float(c.speed) if c.speed and c.speed > 0 else 1.0)
             for c in chosen]
    for p, rows in zip(plans, split_counts(spec.batch_size, [p.weight for p in plans])):
        p.rows_per_step = rows
        p.micro_batch_size = max(1, min(p.micro_batch_size, rows or 1))
        p.grad_accum = max(1, math.ceil(rows / p.micro_batch_size))
    return plans


def describe(plans: list[WorkerPlan]) -> str:
    return ", ".join(f"{p.name}: {p.rows_per_step} rows/step as {p.grad_accum} x "
                     f"micro-batch {p.micro_batch_size}" for p in plans)
