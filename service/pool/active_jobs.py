"""The jobs this head drives now, and the killed runners whose node slots are not free yet.

`ActiveJobs` holds one `ActiveJob` per running attempt (its runner, the run's ObjectRef, its
memory estimate, cancel/preemption deadlines, its step progress) and one `DyingRunner` per
runner that was killed: a killed runner counts against its node's slots until Ray confirms it
is gone, so a storm of cancels never stacks new runners onto dying ones. It speaks Ray only to
kill runners and to probe whether they are gone; what a job's ending means for the job is
outcomes.py's business.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import ray

from .progress import WINDOW, estimate

log = logging.getLogger("lorapool.pool")


@dataclass
class StepProgress:
    """How far an attempt is and how fast it steps, from the step events the head drains.

    One (time, step) per drain: the events of one `drain()` arrive together, so their own
    arrival times say nothing about the time between them; the latest step of each drain,
    at the drain's time, does. The mean over the last `WINDOW` drains gives the step time
    (progress.py's `estimate`), so model loading before the first step never counts."""

    total_steps: Optional[int] = None
    window: "deque[tuple[float, int]]" = field(default_factory=lambda: deque(maxlen=WINDOW))

    def note(self, step: int, total_steps: Optional[int], at: float) -> None:
        if total_steps is not None:
            self.total_steps = total_steps
        w = self.window
        if w and step < w[-1][1]:
            w.clear()  # the step went back: start afresh
        if w and w[-1][0] == at:
            if step > w[-1][1]:
                w[-1] = (at, step)  # a later step of the same drain
        elif not w or step > w[-1][1]:
            w.append((at, step))

    def remaining_s(self, now: float) -> Optional[float]:
        """Seconds until the last step is expected (0 when overdue); None until two drains
        have shown steps advance or while the total is unknown."""
        if not self.total_steps:
            return None
        finish = estimate(self.window, self.total_steps)
        return None if finish is None else max(0.0, finish - now)


@dataclass
class ActiveJob:
    """One attempt of one job running on a node."""

    job_id: str
    tenant: str
    node: str
    runner: Any
    run_ref: Any
    estimate: int
    attempt: int
    started_at: float
    last_checkpoint_step: int = -1
    stepped: bool = False
    stop_reason: Optional[str] = None
    preempted_at: Optional[float] = None  # when its node asked it to checkpoint and stop
    cancel_at: Optional[float] = None  # when a cancel was sent to its runner
    events: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    progress: StepProgress = field(default_factory=StepProgress)

    def remaining_s(self, now: float) -> Optional[float]:
        """Seconds until this attempt is expected to end (None: not known yet)."""
        return self.progress.remaining_s(now)


@dataclass
class DyingRunner:
    """A runner that was killed: its node slot stays taken until Ray says it is gone."""

    node: str
    runner: Any
    probe: Any  # an ObjectRef that fails once the actor is dead
    since: float


class ActiveJobs:
    """The active and dying sets, thread-safe; see the module docstring."""

    def __init__(self, dying_timeout: float = 30.0) -> None:
        self.dying_timeout = dying_timeout
        self._active: dict[str, ActiveJob] = {}
        self._dying: dict[str, DyingRunner] = {}
        self._lock = threading.RLock()

    # -- the active set --------------------------------------------------------------------
    def __contains__(self, job_id: object) -> bool:
        return job_id in self._active

    def __len__(self) -> int:
        return len(self._active)

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids())

    def get(self, job_id: str) -> Optional[ActiveJob]:
        return self._active.get(job_id)

    def add(self, a: ActiveJob) -> None:
        with self._lock:
            self._active[a.job_id] = a

    def pop(self, job_id: str) -> Optional[ActiveJob]:
        with self._lock:
            return self._active.pop(job_id, None)

    def snapshot(self) -> list[ActiveJob]:
        with self._lock:
            return list(self._active.values())

    def as_dict(self) -> dict[str, ActiveJob]:
        with self._lock:
            return dict(self._active)

    def ids(self) -> set[str]:
        with self._lock:
            return set(self._active)

    def not_yet_cancelled(self) -> set[str]:
        """Jobs whose runner has not been sent a cancel."""
        with self._lock:
            return {j for j, a in self._active.items() if a.cancel_at is None}

    def mark_cancel(self, job_id: str, reason: str) -> tuple[Optional[ActiveJob], bool]:
        """Record a cancel for the job: (its attempt or None, whether this is the first)."""
        with self._lock:
            a = self._active.get(job_id)
            if a is None:
                return None, False
            a.stop_reason = a.stop_reason or reason
            first = a.cancel_at is None
            a.cancel_at = a.cancel_at or time.time()
            return a, first

    def running_by_tenant(self) -> dict[str, int]:
        with self._lock:
            return dict(Counter(a.tenant for a in self._active.values()))

    # -- the dying set ---------------------------------------------------------------------
    def dying_by_node(self) -> dict[str, int]:
        """Killed runners not yet gone, per node: they still hold a slot there."""
        with self._lock:
            return dict(Counter(d.node for d in self._dying.values()))

    def kill(self, job_id: str, node: str, runner: Any, run_ref: Any = None) -> None:
        """Kill a runner and hold its node slot until it is gone."""
        try:
            ray.kill(runner, no_restart=True)
        except Exception:
            return
        probe = run_ref
        if probe is None or ray.wait([probe], timeout=0)[0]:
            # A call after the kill fails once the actor is dead.
            probe = runner.pid.remote()
        with self._lock:
            self._dying[job_id] = DyingRunner(node, runner, probe, time.time())

    def release(self, a: ActiveJob, node_handle: Any = None) -> None:
        """The attempt is over: forget it, free its memory on the node, kill its runner."""
        self.pop(a.job_id)
        if node_handle is not None:
            try:
                node_handle.unregister_job.remote(a.job_id)
            except Exception:
                pass
        self.kill(a.job_id, a.node, a.runner, a.run_ref)

    def reap(self) -> None:
        """Forget killed runners Ray says are gone (their node slot is free again)."""
        with self._lock:
            dying = dict(self._dying)
        if not dying:
            return
        probes = {d.probe: job for job, d in dying.items()}
        ready, _ = ray.wait(list(probes), num_returns=len(probes), timeout=0)
        now = time.time()
        for ref in ready:
            job = probes[ref]
            d = dying[job]
            try:
                ray.get(ref, timeout=0)
            except Exception:  # the actor is dead: the slot is free
                with self._lock:
                    self._dying.pop(job, None)
                continue
            # It answered: the kill has not landed yet. Ask again next tick.
            try:
                d.probe = d.runner.pid.remote()
            except Exception:
                with self._lock:
                    self._dying.pop(job, None)
        for job, d in dying.items():
            if now - d.since > self.dying_timeout and job in self._dying:
                log.warning("runner of %s on %s not confirmed dead after %.0f s", job, d.node,
                            now - d.since)
                with self._lock:
                    self._dying.pop(job, None)
