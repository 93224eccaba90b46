"""The scheduler loop: queued jobs in the store → Ray actors on nodes that fit → final states.

`RayExecutor` implements the API's `JobExecutor`. One background thread in the server process:

1. refreshes every NodeAgent's report (heartbeats; a node silent for `heartbeat_timeout` is
   offline and its jobs are handed back to the queue);
2. collects what each running job queued (events, checkpoint files) into the store and the
   artifact store, and ends jobs whose `run()` returned;
3. asks the placement policy where queued jobs go, and starts a `JobRunner` pinned (hard node
   affinity) to each chosen node, with the base model, data and resume checkpoint sent as Ray
   objects — never as paths.

Failures are sorted by who caused them: the job's own (bad data, diverging loss) fail it at
once; the infrastructure's (node lost, preempted, OOM on that node) requeue it from its last
checkpoint, up to `max_attempts`.

A cancel reaches a job in any phase: the runner is asked to stop (it checks between its own
loading phases and the trainer between steps); a runner that has not stopped `cancel_timeout`
seconds later (still loading, hung, or its process swamped) is killed and the job marked
`cancelled`. A cancel stored by the API while the job was being started is picked up from the
store on the next tick. A killed runner counts against its node's slots until Ray confirms it
is gone, so a storm of cancels never stacks new runners onto dying ones. No job is left
`running` without a runner: a lost runner requeues or ends its job, and `stop()` hands every
job still running back to the queue (or to `cancelled` when a cancel was asked).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from lorapool.types import Node

from ..artifacts import ArtifactError
from ..train.spec import DeviceInfo, TrainSpec
from .agent import NAMESPACE, agent_name, list_agents
from .background import BackgroundLoop
from .model_objects import ModelObjects
from .runner import RemoteJobRunner
from .transfer import content_id

log = logging.getLogger("lorapool.pool")

GiB = 1024**3


@dataclass
class _NodeState:
    name: str
    report: dict[str, Any]
    seen_at: float
    offline: bool = False
    handle: Any = None


@dataclass
class _Active:
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


@dataclass
class _Dying:
    """A runner that was killed: its node slot stays taken until Ray says it is gone."""

    node: str
    runner: Any
    probe: Any  # an ObjectRef that fails once the actor is dead
    since: float


def job_view(job_id: str, tenant: str, spec: TrainSpec, submitted_at: float,
             placement: Optional[dict[str, Any]]) -> Any:
    """The placement policy's view of a job: its spec plus the constraints it asked for."""
    from .placement import JobView

    p = placement or {}
    gib = p.get("min_memory_gib")
    return JobView(job_id=job_id, tenant=tenant, spec=spec, submitted_at=submitted_at,
                   priority=int(p.get("priority", 0)),
                   min_memory=int(gib * GiB) if gib else None,
                   labels=dict(p.get("labels") or {}),
                   node_id=p.get("node"),
                   require_bf16=bool(p.get("require_bf16", False)),
                   min_seq_len=p.get("min_seq_len"),
                   allow_autofit=bool(p.get("allow_autofit", True)))


def _fmt_gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


