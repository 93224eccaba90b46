"""`estimated_finish` of running jobs, from their measured step times.

A store subscriber (see subscriber.py): each committed step event ("metrics" with `step` and
`total_steps`) adds (time, step) to the job's recent window; the mean step time over that
window times the steps left gives the finish time, written to the job (at most once a second
per job). A restart (the step goes back, a resumed attempt) starts the window afresh, so model
loading and a lost attempt never count as step time.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Optional

from ..store.records import EventRecord, JobStatusChange
from .subscriber import StoreSubscriber

WINDOW = 20  # step events the mean is taken over: recent enough to follow a slower node
MIN_WRITE_INTERVAL = 1.0


def estimate(window: "deque[tuple[float, int]]", total_steps: int) -> Optional[float]:
    """Unix time the job should finish at, or None with fewer than two steps seen."""
    if len(window) < 2:
        return None
    (t0, s0), (t1, s1) = window[0], window[-1]
    if s1 <= s0:
        return None
    per_step = (t1 - t0) / (s1 - s0)
    return t1 + per_step * max(0, total_steps - s1)


class ProgressEstimator(StoreSubscriber):
    name = "progress"

    def __init__(self, maxsize: int = 10_000) -> None:
        super().__init__(maxsize)
        self._windows: dict[str, deque[tuple[float, int]]] = {}
        self._written: dict[str, float] = {}

    def handle(self, topic: str, item: Any, at: float) -> None:
        if isinstance(item, JobStatusChange):
            if item.status != "running":  # finished, or back in the queue: start afresh
                self._windows.pop(item.job_id, None)
                self._written.pop(item.job_id, None)
            return
        if not isinstance(item, EventRecord) or item.type != "metrics" or not item.data:
            return
        step, total = item.data.get("step"), item.data.get("total_steps")
        if not isinstance(step, int) or not isinstance(total, int):
            return  # an eval event, or a malformed one
        window = self._windows.setdefault(item.job_id, deque(maxlen=WINDOW))
        if window and step <= window[-1][1]:
            window.clear()
        window.append((at, step))
        finish = estimate(window, total)
        now = time.time()
        if finish is None or now - self._written.get(item.job_id, 0.0) < MIN_WRITE_INTERVAL:
            return
        self._written[item.job_id] = now
        self.store.update_job(item.job_id, estimated_finish=int(round(finish)))
