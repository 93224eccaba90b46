"""The federation driver: runs federated rounds as ordinary pool jobs (server side, no Ray).

One background thread in the server process, beside the scheduler. It uses only the store, the
artifact store and the executor's `wake()`/`cancel()`: participants train as ordinary queued
jobs (a node-local participant's job is pinned to its data set's node through
`placement.node`), and the scheduler places, runs and retries them as it does any job. Each
tick, for every running federation:

- no round open → start the next one: one job per participant, each starting from the current
  global adapter (`init_adapter`; peft's own initialisation in round 1);
- a round open → `merge.federation.decide_round` on its jobs' statuses: wait; or aggregate the
  adapters that came back (`aggregate_round`, in the participants' declared order), register
  the result as an adapter of the federation's creator, record who took part and who dropped
  out and why, and cancel jobs still open at the deadline; or fail the federation when the
  quorum cannot be met.

Only adapters are gathered: a participant's data never reaches the server (node-local data sets
are opened by name on their node; uploaded files are the creator's own, already on the server).
The aggregation itself runs here, on the CPU: LoRA factors are small (the merge library never
forms a full out×in matrix for naive/exact/svd).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from ..merge.errors import MergeError
from ..merge.federation import RoundPolicy, aggregate_round, decide_round, weighted_mean
from ..store import JobRecord, new_id
from ..store.federations import FederationRecord
from .background import BackgroundLoop
from .transfer import content_id, read_folder

log = logging.getLogger("lorapool.federation")


class FederationDriver(BackgroundLoop):
    """See the module docstring. `start()`/`stop()` like the scheduler; `tick()` for tests."""

    thread_name = "lorapool-federations"

    def __init__(self, store: Any, artifacts: Any, executor: Any, *,
                 poll_interval: float = 0.5) -> None:
        super().__init__(poll_interval)
        self.store = store
        self.artifacts = artifacts
        self.executor = executor

    # -- one pass ---------------------------------------------------------------------------
    def tick(self, now: Optional[float] = None) -> None:
        for fed in self.store.federations_in_status("running"):
            try:
                self._step(fed, time.time() if now is None else now)
            except Exception as exc:
                log.exception("federation %s failed", fed.id)
                self._fail(fed, "internal_error", f"{type(exc).__name__}: {exc}")

    def _step(self, fed: FederationRecord, now: float) -> None:
        rounds = list(fed.rounds)
        current = rounds[-1] if rounds and rounds[-1]["status"] == "running" else None
        if fed.cancel_requested:
            if current is not None:
                self._cancel_jobs(current["jobs"].values(), "the federation was cancelled")
                current.update(status="cancelled", finished_at=int(now))
            self.store.update_federation(fed.id, from_statuses={"running"}, status="cancelled",
                                         rounds=rounds, finished_at=int(now))
            return
        if current is None:
            self._start_round(fed, rounds, now)
            return
        statuses, errors = {}, {}
        for name, job_id in current["jobs"].items():
            job = self.store.get_job(job_id)
            statuses[name] = job.status if job is not None else "failed"
            if job is not None and job.error_message:
                errors[name] = job.error_message
        order = [p["name"] for p in fed.participants]
        decision = decide_round(statuses, order, started_at=current["started_at"], now=now,
                                policy=RoundPolicy(fed.quorum, fed.deadline_s), errors=errors)
        if decision.action == "wait":
            if current.get("statuses") != statuses:  # progress for GET, written on change only
                current["statuses"] = statuses
                self.store.update_federation(fed.id, from_statuses={"running"}, rounds=rounds)
            return
        self._cancel_jobs([current["jobs"][p] for p in decision.late],
                          f"round {current['round']} closed at its deadline")
        current.update(statuses=statuses, took_part=list(decision.took_part),
                       dropped=decision.dropped, finished_at=int(now))
        if decision.action == "fail":
            # The federation ends: no job of the round may go on using the pool.
            self._cancel_jobs(current["jobs"].values(), f"round {current['round']} failed")
            current.update(status="failed", error=decision.reason)
            self._fail(fed, "quorum_not_met", f"round {current['round']}: {decision.reason}",
                       rounds)
            return
        try:
            adapter_id, metrics = self._aggregate(fed, current, decision.took_part)
        except MergeError as exc:
            current.update(status="failed", error=str(exc))
            self._fail(fed, "aggregation_failed", f"round {current['round']}: {exc}", rounds)
            return
        current.update(status="completed", global_adapter=adapter_id, metrics=metrics)
        last = current["round"] >= fed.rounds_total
        self.store.update_federation(
            fed.id, from_statuses={"running"}, rounds=rounds, global_adapter=adapter_id,
            **({"status": "succeeded", "finished_at": int(now)} if last else {}))
        log.info("federation %s: round %d aggregated from %s", fed.id, current["round"],
                 ", ".join(decision.took_part))
        if not last:
            fresh = self.store.get_federation(fed.id)
            if fresh is not None and fresh.status == "running":
                self._start_round(fresh, list(fresh.rounds), now)

    # -- rounds -----------------------------------------------------------------------------
    def _start_round(self, fed: FederationRecord, rounds: list[dict[str, Any]],
                     now: float) -> None:
        k = len(rounds) + 1
        jobs = {}
        for p in fed.participants:
            jobs[p["name"]] = self._submit(fed, p, k)
        rounds.append({"round": k, "status": "running", "started_at": now,
                       "deadline_at": now + fed.deadline_s, "init_adapter": fed.global_adapter,
                       "jobs": jobs, "statuses": {}, "took_part": [], "dropped": {}})
        self.store.update_federation(fed.id, from_statuses={"running"}, rounds=rounds)
        self.executor.wake()

    def _submit(self, fed: FederationRecord, p: dict[str, Any], k: int) -> str:
        dataset = p.get("dataset")
        record = JobRecord(
            id=new_id("ftjob"), tenant=fed.tenant, model=fed.model,
            model_sha256=fed.model_sha256, status="queued",
            training_file=p.get("training_file"), dataset=dataset,
            init_adapter=fed.global_adapter,
            hyperparameters=dict(fed.hyperparameters),
            seed=int(fed.spec.get("seed", 42)) + k - 1,
            metadata={"federation": fed.id, "round": str(k), "participant": p["name"]},
            lora=dict(fed.spec.get("lora") or {}),
            quantization=fed.spec.get("quantization", "nf4"),
            max_seq_len=int(fed.spec.get("max_seq_len", 1024)),
            micro_batch_size=fed.spec.get("micro_batch_size"),
            learning_rate=fed.spec.get("learning_rate"),
            # A new seed each round: local steps then see other batches than the last round's.
            spec={**fed.spec, "seed": int(fed.spec.get("seed", 42)) + k - 1},
            placement={"node": dataset["node"]} if dataset else {},
        )
        job = self.store.create_job(record)
        where = (f"node-local data set {dataset['name']} on {dataset['node']}" if dataset
                 else f"file {p.get('training_file')}")
        self.store.add_event(job.id, f"Job queued: federation {fed.id}, round {k}, participant "
                             f"{p['name']} ({where})",
                             data={"federation": fed.id, "round": k, "participant": p["name"],
                                   "init_adapter": fed.global_adapter})
        return job.id

    def _cancel_jobs(self, job_ids: Any, reason: str) -> None:
        for job_id in job_ids:
            job = self.store.get_job(job_id)
            if job is None or job.terminal:
                continue
            if self.store.transition(job_id, {"queued", "validating_files"}, "cancelled",
                                     finished_at=int(time.time()), cancel_requested=True):
                self.store.add_event(job_id, f"Job cancelled: {reason}", level="warn")
                continue
            self.store.request_cancel(job_id)
            self.store.add_event(job_id, f"Cancellation requested: {reason}", level="warn")
            try:
                self.executor.cancel(job_id)
            except Exception:  # the stored flag is honoured by the scheduler
                log.exception("cancel %s", job_id)

    def _aggregate(self, fed: FederationRecord, current: dict[str, Any],
                   took_part: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
        """Merge the returned adapters; register the global adapter; the round's metrics."""
        r = int((fed.spec.get("lora") or {}).get("r", 16))
        inputs, losses, examples = [], {}, {}
        with tempfile.TemporaryDirectory(prefix="lorapool-fed-") as tmp:
            for name in took_part:
                job = self.store.get_job(current["jobs"][name])
                adapter = self.store.get_adapter(job.adapter_id) if job.adapter_id else None
                if adapter is None:
                    raise MergeError(f"participant {name}: job {job.id} has no adapter")
                folder = self.artifacts.get_dir(adapter.artifact_id, Path(tmp) / name)
                inputs.append((name, folder))
                losses[name] = adapter.metrics.get("train_loss")
                examples[name] = adapter.metrics.get("n_examples")
            weights = None
            if fed.weights:
                weights = {n: float(fed.weights.get(n, 0.0)) for n in took_part}
            agg = aggregate_round(inputs, method=fed.method, rank=r, weights=weights,
                                  params=fed.params, output_dir=Path(tmp) / "global")
            files = read_folder(agg.path)
            artifact_id = self.artifacts.put_dir(agg.path)
            shutil.rmtree(agg.path, ignore_errors=True)
        metrics = {
            "round": current["round"],
            "method": fed.method,
            "weights": agg.weights,
            "rank": agg.rank,
            "merged_rank": agg.merged_rank,
            "refactor_error": agg.refactor_error,
            "deviation_from_exact": agg.deviation_from_exact,
            "train_loss": weighted_mean(losses, agg.weights),
            "participant_train_loss": losses,
            "participant_examples": examples,
            "n_examples": sum(v for v in examples.values() if isinstance(v, int)),
        }
        rec = self.store.add_adapter(
            tenant=fed.tenant, base_model=fed.model, base_model_sha256=fed.model_sha256,
            job_id=None, artifact_id=artifact_id, bytes=sum(len(b) for b in files.values()),
            sha256=content_id(files),
            metrics={**{k: v for k, v in metrics.items() if not isinstance(v, dict)},
                     "federation": fed.id})
        return rec.id, metrics

    def _fail(self, fed: FederationRecord, code: str, message: str,
              rounds: Optional[list[dict[str, Any]]] = None) -> None:
        fields: dict[str, Any] = {"status": "failed", "error_code": code,
                                  "error_message": message, "finished_at": int(time.time())}
        if rounds is not None:
            fields["rounds"] = rounds
        self.store.update_federation(fed.id, from_statuses={"running"}, **fields)
