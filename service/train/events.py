"""What the trainer tells its caller while it runs (`TrainEvent`) and when it is done (`TrainResult`).

Both are plain pydantic data so that the pool can send them through Ray and the service can
store and stream them as they are. Memory fields are CUDA bytes, None on the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field

log = logging.getLogger(__name__)

EventType = Literal["status", "step", "eval", "checkpoint", "warning", "done"]


class TrainEvent(BaseModel):
    """One thing that happened in a run; `step` is the optimizer step it happened at."""

    type: EventType
    step: int = 0
    total_steps: int = 0
    epoch: float | None = None
    loss: float | None = None
    lr: float | None = None
    grad_norm: float | None = None
    tokens_per_s: float | None = None
    memory_allocated: int | None = None
    memory_peak: int | None = None
    message: str = ""
    path: str | None = None  # the checkpoint folder for type == "checkpoint"
    data: dict[str, Any] = Field(default_factory=dict)


class TrainResult(BaseModel):
    """How a `train()` call ended: "completed" (adapter written) or "stopped" (checkpointed)."""

    status: Literal["completed", "stopped"]
    step: int
    total_steps: int
    adapter_dir: Path | None = None
    last_checkpoint: Path | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)


def memory_stats(device: torch.device) -> tuple[int | None, int | None]:
    """(allocated, peak) CUDA bytes on `device`, or (None, None) off CUDA."""
    if device.type != "cuda":
        return None, None
    return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)


class EventSink:
    """Fills in the fields every event shares and hands it to the caller's callback.

    A callback that raises must not kill hours of training: its error is logged and dropped.
    """

    def __init__(self, on_event: Callable[[TrainEvent], None] | None, device: torch.device):
        self.on_event = on_event
        self.device = device
        self.total_steps = 0

    def emit(self, type: EventType, step: int = 0, **fields: Any) -> TrainEvent:
        alloc, peak = memory_stats(self.device)
        fields.setdefault("memory_allocated", alloc)
        fields.setdefault("memory_peak", peak)
        event = TrainEvent(type=type, step=step, total_steps=self.total_steps, **fields)
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:
                log.exception("on_event callback failed for %s event at step %d", type, step)
        return event
