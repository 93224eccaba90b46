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
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

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
    events: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


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
        # Nodes where each job's earlier attempts ended badly: a retry goes elsewhere if it can.
        self._failed_on: dict[str, set[str]] = {}
        self._nodes: dict[str, _NodeState] = {}
        self._active: dict[str, _Active] = {}
        self.models = models or ModelObjects()
        self._lock = threading.RLock()
        self._last_refresh = 0.0

    # -- JobExecutor ------------------------------------------------------------------------
    def on_start(self) -> None:
        self._recover()

    def cancel(self, job_id: str) -> None:
        with self._lock:
            active = self._active.get(job_id)
        if active is not None:
            active.stop_reason = active.stop_reason or "cancelled by user"
            active.runner.request_stop.remote("cancelled by user")
        self._wake.set()

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
            ))
        return out

    # -- the loop ---------------------------------------------------------------------------
    def tick(self) -> None:
        self._refresh_nodes()
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
        now = time.time()
        if not force and now - self._last_refresh < self.node_refresh_interval:
            return
        self._last_refresh = now
        agents = list_agents()
        refs = {name: handle.report.remote() for name, handle in agents.items()}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=2.0) if refs else ([], [])
        ready_set = set(ready)
        with self._lock:
            for name, ref in refs.items():
                if ref in ready_set:
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
                    running_jobs=sum(1 for a in self._active.values() if a.node == st.name),
                ))
        return views

    # -- running jobs -----------------------------------------------------------------------
    def _poll_active(self) -> None:
        with self._lock:
            actives = list(self._active.values())
        for a in actives:
            node = self._nodes.get(a.node)
            try:
                items = ray.get(a.runner.drain.remote(), timeout=10)
            except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as exc:
                self._lost(a, f"node {a.node} lost ({type(exc).__name__})")
                continue
            except ray.exceptions.GetTimeoutError:
                if node is not None and node.offline:
                    self._lost(a, f"node {a.node} stopped sending heartbeats")
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
        try:
            ray.kill(a.runner, no_restart=True)
        except Exception:
            pass

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
        runner = RemoteJobRunner.options(
            name=f"lorapool-job:{job.id}",
            namespace=NAMESPACE,
            num_cpus=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
        ).remote(job.id, agent_name(st.name))
        estimate = int(placement.estimate.total)
        if not ray.get(st.handle.register_job.remote(job.id, runner, estimate), timeout=10):
            ray.kill(runner, no_restart=True)
            return
        if not self.store.transition(
            job.id, {"queued"}, "running", node_id=st.name, started_at=int(time.time()),
            predicted_memory=estimate, memory_breakdown=dict(placement.estimate.breakdown),
        ):
            # Cancelled while we were placing it.
            st.handle.unregister_job.remote(job.id)
            ray.kill(runner, no_restart=True)
            return
        run_ref = runner.run.remote(payload)
        active = _Active(job.id, job.tenant, st.name, runner, run_ref, estimate, attempt,
                         time.time(), last_checkpoint_step=resume_step - 1 if resume else -1)
        with self._lock:
            self._active[job.id] = active
        dev = st.report["device"]
        msg = (f"Attempt {attempt + 1} placed on {st.name} ({dev.get('name')}, "
               f"{_fmt_gib(int(st.report['free_memory']))} free); predicted peak "
               f"{_fmt_gib(estimate)}")
        if resume:
            msg += f"; resuming from step {resume_step}"
        self.store.add_event(job.id, msg, data={"node": st.name, "predicted_memory": estimate,
                                                "resume_step": resume_step if resume else None})
        for change in placement.changes:
            self.store.add_event(job.id, f"Auto-fit: {change}", level="warn")
