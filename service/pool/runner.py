"""The Ray actor that runs one job attempt on one node.

A `JobRunner` lives on the node the scheduler chose (its NodeAgent creates it there). It
materialises the base model, data and resume checkpoint from the payload into the node's own
cache, calls the trainer, and queues what the head must see — events, checkpoint files, the
adapter — for the head to collect with `drain()`. It never opens a path of the head's.

The runner is a threaded actor: `run()` trains in one thread while `drain()` and
`request_stop()` answer in others.

A stop request is honoured in every phase: before and between fetching the model, data and
checkpoint; during the trainer's setup (loading the base model, tokenizing), where the next
status event the trainer emits ends the run; and between steps, where the trainer checkpoints
first. Until the first step there is nothing new to save, so stopping there loses nothing. (The
scheduler still kills a runner that does not stop in time: a load can block for minutes.)
"""

from __future__ import annotations

import threading
import time
import traceback
from pathlib import Path
from typing import Any, Optional

import ray

from .outcomes import Completed, Failed, RunnerEvent, RunnerItem, RunResult, Stopped
from .transfer import materialise, read_folder

# Everything the head sends in a payload is data, not paths on the head:
#   spec: TrainSpec fields (base_model is replaced with the node-local path here)
#   model / data / validation / resume: {"key": content id, "files": {relpath: ObjectRef|bytes},
#                                        "entry": relpath of the file to use (gguf / jsonl)}
#   attempt: int
# (payloads.py builds it: `Payload`.) What goes back is typed (outcomes.py): `drain()` returns
# `RunnerItem`s and `run()` a `RunResult` (`Completed`, `Stopped` or `Failed`).


class _StopNow(BaseException):
    """Raised from the event callback to leave the trainer's setup at once. A BaseException, as
    the trainer's event sink rightly swallows a callback's ordinary errors."""


def _fetch(value: Any) -> bytes:
    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


class RunnerMailbox:
    """The head-facing half of a job runner (single- or multi-worker): a stop request the run
    obeys at its next step boundary, and an outbox of events and files the scheduler drains."""

    def _init_mailbox(self) -> None:
        self._lock = threading.Lock()
        # RunnerItems, from the single- and the multi-worker runner alike.
        self._outbox: list[Any] = []
        self._stop_reason: Optional[str] = None

    def request_stop(self, reason: str, node: Optional[str] = None) -> None:
        """Checkpoint and stop at the next step boundary. `node`: the Ray node whose agent asks
        (its owner reclaimed it); a single-node runner stops either way."""
        with self._lock:
            if self._stop_reason is None:
                self._stop_reason = reason

    def drain(self) -> list[Any]:
        """Everything queued since the last call (events and checkpoint files)."""
        with self._lock:
            out, self._outbox = self._outbox, []
        return out

    def pid(self, node: Optional[str] = None) -> int:
        """The training process (on `node`, for a runner with workers on several), so the
        NodeAgent does not mistake it for the owner's."""
        import os

        return os.getpid()


