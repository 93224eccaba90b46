"""What a runner tells the scheduler, typed, and what each outcome does to its job.

Two halves, both pure data (no Ray, no store), so they are tested without a cluster:

1. The messages a job runner sends the head: `RunnerItem` (one entry of `drain()`: a
   `RunnerEvent`, plus the checkpoint files it announces) and `RunResult` (what `run()` returns:
   `Completed`, `Stopped` or `Failed`). Both runners build them (the multi-worker one in
   distributed.py from what its Ray Train workers send it); `from_wire` parses the dict form
   (logs, tests, an older runner) once.
2. The outcome → transition table: for each kind of ending (a run's result, or what the head
   saw itself: a lost node, a cancel past its deadline, the service stopping or restarting) the
   job's next status, its event (message, level, data), the store fields to set, and whether it
   goes back to the queue. `transition_for` is the one place that decides; the scheduler only
   applies what it returns.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Optional, Union

Files = dict[str, Any]  # relpath → bytes (or a Ray ObjectRef to them)
JobStatus = Literal["succeeded", "failed", "cancelled", "queued"]
CANCELLED_BY_USER = "cancelled by user"


# -- runner → scheduler messages -----------------------------------------------------------------


@dataclass(frozen=True)
class RunnerEvent:
    """A trainer event as it travels to the head (a `TrainEvent` less its node-local path)."""

    type: str
    step: Optional[int] = None
    total_steps: Optional[int] = None
    epoch: Optional[float] = None
    loss: Optional[float] = None
    lr: Optional[float] = None
    grad_norm: Optional[float] = None
    tokens_per_s: Optional[float] = None
    memory_allocated: Optional[int] = None
    memory_peak: Optional[int] = None
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_train_event(cls, event: Any) -> "RunnerEvent":
        """From a `train.TrainEvent` (duck-typed: this module imports nothing of train)."""
        return cls.from_wire(event.model_dump(mode="json"))

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> "RunnerEvent":
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in names}
        kwargs["type"] = str(raw.get("type") or "")
        kwargs["message"] = raw.get("message") or ""
        kwargs["data"] = dict(raw.get("data") or {})
        return cls(**kwargs)

    def to_wire(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RunnerItem:
    """One entry of a runner's `drain()`: an event, with the checkpoint's files when the event
    announces one (checkpoints leave the node as they are written)."""

    event: RunnerEvent
    files: Optional[Files] = None

    @classmethod
    def from_wire(cls, raw: Union["RunnerItem", Mapping[str, Any]]) -> "RunnerItem":
        if isinstance(raw, RunnerItem):
            return raw
        return cls(RunnerEvent.from_wire(raw.get("event") or {}), raw.get("files") or None)

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": "event", "event": self.event.to_wire()}
        if self.files:
            out["files"] = self.files
        return out


@dataclass(frozen=True)
class _Ended:
    """What every run result carries besides its kind."""

    step: Optional[int] = None
    total_steps: Optional[int] = None
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: Optional[float] = None
    peak_memory: Optional[int] = None  # the run's measured peak, bytes
    stop_reason: Optional[str] = None  # what the head (or the node) asked, if it asked
    workers: Optional[list[dict[str, Any]]] = None  # a multi-worker run's final plan


@dataclass(frozen=True)
class Completed(_Ended):
    """Trained to the end: the adapter folder's files."""

    adapter_files: Files = field(default_factory=dict)
    status: Literal["completed"] = "completed"


@dataclass(frozen=True)
class Stopped(_Ended):
    """Stopped on request (cancel, preemption, regrow) with its last checkpoint, if any."""

    checkpoint_files: Optional[Files] = None
    phase: Optional[str] = None  # "setup": stopped before its first step, nothing to save
    status: Literal["stopped"] = "stopped"


@dataclass(frozen=True)
class Failed(_Ended):
    """Failed; `retryable` failures are the infrastructure's and may run again elsewhere."""

    code: str = "internal_error"
    message: str = "training failed"
    retryable: bool = False
    traceback: Optional[str] = None
    status: Literal["failed"] = "failed"


RunResult = Union[Completed, Stopped, Failed]
_RESULT_KINDS: dict[str, type] = {"completed": Completed, "stopped": Stopped, "failed": Failed}


