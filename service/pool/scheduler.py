"""The scheduler loop: queued jobs in the store → Ray actors on nodes that fit → final states.

`RayExecutor` implements the API's `JobExecutor`. One background thread in the server process
ties four parts together, each in its own module:

- node_registry.py — `NodeRegistry`: every NodeAgent's report (heartbeats; a node silent for
  `heartbeat_timeout` is offline and its jobs are handed back to the queue), the placement
  policy's `NodeView`s and the API's `Node` list;
- active_jobs.py — `ActiveJobs`: the attempts running now and the killed runners whose node
  slots are not free yet (kill, reap);
- outcomes.py — the typed messages a runner sends (`RunnerItem` from `drain()`, `RunResult`:
  `Completed` / `Stopped` / `Failed` from `run()`) and the outcome → transition table that
  decides each ending's status, event and whether the job is requeued;
- payloads.py — `PayloadBuilder`: what travels to a node (base model, data, resume checkpoint,
  starting adapter) as Ray objects — never as paths.

Each tick: refresh the node reports; reap dead runners; pass on cancels; collect what each
running job queued (events, checkpoint files) into the store and the artifact store, and end
jobs whose `run()` returned, through the table; then ask the placement policy where queued jobs
go, and start a `JobRunner` pinned (hard node affinity) to each chosen node. Queued jobs that
no single card of the pool could ever hold go to split_placement.py first: one runner holding
several GPUs of one idle node, which takes no other job while it runs.

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
from typing import Any, Callable, Optional

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from lorapool.types import Node

from ..artifacts import ArtifactError
from ..train.spec import TrainSpec
from .active_jobs import ActiveJob, ActiveJobs
from .agent import NAMESPACE, agent_name, list_agents
from .background import BackgroundLoop
from .job_views import DataSize, JobViews
from .model_objects import ModelObjects
from .node_registry import NodeRegistry
from .outcomes import (
    CANCELLED_BY_USER,
    AdapterNotStored,
    AdapterStored,
    CancelOverdue,
    Completed,
    Failed,
    JobContext,
    Lost,
    Outcome,
    RunnerItem,
    RunResult,
    ServiceRestarted,
    ServiceStopped,
    Stopped,
    result_from_wire,
    transition_for,
)
from .payloads import Payload, PayloadBuilder
from .runner import RemoteJobRunner
from .split_placement import SplitPlacement, plan_splits, split_nodes, submit_check
from .transfer import content_id

log = logging.getLogger("lorapool.pool")

GiB = 1024**3
SPLIT_NOTES_KEPT = 16  # check_fits answers kept for submit_note (requests in flight at once)


def job_view(job_id: str, tenant: str, spec: TrainSpec, submitted_at: float,
             placement: Optional[dict[str, Any]], *, tokens: Optional[float] = None,
             model_key: Optional[str] = None, model_bytes: Optional[int] = None) -> Any:
    """The placement policy's view of a job: its spec plus the constraints it asked for, its
    estimated training tokens, and its base model's content id and size (job_views.py)."""
    from .placement import JobView

    p = placement or {}
    gib = p.get("min_memory_gib")
    return JobView(job_id=job_id, tenant=tenant, spec=spec, submitted_at=submitted_at,
                   tokens=tokens, model_key=model_key, model_bytes=model_bytes,
                   priority=int(p.get("priority", 0)),
                   min_memory=int(gib * GiB) if gib else None,
                   labels=dict(p.get("labels") or {}),
                   node_id=p.get("node"),
                   require_bf16=bool(p.get("require_bf16", False)),
                   min_seq_len=p.get("min_seq_len"),
                   allow_autofit=bool(p.get("allow_autofit", True)))