class RayExecutor(BackgroundLoop):
    """Drives jobs through the pool; see the module docstring."""

    thread_name = "lorapool-scheduler"

    def __init__(
        self,
        store: Any,
        artifacts: Any,
        *,
        placer: Any = None,
        poll_interval: float = 0.5,
        heartbeat_timeout: float = 20.0,
        node_refresh_interval: float = 1.0,
        max_attempts: int = 3,
        preempt_timeout: float = 30.0,
        cancel_timeout: float = 30.0,
        dying_timeout: float = 30.0,
        models: Optional[ModelObjects] = None,
    ) -> None:
        from .placement import Placer

        super().__init__(poll_interval)
        self.store = store
        self.artifacts = artifacts
        self.placer = placer or Placer()
        self.heartbeat_timeout = heartbeat_timeout
        self.node_refresh_interval = node_refresh_interval
        self.max_attempts = max_attempts
        self.preempt_timeout = preempt_timeout
        self.cancel_timeout = cancel_timeout
        self.dying_timeout = dying_timeout
        self._dying: dict[str, _Dying] = {}
        # One report call in flight per agent: a slow agent never gets a queue of them.
        self._report_refs: dict[str, Any] = {}
        self._refresh_lock = threading.Lock()
        # Nodes where each job's earlier attempts ended badly: a retry goes elsewhere if it can.
        self._failed_on: dict[str, set[str]] = {}
        self._nodes: dict[str, _NodeState] = {}
        self._active: dict[str, _Active] = {}
        self.models = models or ModelObjects()
        self._lock = threading.RLock()
        self._last_refresh = 0.0
        # What else each tenant runs on the pool now (the server sets it to the chats in
        # flight): counted with its running jobs when fair share orders the queue.
        self.tenant_load: Optional[Callable[[], dict[str, int]]] = None

    # -- JobExecutor ------------------------------------------------------------------------
    def on_start(self) -> None:
        self._recover()

    def cancel(self, job_id: str) -> None:
        with self._lock:
            active = self._active.get(job_id)
            if active is not None:
                active.stop_reason = active.stop_reason or "cancelled by user"
                first = active.cancel_at is None
                active.cancel_at = active.cancel_at or time.time()
        if active is not None and first:
            try:
                active.runner.request_stop.remote("cancelled by user")
            except Exception:  # a dead runner: the deadline in _poll_active ends the job
                pass
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop, then leave no job `running` without a runner: the runners go (this
        head owns them), and their jobs go back to the queue, or to `cancelled` if asked."""
        super().stop(timeout)
        with self._lock:
            actives = list(self._active.values())
        for a in actives:
            self._release(a)
            job = self.store.get_job(a.job_id)
            if job is not None and (job.cancel_requested or a.cancel_at is not None):
                if self.store.transition(a.job_id, {"running"}, "cancelled",
                                         finished_at=int(time.time())):
                    self.store.add_event(a.job_id, "Job cancelled (the service stopped)")
            elif self.store.transition(a.job_id, {"running"}, "queued", node_id=None,
                                       attempt=a.attempt + 1):
                self.store.add_event(
                    a.job_id, f"The service stopped; attempt {a.attempt + 1} on {a.node} was "
                    f"stopped and the job requeued from its last checkpoint", level="warn")

    def check_fits(self, spec: TrainSpec,
                   placement: Optional[dict[str, Any]] = None) -> Optional[str]:
        self._refresh_nodes(force=not self._nodes)
        views = self._node_views(include_busy=True)
        if not views:
            return None  # an empty pool may still get donors: the job waits
        job = job_view("(new)", "", spec, time.time(), placement)
        return self.placer.check_fits(job, views)

    def nodes(self) -> list[Node]:
        self._refresh_nodes(force=not self._nodes)
        with self._lock:
            states = list(self._nodes.values())
            active = list(self._active.values())
        out = []
        for st in states:
            r, dev = st.report, st.report.get("device", {})
            cc = dev.get("compute_capability")
            out.append(Node(
                id=r.get("node_id", st.name),
                name=st.name,
                gpu_name=dev.get("name"),
                compute_capability=f"{cc[0]}.{cc[1]}" if cc and dev.get("kind") == "cuda" else None,
                bf16=bool(dev.get("kind") == "cuda" and cc and tuple(cc) >= (8, 0)),
                total_memory_bytes=int(dev.get("total_memory") or 0),
                free_memory_bytes=int(r.get("free_memory") or 0),
                reserved_memory_bytes=int(r.get("reserved_memory") or 0),
                state="offline" if st.offline else r.get("state", "idle"),
                jobs=sorted(a.job_id for a in active if a.node == st.name),
                labels=r.get("labels", {}),
                datasets=r.get("dataset_info", []),  # counts and errors only, never content
                last_heartbeat=st.seen_at,
                speed=r.get("speed_tflops"),
            ))
        return out

    # -- the loop ---------------------------------------------------------------------------
    def tick(self) -> None:
        self._refresh_nodes()
        self._reap_dying()
        self._sync_cancels()
        self._poll_active()
        self._schedule()

    def _recover(self) -> None:
        """Jobs the store says are running but no runner of ours drives: back to the queue."""
        agents = None
        for job in self.store.jobs_in_status("running"):
            if job.id in self._active:
                continue
            self._kill_runner_named(job.id)
            # Its node still counts the old runner's memory as reserved: free it.
            agents = list_agents() if agents is None else agents
            for handle in agents.values():
                handle.unregister_job.remote(job.id)
            if self.store.transition(job.id, {"running"}, "queued", node_id=None,
                                     attempt=(job.attempt or 0) + 1):
                self.store.add_event(job.id, f"The service restarted; attempt "
                                     f"{(job.attempt or 0) + 1} on {job.node_id} was stopped and "
                                     "the job requeued from its last checkpoint", level="warn")

    # -- nodes ------------------------------------------------------------------------------
    def _refresh_nodes(self, force: bool = False) -> None:
        # The API's threads may ask too (check_fits, nodes): one refresh at a time.
        with self._refresh_lock:
            self._refresh_nodes_locked(force)

    def _refresh_nodes_locked(self, force: bool) -> None:
        now = time.time()
        if not force and now - self._last_refresh < self.node_refresh_interval:
            return
        self._last_refresh = now
        agents = list_agents()
        refs = {}
        for name, handle in agents.items():
            ref = self._report_refs.get(name)
            if ref is None:
                ref = self._report_refs[name] = handle.report.remote()
            refs[name] = ref
        for name in set(self._report_refs) - set(agents):
            self._report_refs.pop(name, None)
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=2.0) if refs else ([], [])
        ready_set = set(ready)
        with self._lock:
            for name, ref in refs.items():
                if ref in ready_set:
                    self._report_refs.pop(name, None)
                    try:
                        report = ray.get(ref)
                    except Exception:
                        continue
                    st = self._nodes.get(name)
                    if st is None:
                        log.info("node %s joined", name)
                    self._nodes[name] = _NodeState(name, report, now, False, agents[name])
            for name, st in self._nodes.items():
                if not st.offline and now - st.seen_at > self.heartbeat_timeout:
                    st.offline = True
                    log.warning("node %s is offline (no heartbeat for %.0f s)", name,
                                now - st.seen_at)

    def _node_views(self, include_busy: bool = False) -> list[Any]:
        from .placement import NodeView

        views = []
        with self._lock:
            for st in self._nodes.values():
                if st.offline:
                    continue
                r = st.report
                dev = DeviceInfo(**r["device"])
                promised = sum(
                    a.estimate for a in self._active.values()
                    if a.node == st.name and (a.job_id not in r.get("jobs", ())
                                              or (not a.stepped and dev.kind == "cuda"
                                                  and r.get("reserved_memory", 0) == 0))
                )
                views.append(NodeView(
                    node_id=st.name,
                    name=st.name,
                    device=dev,
                    free_memory=int(r["free_memory"]),
                    promised=promised,
                    labels=dict(r.get("labels", {})),
                    accepting=bool(r.get("accepting", True)) or include_busy,
                    running_jobs=(sum(1 for a in self._active.values() if a.node == st.name)
                                  + sum(1 for d in self._dying.values() if d.node == st.name)),
                    max_jobs=(int(r["cpu_slots"]) if dev.kind == "cpu" and r.get("cpu_slots")
                              else None),
                    # Measured at join and while idle by the NodeAgent: placement by speed.
                    speed=r.get("speed_tflops"),
                ))
        return views

    # -- running jobs -----------------------------------------------------------------------
    def _poll_active(self) -> None:
        with self._lock:
            actives = list(self._active.values())
        # Every runner is asked at once and answers within one shared timeout: dozens of runners
        # still starting must not cost a timeout each.
        drains = {a.job_id: a.runner.drain.remote() for a in actives}
        ready, _ = (ray.wait(list(drains.values()), num_returns=len(drains), timeout=10)
                    if drains else ([], []))
        ready_set = set(ready)
        for a in actives:
            node = self._nodes.get(a.node)
            if self._cancel_overdue(a):
                continue
            if drains[a.job_id] not in ready_set:
                if node is not None and node.offline:
                    self._lost(a, f"node {a.node} stopped sending heartbeats")
                continue
            try:
                items = ray.get(drains[a.job_id])
            except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as exc:
                self._lost(a, f"node {a.node} lost ({type(exc).__name__})")
                continue
            except ray.exceptions.RayTaskError as exc:
                self._lost(a, f"runner on {a.node} failed ({exc})")
                continue
            for item in items:
                self._absorb(a, item)
            ready, _ = ray.wait([a.run_ref], timeout=0)
            if ready:
                try:
                    result = ray.get(a.run_ref)
                except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as exc:
                    self._lost(a, f"node {a.node} lost ({type(exc).__name__})")
                    continue
                except ray.exceptions.RayTaskError as exc:
                    result = {"status": "failed", "code": "internal_error", "message": str(exc),
                              "retryable": True}
                self._finish(a, result)
            elif node is not None and node.offline:
                self._lost(a, f"node {a.node} stopped sending heartbeats")
            elif node is not None and node.report.get("state") == "reclaimed":
                self._enforce_preemption(a)
            else:
                a.preempted_at = None  # the owner left again before the deadline

    def _sync_cancels(self) -> None:
        """Cancels the API stored while the job was being started (before it was active here)
        reach its runner now."""
        with self._lock:
            if not self._active:
                return
            waiting = {j for j, a in self._active.items() if a.cancel_at is None}
        if not waiting:
            return
        for job in self.store.jobs_in_status("running"):
            if job.id in waiting and job.cancel_requested:
                self.cancel(job.id)

    def _cancel_overdue(self, a: _Active) -> bool:
        """A cancelled job whose runner has not stopped within `cancel_timeout` (loading,
        hung, swamped): kill the runner and end the job `cancelled`. True when it did."""
        if a.cancel_at is None or time.time() - a.cancel_at <= self.cancel_timeout:
            return False
        ready, _ = ray.wait([a.run_ref], timeout=0)
        if ready:  # it did stop (or fail) after all: let _poll_active read its result
            return False
        self._release(a)
        if self.store.transition(a.job_id, {"running"}, "cancelled",
                                 finished_at=int(time.time())):
            self.store.add_event(
                a.job_id, f"Job cancelled: its runner on {a.node} did not stop within "
                f"{self.cancel_timeout:g} s of the cancel and was killed; its last stored "
                f"checkpoint (step {max(a.last_checkpoint_step, 0)}) stays", level="warn")
        self._forget_if_done(a.job_id)
        self._wake.set()
        return True

    def _reap_dying(self) -> None:
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

    def _kill(self, job_id: str, node: str, runner: Any, run_ref: Any = None) -> None:
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
            self._dying[job_id] = _Dying(node, runner, probe, time.time())

    def _enforce_preemption(self, a: _Active) -> None:
        """A reclaimed node asked its job to checkpoint and stop; past `preempt_timeout` the
        job is killed and resumes, elsewhere, from its last periodic checkpoint."""
        now = time.time()
        if a.preempted_at is None:
            a.preempted_at = now
            return
        if now - a.preempted_at > self.preempt_timeout:
            self._lost(a, f"preempted on {a.node} and did not stop within "
                       f"{self.preempt_timeout:g} s; killed")

    def _absorb(self, a: _Active, item: dict[str, Any]) -> None:
        ev = item.get("event") or {}
        kind = ev.get("type")
        if kind == "step":
            a.stepped = True
            metrics = {k: ev.get(k) for k in ("step", "total_steps", "loss", "lr", "grad_norm",
                                               "tokens_per_s", "memory_allocated", "memory_peak")}
            metrics["train_loss"] = ev.get("loss")
            msg = (f"Step {ev.get('step')}/{ev.get('total_steps')}: training loss="
                   f"{ev.get('loss'):.4f}" if ev.get("loss") is not None else ev.get("message", ""))
            self.store.add_event(a.job_id, msg, type="metrics", data=metrics)
            self.store.update_job(a.job_id, step=ev.get("step"), total_steps=ev.get("total_steps"))
        elif kind == "eval":
            data = {"step": ev.get("step"), "valid_loss": ev.get("loss"), **(ev.get("data") or {})}
            self.store.add_event(a.job_id, ev.get("message") or
                                 f"Step {ev.get('step')}: validation loss={ev.get('loss')}",
                                 type="metrics", data=data)
        elif kind == "checkpoint" and item.get("files"):
            self._save_checkpoint(a, int(ev.get("step") or 0), item["files"],
                                  {"train_loss": ev.get("loss")})
        elif kind:
            level = "warn" if kind == "warning" else "info"
            if ev.get("message"):
                self.store.add_event(a.job_id, ev["message"], level=level,
                                     data=ev.get("data") or None)

    def _save_checkpoint(self, a: _Active, step: int, files: dict[str, bytes],
                         metrics: dict[str, Any]) -> None:
        if step <= a.last_checkpoint_step:
            return
        try:
            artifact_id = self.artifacts.put_files(files)
        except ArtifactError as exc:
            # The job trains on; the older checkpoints stay as they were.
            log.warning("checkpoint of %s at step %d not stored: %s", a.job_id, step, exc)
            self.store.add_event(
                a.job_id, f"Checkpoint at step {step} could not be stored ({exc}); the last "
                f"stored checkpoint (step {max(a.last_checkpoint_step, 0)}) stays", level="warn",
                data={"step": step, "code": "storage_error"})
            return
        self.store.add_checkpoint(a.job_id, step, artifact_id,
                                  {k: v for k, v in metrics.items() if v is not None})
        a.last_checkpoint_step = step
        self.store.add_event(a.job_id, f"Checkpoint saved at step {step}",
                             data={"step": step, "artifact": artifact_id})


    def _release(self, a: _Active) -> None:
        with self._lock:
            self._active.pop(a.job_id, None)
        st = self._nodes.get(a.node)
        if st is not None and st.handle is not None:
            try:
                st.handle.unregister_job.remote(a.job_id)
            except Exception:
                pass
        self._kill(a.job_id, a.node, a.runner, a.run_ref)

    def _finish(self, a: _Active, result: dict[str, Any]) -> None:
        self._release(a)
        status = result.get("status")
        job = self.store.get_job(a.job_id)
        peak = result.get("peak_memory")
        if status == "completed":
            metrics = result.get("metrics") or {}
            try:
                artifact_id = self.artifacts.put_files(result["adapter_files"])
            except ArtifactError as exc:
                self.store.transition(a.job_id, {"running"}, "failed",
                                      finished_at=int(time.time()), error_code="storage_error",
                                      error_message=f"the adapter could not be stored: {exc}",
                                      measured_peak_memory=peak)
                self.store.add_event(a.job_id, f"Job failed: the adapter could not be stored "
                                     f"({exc}); its checkpoints stay downloadable", level="error")
                self._wake.set()
                return
            size = sum(len(b) for b in result["adapter_files"].values())
            adapter = self.store.add_adapter(
                tenant=a.tenant,
                base_model=job.model,
                base_model_sha256=getattr(job, "model_sha256", None),
                job_id=a.job_id,
                artifact_id=artifact_id,
                bytes=size,
                sha256=content_id(result["adapter_files"]),
                metrics=metrics,
            )
            self.store.transition(
                a.job_id, {"running"}, "succeeded", finished_at=int(time.time()),
                fine_tuned_model=adapter.id, adapter_id=adapter.id,
                trained_tokens=metrics.get("trained_tokens"),
                measured_peak_memory=peak, step=result.get("step"),
            )
            self.store.add_event(a.job_id, f"Training finished: adapter {adapter.id}",
                                 data={k: v for k, v in metrics.items()
                                       if isinstance(v, (int, float, str))})
        elif status == "stopped":
            if result.get("checkpoint_files"):
                self._save_checkpoint(a, int(result.get("step") or 0), result["checkpoint_files"], {})
            cancelled = (a.stop_reason == "cancelled by user"
                         or bool(getattr(job, "cancel_requested", False)))
            if cancelled:
                self.store.transition(a.job_id, {"running"}, "cancelled",
                                      finished_at=int(time.time()), measured_peak_memory=peak)
                self.store.add_event(a.job_id, f"Job cancelled at step {result.get('step')}; "
                                     "its last checkpoint stays downloadable")
            else:
                self._requeue(a, result.get("stop_reason") or "stopped by its node")
        else:
            code = result.get("code", "internal_error")
            message = result.get("message", "training failed")
            if result.get("retryable") and a.attempt + 1 < self.max_attempts:
                self._requeue(a, f"{code}: {message}")
            else:
                self.store.transition(a.job_id, {"running"}, "failed",
                                      finished_at=int(time.time()), error_code=code,
                                      error_message=message, measured_peak_memory=peak)
                self.store.add_event(a.job_id, f"Job failed: {message}", level="error",
                                     data={"code": code})
        self._forget_if_done(a.job_id)
        self._wake.set()

    def _forget_if_done(self, job_id: str) -> None:
        """A job that reached an end state needs no memory of where it failed."""
        job = self.store.get_job(job_id)
        if job is None or job.status in ("succeeded", "failed", "cancelled"):
            self._failed_on.pop(job_id, None)

    def _requeue(self, a: _Active, reason: str) -> None:
        self._failed_on.setdefault(a.job_id, set()).add(a.node)
        if self.store.transition(a.job_id, {"running"}, "queued", node_id=None,
                                 attempt=a.attempt + 1):
            self.store.add_event(
                a.job_id,
                f"Attempt {a.attempt + 1} ended on {a.node}: {reason}; requeued from the last "
                f"checkpoint (step {max(a.last_checkpoint_step, 0)})",
                level="warn", data={"reason": reason, "attempt": a.attempt + 1,
                                    "resume_step": max(a.last_checkpoint_step, 0)},
            )

    def _lost(self, a: _Active, reason: str) -> None:
        self._release(a)
        job = self.store.get_job(a.job_id)
        if getattr(job, "cancel_requested", False):
            self.store.transition(a.job_id, {"running"}, "cancelled", finished_at=int(time.time()))
            self.store.add_event(a.job_id, f"Job cancelled ({reason})")
        elif a.attempt + 1 < self.max_attempts:
            self._requeue(a, reason)
        else:
            self.store.transition(a.job_id, {"running"}, "failed", finished_at=int(time.time()),
                                  error_code="node_lost", error_message=reason)
            self.store.add_event(a.job_id, f"Job failed: {reason}", level="error")
        self._forget_if_done(a.job_id)

    def _kill_runner_named(self, job_id: str) -> None:
        try:
            ray.kill(ray.get_actor(f"lorapool-job:{job_id}", namespace=NAMESPACE), no_restart=True)
        except Exception:
            pass

    # -- placing queued jobs ---------------------------------------------------------------
    def _schedule(self) -> None:
        with self._lock:
            active_ids = set(self._active)
        queued = [j for j in self.store.jobs_in_status("queued") if j.id not in active_ids]
        if not queued:
            return
        views = self._node_views()
        if not views:
            return
        jobs = []
        for j in queued:
            try:
                spec = self._head_spec(j)
            except Exception as exc:
                self.store.transition(j.id, {"queued"}, "failed", finished_at=int(time.time()),
                                      error_code="model_not_found", error_message=str(exc))
                continue
            view = job_view(j.id, j.tenant, spec, float(j.created_at), j.placement)
            avoid = self._failed_on.get(j.id)
            if avoid:
                view = dataclasses.replace(view, avoid_nodes=frozenset(avoid))
            jobs.append(view)
        running_by_tenant: dict[str, int] = {}
        with self._lock:
            for a in self._active.values():
                running_by_tenant[a.tenant] = running_by_tenant.get(a.tenant, 0) + 1
        if self.tenant_load is not None:
            for tenant, n in self.tenant_load().items():
                running_by_tenant[tenant] = running_by_tenant.get(tenant, 0) + n
        by_id = {j.id: j for j in queued}
        for placement in self.placer.plan(jobs, views, running_by_tenant):
            try:
                self._start(by_id[placement.job_id], placement)
            except Exception as exc:
                log.exception("could not start %s", placement.job_id)
                self.store.add_event(placement.job_id, f"Could not start on {placement.node_id}: "
                                     f"{exc}", level="warn")

    def _head_spec(self, job: Any) -> TrainSpec:
        model = self.store.get_model(job.model)
        if model is None:
            raise LookupError(f"model {job.model!r} is no longer registered")
        fields = dict(job.spec)
        fields["base_model"] = str(model.path)
        return TrainSpec(**fields)

    def _model_payload(self, model: Any) -> dict[str, Any]:
        return self.models.payload(model)

    def _file_payload(self, file_id: Optional[str]) -> Optional[dict[str, Any]]:
        if not file_id:
            return None
        rec = self.store.get_file(file_id)
        data = self.artifacts.read_bytes(rec.artifact_id)
        return {"key": rec.sha256, "files": {"data.jsonl": ray.put(data)}, "entry": "data.jsonl"}

    def _resume_payload(self, job_id: str) -> tuple[Optional[dict[str, Any]], int]:
        checkpoints = self.store.list_checkpoints(job_id)
        if not checkpoints:
            return None, 0
        last = max(checkpoints, key=lambda c: c.step)
        return self._folder_payload(last.artifact_id), last.step

    def _folder_payload(self, artifact_id: str) -> dict[str, Any]:
        """A stored folder (checkpoint, adapter) as Ray objects, keyed by its content id."""
        return {"key": artifact_id.replace(":", "-"),
                "files": {n: ray.put(b) for n, b in self.artifacts.read_files(artifact_id).items()}}

    def _build_payload(self, job: Any, placement: Any) -> tuple[dict[str, Any], int]:
        """What travels to the node: data and object refs, never a path of the head's."""
        model = self.store.get_model(job.model)
        resume, resume_step = self._resume_payload(job.id)
        spec_fields = placement.spec.model_dump(mode="json")
        spec_fields.pop("base_model")
        payload = {
            "spec": spec_fields,
            "model": self._model_payload(model),
            "data": self._file_payload(job.training_file),
            "validation": self._file_payload(job.validation_file),
            "resume": resume,
            "attempt": int(getattr(job, "attempt", 0) or 0),
            # A node-local data set travels by name only; the runner opens it on its node.
            "dataset": (getattr(job, "dataset", None) or {}).get("name"),
            "init_adapter": self._adapter_payload(getattr(job, "init_adapter", None)),
        }
        return payload, resume_step

    def _adapter_payload(self, adapter_id: Optional[str]) -> Optional[dict[str, Any]]:
        """An adapter to start from, as bytes like a resume checkpoint (federated rounds)."""
        if not adapter_id:
            return None
        return self._folder_payload(self.store.get_adapter(adapter_id).artifact_id)

    def _start(self, job: Any, placement: Any) -> None:
        st = self._nodes[placement.node_id]
        payload, resume_step = self._build_payload(job, placement)
        resume = payload["resume"]
        attempt = payload["attempt"]
        node_id = st.report["node_id"]
        self._kill_runner_named(job.id)
        workers = int((getattr(job, "placement", None) or {}).get("workers") or 1)
        if workers > 1:  # issue 10 hook: a data-parallel job (service/pool/distributed.py)
            from .distributed import start_distributed_runner

            with self._lock:
                reports = [(n.name, n.report, n.offline) for n in self._nodes.values()]
            runner = start_distributed_runner(job.id, job.placement, st.name, reports,
                                              agent_name, NAMESPACE,
                                              estimate_base_model=placement.spec.base_model)
            payload["device_kind"] = st.report["device"].get("kind", "cuda")
        else:
            runner = RemoteJobRunner.options(
                name=f"lorapool-job:{job.id}",
                namespace=NAMESPACE,
                num_cpus=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
            ).remote(job.id, agent_name(st.name))
        estimate = int(placement.estimate.total)
        try:
            registered = ray.get(st.handle.register_job.remote(job.id, runner, estimate),
                                 timeout=10)
        except Exception:
            registered = False
        if not registered:  # reclaimed, or the node's slots are full: it waits in the queue
            self._kill(job.id, st.name, runner)
            return
        if not self.store.transition(
            job.id, {"queued"}, "running", node_id=st.name, started_at=int(time.time()),
            predicted_memory=estimate, memory_breakdown=dict(placement.estimate.breakdown),
        ):
            # Cancelled while we were placing it.
            st.handle.unregister_job.remote(job.id)
            self._kill(job.id, st.name, runner)
            return
        run_ref = runner.run.remote(payload)
        active = _Active(job.id, job.tenant, st.name, runner, run_ref, estimate, attempt,
                         time.time(), last_checkpoint_step=resume_step - 1 if resume else -1)
        with self._lock:
            self._active[job.id] = active
        # A cancel the API stored between our transition and now found no active job: honour it.
        if getattr(self.store.get_job(job.id), "cancel_requested", False):
            self.cancel(job.id)
        dev = st.report["device"]
        msg = (f"Attempt {attempt + 1} placed on {st.name} ({dev.get('name')}, "
               f"{_fmt_gib(int(st.report['free_memory']))} free); predicted peak "
               f"{_fmt_gib(estimate)}")
        if resume:
            msg += f"; resuming from step {resume_step}"
        # placed_at to the microsecond: event times are whole seconds, too coarse to order
        # placements that a burst makes within one second.
        self.store.add_event(job.id, msg, data={"node": st.name, "predicted_memory": estimate,
                                                "resume_step": resume_step if resume else None,
                                                "placed_at": active.started_at})
        for change in placement.changes:
            self.store.add_event(job.id, f"Auto-fit: {change}", level="warn")
