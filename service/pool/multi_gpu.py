"""Placing one job split over several GPUs of one machine: which GPUs, and how the model splits.

Pure data, no Ray (like distributed_plan.py), so the placer, the scheduler and tests share it.
A node that reports several GPUs (`gpus`, one DeviceInfo each, free memory filled in) can take
a job too big for any one of them but not for some of them together: the job then runs as one
worker holding those GPUs, its decoder layers split over them (service/train/model_split.py).
The decision and the per-GPU estimate are the trainer's (service/train/memory_split.py
`plan_gpus`); this module turns it into what the scheduler needs to start the worker.

    split = plan_split(spec, gpus, safety_margin=0.1)   # NodeSplit, or None
    split.gpus              # the node's GPU indices, in the order the layers run over them
    split.split_spec()      # the trainer's SplitSpec (devices, layer ranges, budgets per GPU)
    split.reserve           # bytes to promise on each of those GPUs
    split.reason            # one line for the job's events

`plan_split` returns None where one card holds the job (the placer's ordinary path places it)
and where no set of this node's GPUs does; `explain` says which, in words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from ..train.memory_split import GpuPlan, plan_gpus
from ..train.spec import DeviceInfo, SplitSpec, TrainSpec


@dataclass(frozen=True)
class NodeSplit:
    """One job split over `gpus` (indices of the node's reported GPUs, in layer order)."""

    gpus: tuple[int, ...]
    layers: tuple[tuple[int, int], ...]  # [start, end) decoder layers per GPU
    peaks: tuple[int, ...]  # predicted peak bytes per GPU (memory_split.py)
    host_head: bool  # the output head streams from host memory (the split needs it there)
    reason: str
    breakdowns: tuple[dict[str, int], ...] = ()

    @property
    def num_gpus(self) -> int:
        """How many GPUs the one worker holds. The scheduler claims no Ray GPUs for it (as for
        a one-card runner): the runner sees the node's GPUs under the donor's own
        CUDA_VISIBLE_DEVICES, named as the agent reports them (split_placement.py)."""
        return len(self.gpus)

    @property
    def total(self) -> int:
        """Bytes the job takes on the node, all GPUs together."""
        return sum(self.peaks)

    def reserve(self, safety_margin: float = 0.0) -> tuple[int, ...]:
        """Bytes to promise on each GPU (its peak with the placer's margin)."""
        return tuple(int(p * (1 + safety_margin)) for p in self.peaks)

    def split_spec(self, local_devices: Optional[Sequence[str]] = None) -> SplitSpec:
        """The trainer's `SplitSpec` for this split. `local_devices`: how the worker names the
        GPUs it was given, in the order of `gpus` (default "cuda:<index>", right where the
        worker sees the node's GPUs under their own indices; under Ray's `num_gpus=k` the
        worker sees them renumbered from 0, in the order Ray lists them)."""
        devices = list(local_devices) if local_devices is not None else \
            [f"cuda:{g}" for g in self.gpus]
        return SplitSpec(devices=devices, layers=[e - s for s, e in self.layers],
                         budgets=list(self.peaks))

    def as_dict(self) -> dict[str, Any]:
        """Plain data for the job's events and its payload."""
        return {"gpus": list(self.gpus), "layers": [list(r) for r in self.layers],
                "peaks": list(self.peaks), "host_head": self.host_head, "reason": self.reason}


def decide(spec: TrainSpec, gpus: Sequence[DeviceInfo], *, safety_margin: float = 0.0,
           max_gpus: Optional[int] = None, config: Any = None) -> GpuPlan:
    """The trainer's decision for this node (memory_split.plan_gpus): "single", "split" or
    "none", with its reason. The job is estimated as it would run on a GPU (its `device` field
    is the pool's to set, as the placer's estimates do)."""
    probe = spec if spec.device != "cpu" else spec.model_copy(update={"device": "auto"})
    return plan_gpus(probe, [g for g in gpus], margin=safety_margin, max_gpus=max_gpus,
                     config=config)


def plan_split(spec: TrainSpec, gpus: Sequence[DeviceInfo], *, safety_margin: float = 0.0,
               max_gpus: Optional[int] = None, config: Any = None) -> Optional[NodeSplit]:
    """The GPUs and split plan for `spec` on a node with these GPUs, or None: one card holds it
    (no split needed) or no set of them does (`explain` says which). Only CUDA GPUs split."""
    cuda = [g for g in gpus if g.kind == "cuda"]
    if len(cuda) < 2 or len(cuda) != len(gpus):
        return None
    plan = decide(spec, gpus, safety_margin=safety_margin, max_gpus=max_gpus, config=config)
    if plan.mode != "split":
        return None
    return NodeSplit(gpus=plan.gpus, layers=plan.layers, peaks=plan.peaks,
                     host_head=plan.host_head, reason=plan.reason,
                     breakdowns=tuple(dict(p.breakdown) for p in plan.parts))


def explain(spec: TrainSpec, gpus: Sequence[DeviceInfo], *, safety_margin: float = 0.0,
            max_gpus: Optional[int] = None, config: Any = None) -> str:
    """Why `plan_split` answers as it does for this node, in one line."""
    if len([g for g in gpus if g.kind == "cuda"]) < 2:
        return "a split needs at least two GPUs on one machine"
    return decide(spec, gpus, safety_margin=safety_margin, max_gpus=max_gpus,
                  config=config).reason


__all__ = ["NodeSplit", "decide", "explain", "plan_split"]