def _fmt_gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def _kill_runner_named(job_id: str) -> None:
    """A runner of an earlier attempt (or an earlier head) may still hold the job's name."""
    try:
        ray.kill(ray.get_actor(f"lorapool-job:{job_id}", namespace=NAMESPACE), no_restart=True)
    except Exception:
        pass


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
        self.max_attempts = max_attempts
        self.preempt_timeout = preempt_timeout
        self.cancel_timeout = cancel_timeout
        self.registry = NodeRegistry(heartbeat_timeout=heartbeat_timeout,
                                     refresh_interval=node_refresh_interval)
        self.active = ActiveJobs(dying_timeout=dying_timeout)
        self.models = models or ModelObjects()
        self.payloads = PayloadBuilder(store, artifacts, self.models)
        # Queued jobs' views, reused across passes.
        self.job_views = JobViews(job_view, data_size=self._data_size)
        self._data_sizes: dict[str, Optional[DataSize]] = {}  # file id → its size (immutable)
        # Nodes where each job's earlier attempts ended badly: a retry goes elsewhere if it can.
        self._failed_on: dict[str, set[str]] = {}
        # What else each tenant runs on the pool now (the server sets it to the chats in
        # flight): counted with its running jobs when fair share orders the queue.
        self.tenant_load: Optional[Callable[[], dict[str, int]]] = None
        # Queued jobs no single card holds (split_placement.py), by job id: (the pool's node
        # sizes it was decided for, the answer); and the last "why it waits" each one was told.
        self._needs_split: dict[str, tuple[Any, bool]] = {}
        self._split_said: dict[str, str] = {}
        # check_fits' accepted split answers, (spec, placement, message), for submit_note.
        self._split_notes: list[tuple[TrainSpec, dict[str, Any], str]] = []
        self._notes_lock = threading.Lock()

    @property
    def _active(self) -> dict[str, ActiveJob]:
        """The running attempts by job id (a snapshot; bench/api_load.py reads it)."""
        return self.active.as_dict()

    # -- JobExecutor ------------------------------------------------------------------------
    def on_start(self) -> None:
        self._recover()

    def cancel(self, job_id: str) -> None:
        active, first = self.active.mark_cancel(job_id, CANCELLED_BY_USER)
        if active is not None and first:
            try:
                active.runner.request_stop.remote(CANCELLED_BY_USER)
            except Exception:  # a dead runner: the deadline in _poll_active ends the job
                pass
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop, then leave no job `running` without a runner: the runners go (this
        head owns them), and their jobs go back to the queue, or to `cancelled` if asked."""
        super().stop(timeout)
        for a in self.active.snapshot():
            self._release(a)
            self._end(a, ServiceStopped())

    def check_fits(self, spec: TrainSpec,
                   placement: Optional[dict[str, Any]] = None) -> Optional[str]:
        self.registry.refresh(force=not self.registry)
        views = self._node_views(include_busy=True)
        if not views:
            return None  # an empty pool may still get donors: the job waits
        job = job_view("(new)", "", spec, time.time(), placement)
        refusal = self.placer.check_fits(job, views)
        if refusal is None or int((placement or {}).get("workers") or 1) > 1:
            return refusal
        # No single card: some node's GPUs together may still hold it (split_placement.py).
        multi = split_nodes(self._online_reports(), views)
        if not multi:
            return refusal
        answer = submit_check(job, multi, safety_margin=self.placer.safety_margin)
        if answer.ok:  # what submit_note will say of this job, without checking again
            self._remember_note(spec, placement, answer.message)
        return None if answer.ok else f"{refusal}; {answer.message}"

    def submit_note(self, spec: TrainSpec,
                    placement: Optional[dict[str, Any]] = None) -> Optional[str]:
        """For a job `check_fits` accepted: a line for its events where it will run split over
        several GPUs of one node (no single card holds it), else None. The answer `check_fits`
        reached for this very spec object is reused; any other spec is checked afresh."""
        if int((placement or {}).get("workers") or 1) > 1:
            return None
        with self._notes_lock:
            for i, (held, where, message) in enumerate(self._split_notes):
                if held is spec and where == (placement or {}):
                    del self._split_notes[i]
                    return message
        views = self._node_views(include_busy=True)
        job = job_view("(new)", "", spec, time.time(), placement)
        if not views or self.placer.check_fits(job, views) is None:
            return None
        multi = split_nodes(self._online_reports(), views)
        answer = submit_check(job, multi, safety_margin=self.placer.safety_margin)
        return answer.message if answer.ok else None

    def _remember_note(self, spec: TrainSpec, placement: Optional[dict[str, Any]],
                       message: str) -> None:
        # The spec object itself is held (not its id), so a new spec can never match an entry.
        with self._notes_lock:
            self._split_notes.append((spec, dict(placement or {}), message))
            del self._split_notes[:-SPLIT_NOTES_KEPT]

    def _online_reports(self) -> list[tuple[str, dict[str, Any]]]:
        return [(name, report) for name, report, offline in self.registry.reports()
                if not offline]

    def nodes(self) -> list[Node]:
        self.registry.refresh(force=not self.registry)
        return self.registry.public_nodes(self.active.snapshot())

    # -- the loop ---------------------------------------------------------------------------
    def tick(self) -> None:
        self.registry.refresh()
        self.active.reap()
        self._sync_cancels()
        self._poll_active()
        self._schedule()

    def _recover(self) -> None:
        """Jobs the store says are running but no runner of ours drives: back to the queue."""
        agents = None
        for job in self.store.jobs_in_status("running"):
            if job.id in self.active:
                continue
            _kill_runner_named(job.id)
            # Its node still counts the old runner's memory as reserved: free it.
            agents = list_agents() if agents is None else agents
            for handle in agents.values():
                handle.unregister_job.remote(job.id)
            self._apply(JobContext(job.id, job.node_id, job.attempt or 0, self.max_attempts),
                        ServiceRestarted())

    def _data_size(self, job: Any) -> Optional[DataSize]:
        """What the store knows of a queued job's training data: the uploaded file's example
        count (validated at upload) and bytes, or a node-local data set's count (and bytes,
        where its node reported them). A file record never changes: each is read once."""
        file_id = getattr(job, "training_file", None)
        if file_id:
            if file_id not in self._data_sizes:
                rec = self.store.get_file(file_id)
                if len(self._data_sizes) >= 100_000:
                    self._data_sizes.clear()
                self._data_sizes[file_id] = (DataSize(int(rec.examples), int(rec.bytes))
                                             if rec is not None and rec.examples else None)
            return self._data_sizes[file_id]
        ds = getattr(job, "dataset", None) or {}
        if ds.get("examples"):
            return DataSize(int(ds["examples"]), int(ds["bytes"]) if ds.get("bytes") else None)
        return None

    def _node_views(self, include_busy: bool = False) -> list[Any]:
        return self.registry.views(self.active.snapshot(), self.active.dying_by_node(),
                                   include_busy=include_busy)

    # -- ending attempts: every ending goes through outcomes.transition_for -------------------
    def _context(self, a: ActiveJob, job: Any) -> JobContext:
        return JobContext(a.job_id, a.node, a.attempt, self.max_attempts,
                          cancel_in_store=bool(getattr(job, "cancel_requested", False)),
                          cancel_sent=a.cancel_at is not None,
                          last_checkpoint_step=a.last_checkpoint_step)

    def _end(self, a: ActiveJob, outcome: Outcome) -> bool:
        """Apply the table's transition for how attempt `a` ended; True when the job moved."""
        return self._apply(self._context(a, self.store.get_job(a.job_id)), outcome)

    def _apply(self, ctx: JobContext, outcome: Outcome) -> bool:
        t = transition_for(outcome, ctx)
        if t.avoid_node and ctx.node:
            self._failed_on.setdefault(ctx.job_id, set()).add(ctx.node)
        fields = dict(t.fields)
        if t.finished:
            fields["finished_at"] = int(time.time())
        moved = self.store.transition(ctx.job_id, {"running"}, t.status, **fields)
        if moved or t.event_always:
            self.store.add_event(ctx.job_id, t.message, level=t.level, data=t.data)
        if t.finished:  # a job that reached an end state needs no memory of where it failed
            self._failed_on.pop(ctx.job_id, None)
        return moved

    def _release(self, a: ActiveJob) -> None:
        st = self.registry.get(a.node)
        self.active.release(a, st.handle if st is not None else None)

    def _finish(self, a: ActiveJob, result: RunResult) -> None:
        self._release(a)
        outcome: Outcome
        if isinstance(result, Completed):
            outcome = self._store_adapter(a, result)
        else:
            if isinstance(result, Stopped) and result.checkpoint_files:
                self._save_checkpoint(a, int(result.step or 0), result.checkpoint_files, {})
            outcome = result
        self._end(a, outcome)
        self._wake.set()

    def _store_adapter(self, a: ActiveJob, result: Completed) -> Outcome:
        """Keep a completed run's adapter: AdapterStored, or AdapterNotStored with why."""
        try:
            artifact_id = self.artifacts.put_files(result.adapter_files)
        except ArtifactError as exc:
            return AdapterNotStored(result, str(exc))
        job = self.store.get_job(a.job_id)
        adapter = self.store.add_adapter(
            tenant=a.tenant,
            base_model=job.model,
            base_model_sha256=getattr(job, "model_sha256", None),
            job_id=a.job_id,
            artifact_id=artifact_id,
            bytes=sum(len(b) for b in result.adapter_files.values()),
            sha256=content_id(result.adapter_files),
            metrics=result.metrics,
        )
        return AdapterStored(result, adapter.id)

    def _lost(self, a: ActiveJob, reason: str) -> None:
        self._release(a)
        self._end(a, Lost(reason))

    # -- running jobs -----------------------------------------------------------------------
    def _poll_active(self) -> None:
        actives = self.active.snapshot()
        # Every runner is asked at once and answers within one shared timeout: dozens of runners
        # still starting must not cost a timeout each.
        drains = {a.job_id: a.runner.drain.remote() for a in actives}
        ready, _ = (ray.wait(list(drains.values()), num_returns=len(drains), timeout=10)
                    if drains else ([], []))
        ready_set = set(ready)
        for a in actives:
            node = self.registry.get(a.node)
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
            drained_at = time.time()
            for item in items:
                # Parsed once here: the multi-worker runner still sends dicts.
                self._absorb(a, RunnerItem.from_wire(item), drained_at)
            ready, _ = ray.wait([a.run_ref], timeout=0)
            if ready:
                try:
                    result = result_from_wire(ray.get(a.run_ref))
                except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as exc:
                    self._lost(a, f"node {a.node} lost ({type(exc).__name__})")
                    continue
                except ray.exceptions.RayTaskError as exc:
                    result = Failed(code="internal_error", message=str(exc), retryable=True)
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
        if not len(self.active):
            return
        waiting = self.active.not_yet_cancelled()
        if not waiting:
            return
        for job in self.store.jobs_in_status("running"):
            if job.id in waiting and job.cancel_requested:
                self.cancel(job.id)

    def _cancel_overdue(self, a: ActiveJob) -> bool:
        """A cancelled job whose runner has not stopped within `cancel_timeout` (loading,
        hung, swamped): kill the runner and end the job `cancelled`. True when it did."""
        if a.cancel_at is None or time.time() - a.cancel_at <= self.cancel_timeout:
            return False
        ready, _ = ray.wait([a.run_ref], timeout=0)
        if ready:  # it did stop (or fail) after all: let _poll_active read its result
            return False
        self._release(a)
        self._end(a, CancelOverdue(self.cancel_timeout))
        self._wake.set()
        return True

    def _enforce_preemption(self, a: ActiveJob) -> None:
        """A reclaimed node asked its job to checkpoint and stop; past `preempt_timeout` the
        job is killed and resumes, elsewhere, from its last periodic checkpoint."""
        now = time.time()
        if a.preempted_at is None:
            a.preempted_at = now
            return
        if now - a.preempted_at > self.preempt_timeout:
            self._lost(a, f"preempted on {a.node} and did not stop within "
                       f"{self.preempt_timeout:g} s; killed")

    def _absorb(self, a: ActiveJob, item: RunnerItem, at: Optional[float] = None) -> None:
        """Store what a runner queued; `at`: when its drain arrived (the step clock's time)."""
        ev = item.event
        kind = ev.type
        if kind == "step":
            a.stepped = True
            if ev.step is not None:  # how far and how fast: when the node frees (placement)
                a.progress.note(int(ev.step), ev.total_steps,
                                time.time() if at is None else at)
            metrics = {k: getattr(ev, k) for k in ("step", "total_steps", "loss", "lr",
                                                   "grad_norm", "tokens_per_s",
                                                   "memory_allocated", "memory_peak")}
            metrics["train_loss"] = ev.loss
            msg = (f"Step {ev.step}/{ev.total_steps}: training loss={ev.loss:.4f}"
                   if ev.loss is not None else ev.message)
            self.store.add_event(a.job_id, msg, type="metrics", data=metrics)
            self.store.update_job(a.job_id, step=ev.step, total_steps=ev.total_steps)
        elif kind == "eval":
            data = {"step": ev.step, "valid_loss": ev.loss, **ev.data}
            self.store.add_event(a.job_id, ev.message or
                                 f"Step {ev.step}: validation loss={ev.loss}",
                                 type="metrics", data=data)
        elif kind == "checkpoint" and item.files:
            self._save_checkpoint(a, int(ev.step or 0), item.files, {"train_loss": ev.loss})
        elif kind:
            level = "warn" if kind == "warning" else "info"
            if ev.message:
                self.store.add_event(a.job_id, ev.message, level=level, data=ev.data or None)

    def _save_checkpoint(self, a: ActiveJob, step: int, files: dict[str, bytes],
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

    # -- placing queued jobs ---------------------------------------------------------------
    def _schedule(self) -> None:
        active_ids = self.active.ids()
        queued = [j for j in self.store.jobs_in_status("queued") if j.id not in active_ids]
        if not queued:
            return
        nodes = self._node_views()
        if not nodes:
            return
        models = {m.name: m for m in self.store.list_models()}
        queued_views, errors = self.job_views.views(queued, models)
        for job_id, (code, message) in errors.items():
            self.store.transition(job_id, {"queued"}, "failed", finished_at=int(time.time()),
                                  error_code=code, error_message=message)
        jobs = []
        for view in queued_views:
            avoid = self._failed_on.get(view.job_id)
            if avoid:
                view = dataclasses.replace(view, avoid_nodes=frozenset(avoid))
            jobs.append(view)
        running_by_tenant = self.active.running_by_tenant()
        if self.tenant_load is not None:
            for tenant, n in self.tenant_load().items():
                running_by_tenant[tenant] = running_by_tenant.get(tenant, 0) + n
        by_id = {j.id: j for j in queued}
        nodes, jobs = self._place_splits(jobs, nodes, by_id)
        for placement in self.placer.plan(jobs, nodes, running_by_tenant):
            try:
                self._start(by_id[placement.job_id], placement)
            except Exception as exc:
                log.exception("could not start %s", placement.job_id)
                self.store.add_event(placement.job_id, f"Could not start on {placement.node_id}: "
                                     f"{exc}", level="warn")

    def _place_splits(self, jobs: list[Any], nodes: list[Any],
                      by_id: dict[str, Any]) -> tuple[list[Any], list[Any]]:
        """Start the queued jobs that only a split over several GPUs of one node holds
        (split_placement.py), and hide from placement.py every node a split runs on, starts
        on or waits for. Returns the nodes and jobs left for `Placer.plan`."""
        running = {a.node for a in self.active.snapshot() if a.extra.get("split")}
        nodes = [dataclasses.replace(n, accepting=False) if n.name in running else n
                 for n in nodes]
        multi = split_nodes(self._online_reports(), nodes)
        if not multi:
            return nodes, jobs
        # Which jobs no single card of the pool could ever hold: decided once per job for the
        # pool's node sizes (check_fits walks every node), again when those change.
        sizes = tuple(sorted((n.name, n.device.total_memory) for n in nodes))
        known, self._needs_split = self._needs_split, {}
        split_jobs = []
        for view in jobs:
            rec = by_id[view.job_id]
            cached = known.get(view.job_id)
            if cached is None or cached[0] != sizes:
                alone = int((getattr(rec, "placement", None) or {}).get("workers") or 1) <= 1
                cached = (sizes, alone and self.placer.check_fits(view, nodes) is not None)
            self._needs_split[view.job_id] = cached
            if cached[1]:
                split_jobs.append(view)
        self._split_said = {k: v for k, v in self._split_said.items() if k in by_id}
        if not split_jobs:
            return nodes, jobs
        from ..train.memory import MemoryEstimate
        from .placement import Placement

        result = plan_splits(split_jobs, multi, safety_margin=self.placer.safety_margin)
        views = {v.job_id: v for v in split_jobs}
        for p in result.placed:
            estimate = MemoryEstimate(breakdown={f"gpu{g}": peak for g, peak
                                                 in zip(p.split.gpus, p.split.peaks)},
                                      total=p.split.total)
            try:
                self._start(by_id[p.job_id], Placement(p.job_id, p.node, views[p.job_id].spec,
                                                       estimate), split=p)
            except Exception as exc:
                log.exception("could not start %s split on %s", p.job_id, p.node)
                self.store.add_event(p.job_id, f"Could not start split on {p.node}: {exc}",
                                     level="warn")
        for job_id, why in result.waiting.items():
            if self._split_said.get(job_id) != why:  # said once, not every pass
                self._split_said[job_id] = why
                self.store.add_event(job_id, f"Split over several GPUs: {why}")
        taken = result.taken
        left = {v.job_id for v in split_jobs}
        return ([dataclasses.replace(n, accepting=False) if n.name in taken else n
                 for n in nodes], [j for j in jobs if j.job_id not in left])

    def _build_payload(self, job: Any, placement: Any) -> tuple[Payload, int]:
        """What travels to the node (payloads.py); a method so tests can watch what is sent."""
        return self.payloads.build(job, placement)

    def _start(self, job: Any, placement: Any, split: Optional[SplitPlacement] = None) -> None:
        """Start `job` on `placement.node_id`; `split`: as one runner holding several GPUs of
        that node (split_placement.py), which the trainer loads the model split over."""
        st = self.registry.get(placement.node_id)
        if st is None:
            raise KeyError(placement.node_id)
        payload, resume_step = self._build_payload(job, placement)
        gpu_reserve: Optional[dict[int, int]] = None
        if split is not None:
            payload["split"] = split.split_spec()
            # The budget of each GPU travels in the split; one total would mislead the trainer.
            payload.pop("memory_budget", None)
            gpu_reserve = dict(zip(split.split.gpus, split.split.peaks))
        resume = payload["resume"]
        attempt = payload["attempt"]
        node_id = st.report["node_id"]
        _kill_runner_named(job.id)
        workers = int((getattr(job, "placement", None) or {}).get("workers") or 1)
        if workers > 1:  # issue 10 hook: a data-parallel job (service/pool/distributed.py)
            from .distributed import start_distributed_runner

            runner = start_distributed_runner(job.id, job.placement, st.name,
                                              self.registry.reports(), agent_name, NAMESPACE,
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
            registered = ray.get(
                st.handle.register_job.remote(job.id, runner, estimate, gpus=gpu_reserve)
                if gpu_reserve else st.handle.register_job.remote(job.id, runner, estimate),
                timeout=10)
        except Exception:
            registered = False
        if not registered:  # reclaimed, or the node's slots are full: it waits in the queue
            self.active.kill(job.id, st.name, runner)
            return
        if not self.store.transition(
            job.id, {"queued"}, "running", node_id=st.name, started_at=int(time.time()),
            predicted_memory=estimate, memory_breakdown=dict(placement.estimate.breakdown),
        ):
            # Cancelled while we were placing it.
            st.handle.unregister_job.remote(job.id)
            self.active.kill(job.id, st.name, runner)
            return
        run_ref = runner.run.remote(payload)
        active = ActiveJob(job.id, job.tenant, st.name, runner, run_ref, estimate, attempt,
                           time.time(), last_checkpoint_step=resume_step - 1 if resume else -1)
        if split is not None:  # its node takes no other job while it runs (_place_splits)
            active.extra["split"] = split.split.as_dict()
        self.active.add(active)
        # A cancel the API stored between our transition and now found no active job: honour it.
        if getattr(self.store.get_job(job.id), "cancel_requested", False):
            self.cancel(job.id)
        dev = st.report["device"]
        msg = (f"Attempt {attempt + 1} placed on {st.name} ({dev.get('name')}, "
               f"{_fmt_gib(int(st.report['free_memory']))} free); predicted peak "
               f"{_fmt_gib(estimate)}")
        data: dict[str, Any] = {"node": st.name, "predicted_memory": estimate}
        if split is not None:
            s = split.split
            msg = (f"Attempt {attempt + 1} placed on {st.name} split over {s.num_gpus} GPUs "
                   f"({', '.join(f'GPU {g}: layers {a}-{b - 1}' for g, (a, b) in zip(s.gpus, s.layers))}); "
                   f"predicted peak {' + '.join(_fmt_gib(p) for p in s.peaks)}; {s.reason}")
            data["split"] = {**s.as_dict(), "devices": list(split.devices)}
        if resume:
            msg += f"; resuming from step {resume_step}"
        # placed_at to the microsecond: event times are whole seconds, too coarse to order
        # placements that a burst makes within one second.
        self.store.add_event(job.id, msg, data={**data,
                                                "resume_step": resume_step if resume else None,
                                                "placed_at": active.started_at})
        for change in placement.changes:
            self.store.add_event(job.id, f"Auto-fit: {change}", level="warn")