class JobRunner(RunnerMailbox):
    """Runs one attempt of one job; see the module docstring."""

    def __init__(self, job_id: str, agent_name: str) -> None:
        from .agent import NAMESPACE

        self.job_id = job_id
        # The node-local folder comes from this node's agent, never from the head.
        agent = ray.get_actor(agent_name, namespace=NAMESPACE)
        local = ray.get(agent.local_config.remote())
        self.work_dir = Path(local["work_dir"])
        self.device_kind = local["device_kind"]
        self.datasets: dict[str, str] = local["datasets"]
        self.cpu_threads: Optional[int] = local.get("cpu_threads")
        self._init_mailbox()
        self._peak_memory: Optional[int] = None

    # -- called by the head / the NodeAgent: request_stop, drain, pid (RunnerMailbox) -------
    def run(self, payload: dict[str, Any]) -> RunResult:
        """Train; return `Completed` (with the adapter's files), `Stopped` or `Failed`."""
        try:
            return self._run(payload)
        except Exception as exc:  # report every failure to the head as data, with its code
            from ..train.errors import TrainError

            if isinstance(exc, TrainError):
                return Failed(code=exc.code, message=exc.message, retryable=exc.retryable)
            return Failed(code="internal_error", message=f"{type(exc).__name__}: {exc}",
                          retryable=True, traceback=traceback.format_exc(limit=20))

    # -- internals ------------------------------------------------------------------------
    def _put(self, item: RunnerItem) -> None:
        with self._lock:
            self._outbox.append(item)

    def _materialise(self, kind: str, blob: Optional[dict[str, Any]]) -> Optional[Path]:
        if not blob:
            return None
        folder = materialise(self.work_dir / "cache" / kind, blob["key"], blob["files"], _fetch)
        entry = blob.get("entry")
        return folder / entry if entry else folder

    def _local_dataset(self, name: Optional[str]) -> Optional[Path]:
        """A node-local data set by name, from this node's own config (never from the head)."""
        if not name:
            return None
        from ..train.errors import DataError

        path = self.datasets.get(name)
        if path is None or not Path(path).is_file():
            raise DataError(f"node-local data set {name!r} is not offered on this node "
                            "(any more)", code="dataset_not_found")
        return Path(path)

    def _stopped_early(self, started: float) -> Stopped:
        """The result of a run stopped before its first step: nothing was trained or saved."""
        return Stopped(step=0, total_steps=None, metrics={}, stop_reason=self._stop_reason,
                       seconds=time.time() - started, peak_memory=self._peak_memory,
                       phase="setup")

    def _run(self, payload: dict[str, Any]) -> RunResult:
        started = time.time()
        # Checked before each phase: a job cancelled while queued for this runner's process, or
        # while its model arrives, never imports torch or loads anything.
        if self._stop_reason is not None:
            return self._stopped_early(started)
        model_path = self._materialise("models", payload["model"])
        if self._stop_reason is not None:
            return self._stopped_early(started)
        data_path = self._local_dataset(payload.get("dataset")) or self._materialise(
            "data", payload["data"])
        init_adapter = self._materialise("adapters", payload.get("init_adapter"))
        val_path = self._materialise("data", payload.get("validation"))
        resume = self._materialise("checkpoints", payload.get("resume"))
        if self._stop_reason is not None:
            return self._stopped_early(started)

        from ..train import MemoryBudget, SplitSpec, TrainEvent, TrainSpec, train

        if self._stop_reason is not None:  # importing torch can take a while on a busy node
            return self._stopped_early(started)

        spec_fields = dict(payload["spec"])
        spec_fields["base_model"] = str(model_path)
        if init_adapter is not None:
            spec_fields["init_adapter"] = str(init_adapter)
        if self.device_kind == "cpu" or spec_fields.get("device") == "cpu":
            spec_fields["device"] = "cpu"
        spec = TrainSpec(**spec_fields)
        if spec.device == "cpu" and self.cpu_threads:
            import torch

            torch.set_num_threads(self.cpu_threads)
        out_dir = self.work_dir / "jobs" / self.job_id / f"attempt-{payload.get('attempt', 0)}"

        stepped = False

        def on_event(event: TrainEvent) -> None:
            nonlocal stepped
            stepped = stepped or event.type == "step"
            if not stepped and event.type == "status" and self._stop_reason is not None:
                raise _StopNow()
            if event.memory_peak:
                self._peak_memory = max(self._peak_memory or 0, int(event.memory_peak))
            files = None
            if event.type == "checkpoint" and event.path:
                # Checkpoints leave the node as they are written: losing the node then loses
                # at most `checkpoint_every` steps.
                files = read_folder(event.path)
            self._put(RunnerItem(RunnerEvent.from_train_event(event), files))

        def should_stop() -> bool:
            return self._stop_reason is not None

        try:
            result = train(
                spec,
                data_path,
                out_dir,
                validation_data=val_path,
                on_event=on_event,
                resume_from=resume,
                should_stop=should_stop,
                cache_dir=self.work_dir / "cache",
                memory_budget=MemoryBudget(**budget) if (budget := payload.get("memory_budget"))
                else None,
                # A job split over several GPUs of this node (multi_gpu.py); absent: one card.
                split=SplitSpec(**split) if (split := payload.get("split")) else None,
            )
        except _StopNow:
            return self._stopped_early(started)
        common: dict[str, Any] = dict(
            step=result.step, total_steps=result.total_steps, metrics=result.metrics,
            stop_reason=self._stop_reason, seconds=time.time() - started,
            peak_memory=self._peak_memory or result.metrics.get("peak_memory_bytes"))
        if result.status == "completed":
            if result.adapter_dir is None:  # the trainer always writes one; never trust it blindly
                return Failed(code="internal_error", retryable=True,
                              message="training completed without an adapter", **common)
            return Completed(adapter_files=read_folder(result.adapter_dir), **common)
        # The head may already hold it from the checkpoint event; it deduplicates by step.
        return Stopped(checkpoint_files=(read_folder(result.last_checkpoint)
                                         if result.last_checkpoint is not None else None),
                       **common)


RemoteJobRunner = ray.remote(max_concurrency=4)(JobRunner)