def result_from_wire(raw: Union[RunResult, Mapping[str, Any]]) -> RunResult:
    """A run's result, typed: passes a typed one through, parses a dict once. An unknown status
    reads as a failure (the old code's `else` branch), keeping the code and message it sent."""
    if isinstance(raw, (Completed, Stopped, Failed)):
        return raw
    kind = _RESULT_KINDS.get(str(raw.get("status")), Failed)
    names = {f.name for f in dataclasses.fields(kind)} - {"status"}
    kwargs = {k: v for k, v in raw.items() if k in names and v is not None}
    kwargs["metrics"] = dict(raw.get("metrics") or {})
    if kind is Failed:
        kwargs["retryable"] = bool(raw.get("retryable"))
    return kind(**kwargs)


def result_to_wire(result: RunResult) -> dict[str, Any]:
    """The dict form (for logs and callers that still read dicts): None fields left out."""
    return {k: v for k, v in dataclasses.asdict(result).items() if v is not None}


# -- outcomes the head observes itself -----------------------------------------------------------


@dataclass(frozen=True)
class AdapterStored:
    """A `Completed` run whose adapter the artifact store now holds."""

    result: Completed
    adapter_id: str


@dataclass(frozen=True)
class AdapterNotStored:
    """A `Completed` run whose adapter the artifact store refused (full disk, …)."""

    result: Completed
    error: str


@dataclass(frozen=True)
class Lost:
    """The runner is gone or unreachable: node lost, heartbeats stopped, preemption ignored."""

    reason: str


@dataclass(frozen=True)
class CancelOverdue:
    """A cancelled job's runner did not stop within `timeout` seconds and was killed."""

    timeout: float


@dataclass(frozen=True)
class ServiceStopped:
    """The head stopped with the job running: its runner went with it."""


@dataclass(frozen=True)
class ServiceRestarted:
    """The store says running, but no runner of this head drives it (found at start)."""


Outcome = Union[AdapterStored, AdapterNotStored, Stopped, Failed, Lost, CancelOverdue,
                ServiceStopped, ServiceRestarted]


@dataclass(frozen=True)
class JobContext:
    """What the table needs to know of the job besides the outcome."""

    job_id: str
    node: Optional[str]
    attempt: int
    max_attempts: int
    cancel_in_store: bool = False  # the API stored a cancel for the job
    cancel_sent: bool = False  # this head sent the runner a cancel
    last_checkpoint_step: int = -1

    @property
    def resume_step(self) -> int:
        return max(self.last_checkpoint_step, 0)

    @property
    def may_retry(self) -> bool:
        return self.attempt + 1 < self.max_attempts


@dataclass(frozen=True)
class Transition:
    """What to do to the job: move it from `running` to `status`, setting `fields`, then
    write its event. `finished_at` is added by whoever applies it for every end state."""

    status: JobStatus
    message: str
    level: str = "info"
    data: Optional[dict[str, Any]] = None
    fields: dict[str, Any] = field(default_factory=dict)
    # A retry goes elsewhere if it can: remember the node it ended badly on.
    avoid_node: bool = False
    # The event is written even if the job had already left `running` (end states a run
    # reported itself); otherwise only when this transition moved it.
    event_always: bool = False

    @property
    def requeue(self) -> bool:
        return self.status == "queued"

    @property
    def finished(self) -> bool:
        return self.status in ("succeeded", "failed", "cancelled")


def _requeue(ctx: JobContext, reason: str) -> Transition:
    return Transition(
        "queued",
        f"Attempt {ctx.attempt + 1} ended on {ctx.node}: {reason}; requeued from the last "
        f"checkpoint (step {ctx.resume_step})",
        level="warn", data={"reason": reason, "attempt": ctx.attempt + 1,
                            "resume_step": ctx.resume_step},
        fields={"node_id": None, "attempt": ctx.attempt + 1}, avoid_node=True)


