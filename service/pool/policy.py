"""When a donor's GPU belongs to the pool: a schedule and idle rules, checked by its NodeAgent.

`DonationPolicy.unavailable_reason()` returns None while the pool may use the GPU and a short
human reason ("outside the donation schedule 19:00-07:00,sat,sun", "another process uses the
GPU: 37 % for 2 min") when the owner wants it back; the NodeAgent then checkpoints and stops
the node's jobs and takes no new ones until the reason clears.

GPU activity comes from NVML (package `nvidia-ml-py`) when present. Tests and CPU donors pass
their own probe.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from dataclasses import dataclass
from typing import Callable, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

_DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
_SPAN = re.compile(r"^(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})$")


@dataclass(frozen=True)
class GpuActivity:
    """What runs on the GPU right now: every process id on it, and the GPU's utilisation."""

    pids: tuple[int, ...]
    utilization_percent: float


def parse_schedule(text: str) -> list[tuple[str, object]]:
    """"19:00-07:00,sat,sun" → [("span", (1140, 420)), ("day", 5), ("day", 6)]."""
    parts = []
    for raw in text.split(","):
        item = raw.strip().lower()
        if not item:
            continue
        if item in ("weekend", "weekends"):
            parts += [("day", 5), ("day", 6)]
        elif item[:3] in _DAYS and item.isalpha():
            parts.append(("day", _DAYS.index(item[:3])))
        elif m := _SPAN.match(item):
            h1, m1, h2, m2 = (int(g) for g in m.groups())
            if h1 > 23 or h2 > 24 or m1 > 59 or m2 > 59:
                raise ValueError(f"bad time in schedule item {raw!r}")
            parts.append(("span", (h1 * 60 + m1, h2 * 60 + m2)))
        else:
            raise ValueError(f"schedule item {raw!r} is neither HH:MM-HH:MM nor a day name "
                             "(mon…sun, weekends)")
    if not parts:
        raise ValueError("empty schedule")
    return parts


def in_schedule(parts: list[tuple[str, object]], when: dt.datetime) -> bool:
    minute = when.hour * 60 + when.minute
    for kind, value in parts:
        if kind == "day" and when.weekday() == value:
            return True
        if kind == "span":
            start, end = value  # type: ignore[misc]
            if start <= end and start <= minute < end:
                return True
            if start > end and (minute >= start or minute < end):  # across midnight
                return True
    return False


class DonationPolicy(BaseModel):
    """What the owner allows. Empty policy: always available."""

    model_config = ConfigDict(extra="forbid")

    schedule: Optional[str] = None  # e.g. "19:00-07:00,sat,sun"
    only_when_unused: bool = False  # no other process on the GPU at all
    max_other_utilization: Optional[float] = Field(None, ge=0, le=100)  # percent
    busy_minutes: float = Field(1.0, ge=0)  # how long the rule must hold before reclaiming

    @field_validator("schedule")
    @classmethod
    def _valid_schedule(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            parse_schedule(v)
        return v

    def checker(
        self,
        probe: Optional[Callable[[], Optional[GpuActivity]]] = None,
        clock: Callable[[], dt.datetime] = dt.datetime.now,
    ) -> Callable[[set[int]], Optional[str]]:
        """A function the NodeAgent calls on every report with the pids of lorapool's own jobs
        there: None, or why the GPU is taken back.

        NVML's utilisation is the whole GPU's, our own jobs included, so the utilisation rule
        only counts while some other process is on the GPU: "another process is there and the
        GPU is busier than N %".
        """
        parts = parse_schedule(self.schedule) if self.schedule else None
        probe = probe or nvml_probe
        busy_since: list[Optional[float]] = [None]

        def check(own_pids: set[int] = frozenset()) -> Optional[str]:
            if parts is not None and not in_schedule(parts, clock()):
                return f"outside the donation schedule {self.schedule}"
            if not (self.only_when_unused or self.max_other_utilization is not None):
                return None
            activity = probe()
            if activity is None:
                return None
            others = [p for p in activity.pids if p not in own_pids]
            busy = bool(others) and (
                self.only_when_unused
                or activity.utilization_percent > (self.max_other_utilization or 0.0))
            if not busy:
                busy_since[0] = None
                return None
            busy_since[0] = busy_since[0] or time.monotonic()
            if time.monotonic() - busy_since[0] >= self.busy_minutes * 60:
                return (f"the owner is using the GPU ({len(others)} other process(es), "
                        f"{activity.utilization_percent:.0f} % utilisation)")
            return None

        return check


def nvml_probe(gpu_index: int = 0) -> Optional[GpuActivity]:
    """Other processes and utilisation on the GPU from NVML; None where NVML is missing. The
    GPU is CUDA device `gpu_index` as the agent numbers it (matched by UUID, train/nvml.py)."""
    from ..train.nvml import nvml_handle

    found = nvml_handle(gpu_index)
    if found is None:
        return None
    nvml, handle = found
    try:
        procs = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        procs += nvml.nvmlDeviceGetGraphicsRunningProcesses(handle)
        util = nvml.nvmlDeviceGetUtilizationRates(handle).gpu
        return GpuActivity(pids=tuple(p.pid for p in procs), utilization_percent=float(util))
    except Exception:
        return None
