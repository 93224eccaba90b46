"""The head's side of merges and evaluations: queued records in the store → Ray tasks → results.

`PoolTasks` is a second, small loop beside the job scheduler (one daemon thread in the server
process). Merges and evaluations are short CPU work with no GPU memory to account for, so they
need none of the scheduler's placement; they only need a node, data sent as Ray objects, and
their results filed:

1. queued records (oldest first, at most `max_in_flight` at once) get their inputs read from the
   artifact store and put into Ray's object store, a node is picked (an accepting NodeAgent's,
   idle ones first) and a task from `tasks.py` is started pinned to it;
2. finished tasks are filed: a merge's files become an artifact and a new adapter owned by the
   merge's tenant (and, with `evaluate_on`, a queued evaluation of it); an evaluation's loss
   and perplexity go on its record;
3. a task lost with its node is queued again once (`max_attempts`), a refused one fails with
   the task's own code and message.

Exports (a merged model, a GGUF adapter, the dequantised base) are a third kind. They are
derived data — the same inputs always give the same files — keyed by (format, model hash,
adapter hash): `request_export` returns the `ExportState` of that key, starting it when new (or
when the last try failed); its result is an artifact that the API streams and that later
requests reuse. Each state change is written to the store's `exports` table
(service/store/exports.py), so a restart still serves finished exports without rebuilding them
and picks queued and running ones up again.

Access is checked again when a task starts: an adapter whose share was revoked after the
request was accepted fails the merge instead of being read.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..store import EvaluationRecord, MergeRecord, new_id
from ..store.exports import ExportRecord
from .agent import agent_name, list_agents
from .background import BackgroundLoop
from .model_objects import ModelObjects
from .tasks import METADATA_FILE, evaluate_task, export_task, merge_task
from .transfer import content_id

log = logging.getLogger("lorapool.pool.tasks")

KINDS = ("merge", "evaluation")


class _Refused(Exception):
    """A task that cannot start (an input is gone): it fails with this code and message."""

    def __init__(self, code: str, message: str, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


@dataclass
class _Flight:
    kind: str
    task_id: str
    ref: Any
    node: Optional[str]
    attempt: int


@dataclass
class ExportState:
    """One export as this server drives it: its stored record (queued → running → succeeded
    with `artifact_id`, or failed; what `_save_export` writes back) and the model and adapter
    objects it is built from."""

    record: ExportRecord
    model: Any  # the ModelEntry
    adapter: Any  # the AdapterRecord, None for the base


class PoolTasks(BackgroundLoop):
    """Runs merges and evaluations on the pool; see the module docstring."""

    thread_name = "lorapool-pool-tasks"

    def __init__(self, store: Any, artifacts: Any, *, poll_interval: float = 0.5,
                 max_in_flight: int = 2, max_attempts: int = 2, model_cache: int = 2,
                 models: Optional[ModelObjects] = None) -> None:
        super().__init__(poll_interval)
        self.store = store
        self.artifacts = artifacts
        self.max_in_flight = max_in_flight
        self.max_attempts = max_attempts
        # Shared with the scheduler (the server passes one): a model is put once.
        self.models = models or ModelObjects(max_models=model_cache)
        self._in_flight: dict[tuple[str, str], _Flight] = {}
        self._exports: dict[str, ExportState] = {}  # by id
        self._export_keys: dict[tuple[str, str, str], str] = {}  # key → id
        self._exports_lock = threading.Lock()

    # -- exports (called from the API's threads) --------------------------------------------
    def request_export(self, fmt: str, model: Any, adapter: Any = None, *,
                       base_id: str) -> ExportState:
        """The export of `adapter` (None: the base itself) in `fmt`, started if new or if the
        last try failed; its files are the same whoever asks, so requests share one."""
        key = (fmt, model.sha256, (adapter.sha256 or adapter.artifact_id) if adapter else "")
        with self._exports_lock:
            known = self._exports.get(self._export_keys.get(key, ""))
            if known is None:  # a previous server's export of the same inputs
                rec = self.store.latest_export(key)
                if rec is not None:
                    known = self._export_state(rec, model, adapter)
            if known is not None and known.record.status != "failed" and (
                    known.record.artifact_id is None
                    or self.artifacts.exists(known.record.artifact_id)):
                return known
            rec = ExportRecord(
                id=new_id("export"), format=fmt, model=model.name, model_sha256=model.sha256,
                adapter_id=adapter.id if adapter is not None else None, adapter_key=key[2],
                base_id=base_id, created_at=int(time.time()))
            self.store.create_export(rec)
            state = self._export_state(rec, model, adapter)
        self._wake.set()
        return state

    def _export_state(self, rec: ExportRecord, model: Any, adapter: Any) -> ExportState:
        """The in-memory state of a stored export (call under `_exports_lock`)."""
        state = ExportState(record=rec, model=model, adapter=adapter)
        self._exports[rec.id] = state
        self._export_keys[rec.key] = rec.id
        return state

    def _save_export(self, state: ExportState) -> None:
        rec = state.record
        self.store.update_export(rec.id, status=rec.status, artifact_id=rec.artifact_id,
                                 error_code=rec.error_code, error_message=rec.error_message,
                                 attempt=rec.attempt, node=rec.node)

    def get_export(self, export_id: str) -> Optional[ExportState]:
        with self._exports_lock:
            return self._exports.get(export_id)

    def _start_exports(self, free: int) -> None:
        with self._exports_lock:
            queued = [e for e in self._exports.values() if e.record.status == "queued"]
        for state in sorted(queued, key=lambda e: e.record.created_at)[:max(free, 0)]:
            rec = state.record
            try:
                agent, node, node_id = self._pick_node()
                payload = {"export_id": rec.id, "agent": agent, "format": rec.format,
                           "model": self._model_payload(state.model), "base_id": rec.base_id,
                           "trust_remote_code": bool(state.model.trust_remote_code),
                           "adapter": None}
                if state.adapter is not None:
                    a = state.adapter
                    payload["adapter"] = {"id": a.id, "key": a.artifact_id.replace(":", "-"),
                                          "files": self._folder_refs(a.artifact_id)}
                options: dict[str, Any] = {}
                if node_id is not None:
                    options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                        node_id=node_id, soft=False)
                rec.status, rec.node = "running", node
                self._save_export(state)
                ref = export_task.options(**options).remote(payload)
                self._in_flight[("export", rec.id)] = _Flight("export", rec.id, ref, node,
                                                              rec.attempt)
            except Exception as exc:
                log.exception("could not start export %s", rec.id)
                self._export_failed(state, "internal_error",
                                    f"could not start: {type(exc).__name__}: {exc}")

    def _export_failed(self, state: ExportState, code: str, message: str) -> None:
        rec = state.record
        rec.status, rec.error_code, rec.error_message = "failed", code, message
        self._save_export(state)

    def _export_finished(self, f: _Flight, result: dict[str, Any]) -> None:
        state = self.get_export(f.task_id)
        if state is None:
            return
        if result.get("status") == "succeeded":
            state.record.artifact_id = self.artifacts.put_files(result["files"])
            state.record.status = "succeeded"
            self._save_export(state)
            return
        if result.get("traceback"):
            log.warning("export %s failed on %s:\n%s", f.task_id, f.node, result["traceback"])
        if result.get("retryable") and f.attempt + 1 < self.max_attempts:
            state.record.attempt, state.record.status = f.attempt + 1, "queued"
            self._save_export(state)
            self._wake.set()
            return
        self._export_failed(state, str(result.get("code") or "internal_error"),
                            str(result.get("message") or "the export failed"))

    # -- lifecycle --------------------------------------------------------------------------
    def on_start(self) -> None:
        self._recover()

    def tick(self) -> None:
        self._poll()
        self._start_queued()

    def _recover(self) -> None:
        """Records the store says are running but no task of ours drives: queue them again
        (a previous server's ObjectRefs died with it)."""
        for kind in KINDS:
            for rec in self.store.tasks_in_status(kind, "running"):
                if (kind, rec.id) not in self._in_flight:
                    self.store.transition_task(kind, rec.id, {"running"}, "queued", node=None)
        self._recover_exports()

    def _recover_exports(self) -> None:
        """Stored exports left queued or running by a previous server: queued again, with
        their model and adapter read back (failed when either is gone or changed)."""
        for rec in self.store.exports_in_status("queued", "running"):
            if ("export", rec.id) in self._in_flight:
                continue
            model = self.store.get_model(rec.model)
            adapter = self.store.get_adapter(rec.adapter_id) if rec.adapter_id else None
            with self._exports_lock:
                state = self._export_state(rec, model, adapter)
                rec.status, rec.node = "queued", None
            if model is None or model.sha256 != rec.model_sha256 or (
                    rec.adapter_id and adapter is None):
                self._export_failed(state, "invalid_export", "its base model or adapter is "
                                    "no longer registered as it was")
            else:
                self._save_export(state)

    # -- starting ---------------------------------------------------------------------------
    def _start_queued(self) -> None:
        free = self.max_in_flight - len(self._in_flight)
        if free <= 0:
            return
        queued = [(kind, rec) for kind in KINDS for rec in self.store.tasks_in_status(kind,
                                                                                    "queued")
                  if (kind, rec.id) not in self._in_flight]
        queued.sort(key=lambda kr: kr[1].created_at)
        for kind, rec in queued[:free]:
            try:
                self._start(kind, rec)
            except _Refused as exc:
                self._fail(kind, rec.id, {"queued"}, exc.code, exc.message, exc.param)
            except Exception as exc:
                log.exception("could not start %s %s", kind, rec.id)
                self._fail(kind, rec.id, {"queued"}, "internal_error",
                           f"could not start: {type(exc).__name__}: {exc}")
        self._start_exports(self.max_in_flight - len(self._in_flight))

    def _start(self, kind: str, rec: Any) -> None:
        agent, node, node_id = self._pick_node()
        payload = (self._merge_payload(rec) if kind == "merge"
                   else self._evaluation_payload(rec))
        payload["agent"] = agent
        options: dict[str, Any] = {}
        if node_id is not None:
            # Hard affinity: the task asks that node's agent for its folder, so it must run there.
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node_id,
                                                                           soft=False)
        if not self.store.transition_task(kind, rec.id, {"queued"}, "running", node=node,
                                          started_at=int(time.time())):
            return
        fn = merge_task if kind == "merge" else evaluate_task
        ref = fn.options(**options).remote(payload)
        self._in_flight[(kind, rec.id)] = _Flight(kind, rec.id, ref, node, rec.attempt)

    def _pick_node(self) -> tuple[Optional[str], Optional[str], Optional[str]]:
        """(agent name, node name, Ray node id) of an accepting node, idle and least busy
        first; all None when the pool has no agent (the task then runs wherever Ray likes)."""
        agents = list_agents()
        refs = {name: handle.report.remote() for name, handle in agents.items()}
        if not refs:
            return None, None, None
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=2.0)
        candidates = []
        for name, ref in refs.items():
            if ref not in ready:
                continue
            try:
                report = ray.get(ref)
            except Exception:
                continue
            if report.get("accepting", True):
                candidates.append((report.get("state") != "idle", len(report.get("jobs", ())),
                                   name, report["node_id"]))
        if not candidates:
            return None, None, None
        _, _, name, node_id = min(candidates)
        return agent_name(name), name, node_id

    # -- payloads ---------------------------------------------------------------------------
    def _folder_refs(self, artifact_id: str) -> dict[str, Any]:
        return {rel: ray.put(data) for rel, data in self.artifacts.read_files(artifact_id).items()}

    def _visible_adapter(self, adapter_id: str, tenant: str) -> Any:
        rec = self.store.get_visible_adapter(adapter_id, tenant)
        if rec is None:
            raise _Refused("adapter_not_found", f"adapter '{adapter_id}' is no longer available "
                           f"to tenant '{tenant}' (deleted, or its share was revoked)",
                           "adapters")
        return rec

    def _merge_payload(self, rec: MergeRecord) -> dict[str, Any]:
        adapters = []
        for adapter_id in rec.adapters:
            a = self._visible_adapter(adapter_id, rec.tenant)
            adapters.append({"id": a.id, "key": a.artifact_id.replace(":", "-"),
                             "files": self._folder_refs(a.artifact_id)})
        options = {k: v for k, v in rec.params.items()
                   if k in ("target_rank", "density", "majority_sign", "seed",
                            "normalize_weights")}
        options["weights"] = rec.weights
        return {"merge_id": rec.id, "method": rec.method, "options": options,
                "adapters": adapters,
                "provenance": {"merge_id": rec.id, "tenant": rec.tenant, "name": rec.name,
                               "suffix": rec.suffix}}

    def _model_payload(self, model: Any) -> dict[str, Any]:
        return self.models.payload(model)

    def _evaluation_payload(self, rec: EvaluationRecord) -> dict[str, Any]:
        model = self.store.get_model(rec.model)
        if model is None:
            raise _Refused("model_not_found", f"model '{rec.model}' is no longer registered",
                           "model")
        if rec.model_sha256 and model.sha256 != rec.model_sha256:
            raise _Refused("model_changed", f"model '{rec.model}' was registered again with "
                           "other weights since this evaluation was requested", "model")
        file = self.store.get_file(rec.file_id, rec.tenant)
        if file is None:
            raise _Refused("file_not_found", f"file '{rec.file_id}' was deleted", "file")
        adapter = None
        if rec.adapter_id:
            a = self._visible_adapter(rec.adapter_id, rec.tenant)
            adapter = {"id": a.id, "key": a.artifact_id.replace(":", "-"),
                       "files": self._folder_refs(a.artifact_id)}
        spec = dict(rec.params)
        spec.update(base_model_id=model.name, trust_remote_code=model.trust_remote_code)
        data = {"key": file.sha256,
                "files": {"data.jsonl": ray.put(self.artifacts.read_bytes(file.artifact_id))},
                "entry": "data.jsonl"}
        return {"evaluation_id": rec.id, "spec": spec, "model": self._model_payload(model),
                "adapter": adapter, "data": data}

    # -- results ----------------------------------------------------------------------------
    def _poll(self) -> None:
        if not self._in_flight:
            return
        flights = list(self._in_flight.values())
        ready, _ = ray.wait([f.ref for f in flights], num_returns=len(flights), timeout=0)
        done = set(ready)
        for f in flights:
            if f.ref not in done:
                continue
            try:
                result = ray.get(f.ref)
            except ray.exceptions.RayError as exc:  # the node or worker died under it
                result = {"status": "failed", "code": "node_lost", "retryable": True,
                          "message": f"the task was lost on node {f.node or '?'} "
                                     f"({type(exc).__name__})"}
            self._in_flight.pop((f.kind, f.task_id), None)
            try:
                self._finish(f, result)
            except Exception as exc:
                log.exception("could not file the result of %s %s", f.kind, f.task_id)
                if f.kind == "export":
                    state = self.get_export(f.task_id)
                    if state is not None:
                        self._export_failed(state, "internal_error",
                                            f"could not store the result: {exc}")
                    continue
                self._fail(f.kind, f.task_id, {"running"}, "internal_error",
                           f"could not store the result: {type(exc).__name__}: {exc}")

    def _finish(self, f: _Flight, result: dict[str, Any]) -> None:
        if f.kind == "export":
            self._export_finished(f, result)
            return
        if result.get("status") == "succeeded":
            if f.kind == "merge":
                self._merge_succeeded(f.task_id, result)
            else:
                self._evaluation_succeeded(f.task_id, result)
            return
        code = str(result.get("code") or "internal_error")
        message = str(result.get("message") or "the task failed")
        if result.get("traceback"):
            log.warning("%s %s failed on %s:\n%s", f.kind, f.task_id, f.node, result["traceback"])
        if result.get("retryable") and f.attempt + 1 < self.max_attempts:
            self.store.transition_task(f.kind, f.task_id, {"running"}, "queued", node=None,
                                       attempt=f.attempt + 1)
            self._wake.set()
            return
        self._fail(f.kind, f.task_id, {"running"}, code, message)

    def _fail(self, kind: str, task_id: str, from_statuses: set[str], code: str, message: str,
              param: Optional[str] = None) -> None:
        self.store.transition_task(kind, task_id, from_statuses, "failed",
                                   finished_at=int(time.time()), error_code=code,
                                   error_message=message, error_param=param)


    def _merge_succeeded(self, merge_id: str, result: dict[str, Any]) -> None:
        rec = self.store.get_task("merge", merge_id)
        files: dict[str, bytes] = result["files"]
        meta = json.loads(files[METADATA_FILE])
        first = self.store.get_adapter(rec.adapters[0])
        diagnostics = result.get("diagnostics") or {}
        metrics = {"merge_id": rec.id, "method": rec.method, "n_examples": meta.get("n_examples"),
                   "rank": result.get("rank"),
                   "relative_error": diagnostics.get("relative_error"),
                   "deviation_from_exact": diagnostics.get("deviation_from_exact")}
        adapter = self.store.add_adapter(
            tenant=rec.tenant, base_model=first.base_model,
            base_model_sha256=first.base_model_sha256, job_id=None,
            artifact_id=self.artifacts.put_files(files), bytes=sum(len(b) for b in files.values()),
            sha256=content_id(files), metrics={k: v for k, v in metrics.items() if v is not None})
        evaluation_id = None
        if rec.evaluate_on:
            evaluation = self.store.create_task("evaluation", EvaluationRecord(
                id=new_id("eval"), tenant=rec.tenant, model=first.base_model,
                model_sha256=first.base_model_sha256, adapter_id=adapter.id,
                file_id=rec.evaluate_on, params=dict(rec.params.get("evaluation") or {}),
                merge_id=rec.id))
            evaluation_id = evaluation.id
            self._wake.set()
        self.store.transition_task(
            "merge", merge_id, {"running"}, "succeeded", finished_at=int(time.time()),
            result_adapter=adapter.id, applied_weights=result.get("weights"),
            rank=result.get("rank"), relative_error=diagnostics.get("relative_error"),
            deviation_from_exact=diagnostics.get("deviation_from_exact"),
            evaluation_id=evaluation_id)

    def _evaluation_succeeded(self, evaluation_id: str, result: dict[str, Any]) -> None:
        self.store.transition_task(
            "evaluation", evaluation_id, {"running"}, "succeeded", finished_at=int(time.time()),
            loss=result.get("loss"), perplexity=result.get("perplexity"),
            tokens=result.get("tokens"), examples=result.get("examples"))