def _adapter_stored(o: AdapterStored, ctx: JobContext) -> Transition:
    r = o.result
    return Transition(
        "succeeded", f"Training finished: adapter {o.adapter_id}",
        data={k: v for k, v in r.metrics.items() if isinstance(v, (int, float, str))},
        fields={"fine_tuned_model": o.adapter_id, "adapter_id": o.adapter_id,
                "trained_tokens": r.metrics.get("trained_tokens"),
                "measured_peak_memory": r.peak_memory, "step": r.step},
        event_always=True)


def _adapter_not_stored(o: AdapterNotStored, ctx: JobContext) -> Transition:
    return Transition(
        "failed", f"Job failed: the adapter could not be stored ({o.error}); its checkpoints "
        "stay downloadable", level="error",
        fields={"error_code": "storage_error",
                "error_message": f"the adapter could not be stored: {o.error}",
                "measured_peak_memory": o.result.peak_memory},
        event_always=True)


def _stopped(o: Stopped, ctx: JobContext) -> Transition:
    if ctx.cancel_in_store or ctx.cancel_sent:
        return Transition("cancelled", f"Job cancelled at step {o.step}; its last checkpoint "
                          "stays downloadable", fields={"measured_peak_memory": o.peak_memory},
                          event_always=True)
    return _requeue(ctx, o.stop_reason or "stopped by its node")


def _failed(o: Failed, ctx: JobContext) -> Transition:
    if o.retryable and ctx.may_retry:
        return _requeue(ctx, f"{o.code}: {o.message}")
    return Transition("failed", f"Job failed: {o.message}", level="error",
                      data={"code": o.code},
                      fields={"error_code": o.code, "error_message": o.message,
                              "measured_peak_memory": o.peak_memory},
                      event_always=True)


def _lost(o: Lost, ctx: JobContext) -> Transition:
    # Only a cancel the store holds: one sent but not stored cannot be (the API stores first).
    if ctx.cancel_in_store:
        return Transition("cancelled", f"Job cancelled ({o.reason})", event_always=True)
    if ctx.may_retry:
        return _requeue(ctx, o.reason)
    return Transition("failed", f"Job failed: {o.reason}", level="error",
                      fields={"error_code": "node_lost", "error_message": o.reason},
                      event_always=True)


def _cancel_overdue(o: CancelOverdue, ctx: JobContext) -> Transition:
    return Transition(
        "cancelled", f"Job cancelled: its runner on {ctx.node} did not stop within "
        f"{o.timeout:g} s of the cancel and was killed; its last stored checkpoint "
        f"(step {ctx.resume_step}) stays", level="warn")


def _service_stopped(o: ServiceStopped, ctx: JobContext) -> Transition:
    if ctx.cancel_in_store or ctx.cancel_sent:
        return Transition("cancelled", "Job cancelled (the service stopped)")
    # Not the node's fault: the retry may go back to the same node.
    return Transition(
        "queued", f"The service stopped; attempt {ctx.attempt + 1} on {ctx.node} was stopped "
        "and the job requeued from its last checkpoint", level="warn",
        fields={"node_id": None, "attempt": ctx.attempt + 1})


def _service_restarted(o: ServiceRestarted, ctx: JobContext) -> Transition:
    return Transition(
        "queued", f"The service restarted; attempt {ctx.attempt + 1} on {ctx.node} was stopped "
        "and the job requeued from its last checkpoint", level="warn",
        fields={"node_id": None, "attempt": ctx.attempt + 1})


# The table: one rule per kind of outcome. A `Completed` result is not in it on its own: the
# scheduler first stores the adapter, which turns it into AdapterStored or AdapterNotStored.
TRANSITIONS: dict[type, Callable[[Any, JobContext], Transition]] = {
    AdapterStored: _adapter_stored,
    AdapterNotStored: _adapter_not_stored,
    Stopped: _stopped,
    Failed: _failed,
    Lost: _lost,
    CancelOverdue: _cancel_overdue,
    ServiceStopped: _service_stopped,
    ServiceRestarted: _service_restarted,
}


def transition_for(outcome: Outcome, ctx: JobContext) -> Transition:
    """The job's next status and event for `outcome`; see the table above."""
    try:
        rule = TRANSITIONS[type(outcome)]
    except KeyError:
        raise TypeError(f"no transition for {type(outcome).__name__}") from None
    return rule(outcome, ctx)
