"""A multi-worker job: the trainer's data-parallel mode launched with Ray Train, elastically.

`DistributedJobRunner` has the face of `runner.JobRunner` (`run(payload)`, `drain()`,
`request_stop()`, `pid()`), so the scheduler drives it the same way; it lives on the head and
starts a `ray.train.torch.TorchTrainer` whose placement group pins one worker to each chosen
node (a `ray.io/node-id` label selector per bundle; the node order packs the same machine
first, see distributed_plan.py). Each worker materialises the payload into its OWN node's
folder (the NodeAgent's work_dir, or a private temporary folder) and calls `train()`, which
finds the process group Ray Train set up (gloo on the CPU, NCCL on CUDA).

No shared disk: rank 0 sends events, checkpoint files and the adapter back to this actor
through Ray (`put`), exactly what a single-node runner queues; this actor keeps the latest
checkpoint in memory and hands everything to the head with `drain()` / the run's result.
Ray Train's own checkpoint upload (`ray.train.report` to a storage path) is not used: on
office machines that path would be each donor's own disk.

Elastic: `run()` is a loop of attempts. When a worker's node dies, Ray Train fails the attempt
(max_failures=0); the loop then restarts from the last checkpoint with the nodes still alive
(at least `min_workers`, else it waits a while and gives up as retryable). While it runs with
fewer than `workers`, a monitor watches for a candidate node to come back with room; then the
run checkpoints at the next step boundary and restarts with more workers. The RunState position
is global, so every restart resumes exactly; each worker's micro-batch and row share are
planned again, the global batch never changes, and every change is an event.

Every worker's node holds the job: each attempt registers it with that node's NodeAgent (the
estimate for that worker's micro-batch), so the scheduler places nothing into that memory and
the agent knows the worker's process; nodes the plan drops, and all of them at the end, are
released. When the owner of a worker's node (other than the scheduler's own node, whose reclaim
the scheduler enforces) takes the GPU back, its agent's stop request drops just that node: the
run checkpoints and goes on with the others, down to `min_workers`, and the node may rejoin
once its agent accepts jobs again.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Optional

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .agent import NAMESPACE as AGENT_NAMESPACE
from .distributed_plan import Candidate, WorkerPlan, describe, order_candidates, plan_workers
from .outcomes import Failed, RunnerEvent, RunnerItem, RunResult, result_from_wire
from .payloads import memory_budget
from .runner import RunnerMailbox
from .transfer import materialise, read_folder

MAX_RESTARTS = 8
WAIT_FOR_NODES_S = 60.0
MONITOR_INTERVAL_S = 2.0
PID_WAIT_S = 120.0  # how long an agent's pid() question waits for its node's worker to start
RELEASE_WAIT_S = 10.0  # how long the end of a job waits for its nodes to take their memory back


def _fetch(value: Any) -> bytes:
    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def _alive_nodes() -> dict[str, dict[str, Any]]:
    return {n["NodeID"]: n for n in ray.nodes() if n.get("Alive")}


def _free_per_node() -> dict[str, dict[str, float]]:
    try:  # not a public API in every Ray release; without it, alive counts as free
        from ray._private.state import available_resources_per_node

        return available_resources_per_node()
    except Exception:  # noqa: BLE001
        return {}


# -- the worker side (runs in each Ray Train worker) --------------------------------------------


def _node_work_dir(agent: Optional[str]) -> Path:
    """This node's folder: its NodeAgent's work_dir, or a private temporary folder."""
    if agent:
        from .agent import NAMESPACE

        try:
            local = ray.get(ray.get_actor(agent, namespace=NAMESPACE).local_config.remote(),
                            timeout=30)
            return Path(local["work_dir"])
        except Exception:  # noqa: BLE001 — the agent left: a temporary folder serves as well
            pass
    return Path(tempfile.mkdtemp(prefix="lorapool-worker-"))


def _worker_budgets(spec: Any, micro_batch_size: int,
                    device: Optional[Any]) -> list[Optional[dict[str, Any]]]:
    """What to reserve on a worker's node, in the order to try: its richest configuration
    (memory.py `fast_variants`: output head on the GPU, CUDA graphs' pool) that the node's
    reported free memory holds, then the job's minimum; [None] when there is no estimate (no
    device report, no readable config)."""
    from ..train.memory import fast_variants, first_fit

    try:
        worker_spec = spec.model_copy(update={"micro_batch_size": micro_batch_size,
                                              "device": "auto"})
        if device is None:
            return [None]
        variants = fast_variants(worker_spec, device)
        room = device.free_memory if device.free_memory is not None else device.total_memory
        minimum = variants[-1]
        full = first_fit(variants, room or 0)
    except Exception:  # noqa: BLE001 - no readable config here: reserve the slot only
        return [None]
    return [memory_budget(e) for e in ((full, minimum) if full is not minimum else (minimum,))]


def _train_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker loop: materialise, train (data-parallel), report to the channel."""
    import ray.train

    from ..train import MemoryBudget, TrainEvent, TrainSpec, train
    from ..train.distributed import DistContext

    channel = config["channel"]
    payload = config["payload"]
    rank = ray.train.get_context().get_world_rank()
    node_id = ray.get_runtime_context().get_node_id()
    plan = config["plans"].get(node_id) or {}
    work = _node_work_dir(plan.get("agent"))
    cache = work / "cache"

    def local(kind: str, blob: Optional[dict[str, Any]]) -> Optional[Path]:
        if not blob:
            return None
        folder = materialise(cache / kind, blob["key"], blob["files"], _fetch)
        return folder / blob["entry"] if blob.get("entry") else folder

    model = local("models", payload["model"])
    data = local("data", payload["data"])
    val = local("data", payload.get("validation"))
    init_adapter = local("adapters", payload.get("init_adapter"))
    resume = local("checkpoints", payload.get("resume"))
    fields = dict(payload["spec"])
    fields["base_model"] = str(model)
    if init_adapter is not None:
        fields["init_adapter"] = str(init_adapter)
    if not config["use_gpu"]:
        fields["device"] = "cpu"
    # What this worker's node reserved (`_reserve`); without a reservation to keep within
    # (a node with no agent), no CUDA graphs: their pool would be memory nobody reserved.
    budget = (plan.get("extra") or {}).get("memory_budget")
    fast = fields.get("fast", "auto")
    if budget is None and fast != "off":
        fast = dict(fast) if isinstance(fast, dict) else {}
        fast["cuda_graphs"] = "off"
        fields["fast"] = fast
    spec = TrainSpec(**fields)
    if spec.device == "cpu" and config.get("cpu_threads"):
        import torch

        torch.set_num_threads(int(config["cpu_threads"]))
    dctx = DistContext.from_environment(device_kind=spec.device,
                                        rows_per_rank=[float(plan.get("weight", 1.0))],
                                        micro_batch_size=plan.get("micro_batch_size"))
    ray.get(channel.worker_started.remote(rank, node_id, os.getpid()))

    def on_event(event: TrainEvent) -> None:
        item: dict[str, Any] = {"kind": "event", "event": event.model_dump(mode="json")}
        if event.type == "checkpoint" and event.path:
            item["files"] = read_folder(event.path)
        ray.get(channel.put.remote(item))  # waited for: a threaded actor does not keep order

    def should_stop() -> bool:
        return ray.get(channel.poll.remote())

    out_dir = work / "jobs" / config["job_id"] / f"attempt-{config['attempt']}-rank-{rank}"
    result = train(spec, data, out_dir, validation_data=val,
                   on_event=on_event if rank == 0 else None, resume_from=resume,
                   should_stop=should_stop if rank == 0 else None, cache_dir=cache, dist=dctx,
                   memory_budget=MemoryBudget(**budget) if budget else None)
    done: dict[str, Any] = {"rank": rank, "node_id": node_id, "status": result.status,
                            "micro_batch_size": result.metrics.get("micro_batch_size"),
                            "rows_per_step": dctx.counts(spec.batch_size)[rank] if dctx else
                            spec.batch_size}
    if rank == 0:
        done.update(step=result.step, total_steps=result.total_steps, metrics=result.metrics)
        if result.status == "completed" and result.adapter_dir is not None:
            done["adapter_files"] = read_folder(result.adapter_dir)
        elif result.last_checkpoint is not None:
            done["checkpoint_files"] = read_folder(result.last_checkpoint)
    ray.get(channel.worker_done.remote(done))


# -- the head side -------------------------------------------------------------------------------


class DistributedJobRunner(RunnerMailbox):
    """Runs one multi-worker job; see the module docstring. A threaded actor on the head."""

    def __init__(self, job_id: str, *, workers: int, min_workers: Optional[int] = None,
                 candidates: list[dict[str, Any]] | None = None, cpu_threads: Optional[int] = None,
                 wait_for_nodes_s: float = WAIT_FOR_NODES_S,
                 estimate_base_model: Optional[str] = None) -> None:
        if workers < 1 or not 1 <= (min_workers or workers) <= workers:
            raise ValueError(f"need 1 <= min_workers <= workers, not {min_workers}/{workers}")
        self.job_id = job_id
        self.workers = workers
        self.min_workers = min_workers or workers
        self.candidates = [Candidate(**c) for c in (candidates or [])]
        self.cpu_threads = cpu_threads
        self.wait_for_nodes_s = wait_for_nodes_s
        # The head's own copy of the base model (this actor lives on the head), read only for
        # its config by the memory estimate that fits each worker's micro-batch.
        self.estimate_base_model = estimate_base_model
        self._init_mailbox()
        self._regrow = False
        self._hold_at: Optional[int] = None
        self._held = False
        self._step = 0
        self._checkpoint: Optional[tuple[int, dict[str, bytes]]] = None
        self._done: list[dict[str, Any]] = []
        self._started: list[tuple[int, str, int]] = []
        self._current: list[WorkerPlan] = []
        # Nodes whose owner took the GPU back: no worker there until their agent accepts again.
        self._excluded: set[str] = set()
        # node id -> agent actor name holding this job's memory reservation (every worker's
        # node, not only the scheduler's first one, so no other job is placed into it).
        self._reserved_on: dict[str, str] = {}

    # -- called by the head (the scheduler, tests): request_stop, drain, pid (RunnerMailbox) ---

    def workers_now(self) -> list[dict[str, Any]]:
        """The current attempt's plan, one entry per worker."""
        return [p.as_dict() for p in self._current]

    def hold_at_step(self, step: Optional[int]) -> None:
        """Freeze the run at the first step boundary >= `step` until `release()` (None:
        release): an operator moving a node out cleanly, or a test killing one mid-run."""
        with self._lock:
            self._hold_at = step
            self._held = False

    def held(self) -> bool:
        return self._held

    def release(self) -> None:
        self.hold_at_step(None)

    def request_stop(self, reason: str, node: Optional[str] = None) -> None:
        """A stop from the head stops the job. One from a worker node's agent (its owner
        reclaimed the GPU) drops that node: the run checkpoints at the next step boundary and
        goes on without it, down to `min_workers`; below that the whole job stops."""
        # The scheduler's own node (the first candidate) is the job's node for the scheduler,
        # which enforces that node's reclaim itself: there the job stops and is placed anew.
        first = self.candidates[0].node_id if self.candidates else None
        if node is not None and node != first:
            with self._lock:
                current = [p.node_id for p in self._current]
                if node in current and len(current) - 1 >= self.min_workers:
                    self._excluded.add(node)
                    self._regrow = True  # the same checkpoint-and-replan path as growing
                    self._event(f"node {self._name_of(node)} reclaimed by its owner: "
                                "checkpointing to go on without it", node=node)
                    return
        super().request_stop(reason)

    def pid(self, node: Optional[str] = None) -> int:
        """This actor's pid, or with `node` the pid of the worker training there (waits for it
        to start, up to PID_WAIT_S): what that node's agent must not take for its owner's."""
        deadline = time.monotonic() + (PID_WAIT_S if node is not None else 0)
        while node is not None:
            with self._lock:
                pids = [pid for _, n, pid in self._started if n == node]
            if pids:
                return pids[-1]
            if time.monotonic() > deadline or self._stop_reason is not None:
                break
            time.sleep(0.2)
        return os.getpid()

    def _name_of(self, node: str) -> str:
        return next((c.name for c in self.candidates if c.node_id == node and c.name),
                    node[:8])

    # -- called by rank 0 / every worker --------------------------------------------------------

    def put(self, item: dict[str, Any]) -> None:
        with self._lock:
            event = item.get("event") or {}
            self._step = max(self._step, int(event.get("step") or 0))
            if event.get("type") == "checkpoint" and item.get("files"):
                self._checkpoint = (int(event["step"]), item["files"])
            self._outbox.append(RunnerItem.from_wire(item))

    def poll(self) -> bool:
        """Rank 0 asks between steps: stop now? (a stop request, or room to grow)."""
        while True:
            with self._lock:
                hold = self._hold_at is not None and self._step >= self._hold_at
                self._held = hold
            if not hold:
                break
            time.sleep(0.05)
        return self._stop_reason is not None or self._regrow

    def worker_started(self, rank: int, node_id: str, pid: int) -> None:
        with self._lock:
            self._started.append((rank, node_id, pid))

    def worker_done(self, done: dict[str, Any]) -> None:
        with self._lock:
            if done.get("checkpoint_files") and done.get("step"):
                self._checkpoint = (int(done["step"]), done["checkpoint_files"])
            self._done.append(done)

    # -- the run ----------------------------------------------------------------------------------

    def _event(self, message: str, **data: Any) -> None:
        self._outbox.append(RunnerItem(RunnerEvent(
            type="status", step=self._step, message=message, data={"distributed": data})))

    def _usable(self) -> list[Candidate]:
        """Candidates alive now with room for a worker, same machine first."""
        alive = _alive_nodes()
        free = _free_per_node()
        need = "GPU" if self._use_gpu else "CPU"
        cands = self.candidates or [
            Candidate(node_id=nid, name=n.get("NodeName", ""), ip=n.get("NodeManagerAddress", ""))
            for nid, n in alive.items()]
        out = []
        for c in cands:
            node = alive.get(c.node_id)
            if node is None:
                continue
            if c.node_id in self._excluded:
                if not self._agent_accepts(c):
                    continue
                self._excluded.discard(c.node_id)
            if not c.ip:
                c.ip = node.get("NodeManagerAddress", "")
            if free and free.get(c.node_id, {}).get(need, 0) < 1:
                continue
            out.append(c)
        return order_candidates(out)

    def _agent_accepts(self, c: Candidate) -> bool:
        if not c.agent:
            return False
        try:
            return bool(ray.get(ray.get_actor(c.agent, namespace=AGENT_NAMESPACE)
                                .accepting.remote(), timeout=5))
        except Exception:  # noqa: BLE001 - an agent that does not answer is not accepting
            return False

    def _reserve(self, spec: Any, plans: list[WorkerPlan]) -> list[WorkerPlan]:
        """Register this job with every worker node's agent (its estimate for that worker),
        release the nodes the plan no longer uses, and return the plans whose node accepted
        (an agent refuses when its owner reclaimed it meanwhile)."""
        me = ray.get_runtime_context().current_actor
        devices = {c.node_id: c.device for c in self.candidates}
        kept = []
        for p in plans:
            if not p.agent:
                kept.append(p)  # no agent there (tests, bare Ray nodes): nothing to tell
                continue
            ok = False
            try:
                agent = ray.get_actor(p.agent, namespace=AGENT_NAMESPACE)
                for budget in _worker_budgets(spec, p.micro_batch_size, devices.get(p.node_id)):
                    need = budget["total"] if budget else 0
                    ok = ray.get(agent.register_job.remote(self.job_id, me, need), timeout=10)
                    if ok:
                        # The worker's trainer keeps within what its node reserved (graphs
                        # run only if that counted their pool).
                        p.extra["memory_budget"] = budget
                        break
            except Exception:  # noqa: BLE001 - an agent that is gone cannot take a worker
                ok = False
            if ok:
                self._reserved_on[p.node_id] = p.agent
                kept.append(p)
            else:
                self._excluded.add(p.node_id)
        self._release(keep={p.node_id for p in kept})
        return kept

    def _release(self, keep: set[str] = frozenset()) -> None:
        """Give back this job's reservation on every node not in `keep`, and wait (a few
        seconds at most) until the agents have taken it back: whoever hears that the job ended
        (the scheduler, a test) then finds that memory free, not still promised to it."""
        pending = []
        for node, agent_name_ in list(self._reserved_on.items()):
            if node in keep:
                continue
            self._reserved_on.pop(node, None)
            try:
                pending.append(ray.get_actor(agent_name_, namespace=AGENT_NAMESPACE)
                               .unregister_job.remote(self.job_id))
            except Exception:  # noqa: BLE001 - an agent that is gone holds nothing
                pass
        if pending:  # ray.wait does not raise for an agent that died meanwhile
            ray.wait(pending, num_returns=len(pending), timeout=RELEASE_WAIT_S)

    def _choose(self) -> list[Candidate]:
        deadline = time.monotonic() + self.wait_for_nodes_s
        while True:
            usable = self._usable()
            if len(usable) >= self.min_workers:
                return usable[: self.workers]
            if self._stop_reason is not None or time.monotonic() > deadline:
                return usable
            time.sleep(1.0)

    def _monitor(self, n: int, finished: threading.Event) -> None:
        """While short of `workers`, ask the run to checkpoint and regrow when a node fits."""
        while not finished.wait(MONITOR_INTERVAL_S):
            if n >= self.workers:
                return
            current = {p.node_id for p in self._current}
            extra = [c for c in self._usable() if c.node_id not in current]
            if extra:
                with self._lock:
                    self._regrow = True
                    self._event(f"node {extra[0].name or extra[0].node_id[:8]} fits again: "
                                "checkpointing to grow the job", node=extra[0].node_id)
                return

    def run(self, payload: dict[str, Any]) -> RunResult:
        """Train to the end; a typed result, like `JobRunner.run`."""
        try:
            return result_from_wire(self._run(payload))
        except Exception as exc:  # report as data, like JobRunner
            return Failed(code="internal_error", message=f"{type(exc).__name__}: {exc}",
                          retryable=True, traceback=traceback.format_exc(limit=20))
        finally:
            self._release()

    def _run(self, payload: dict[str, Any]) -> dict[str, Any]:
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        from ..train.spec import TrainSpec

        started = time.time()
        spec_fields = dict(payload["spec"])
        self._use_gpu = payload.get("device_kind", "cuda") == "cuda" and \
            spec_fields.get("device") != "cpu"
        spec = TrainSpec(**{**spec_fields, "base_model": self.estimate_base_model or "-"})
        if payload.get("resume"):
            self._checkpoint = None  # the head's own resume payload is used for the first try
        resume = payload.get("resume")
        previous = 0
        for attempt in range(MAX_RESTARTS + 1):
            chosen = self._choose()
            if len(chosen) < self.min_workers:
                return {"status": "failed", "code": "not_enough_workers", "retryable": True,
                        "message": f"only {len(chosen)} node(s) can take a worker now, "
                        f"placement.min_workers is {self.min_workers}",
                        "seconds": time.time() - started}
            plans = self._reserve(spec, plan_workers(spec, chosen))
            if len(plans) < len(chosen):  # a node refused meanwhile: plan the others again
                kept = {p.node_id for p in plans}
                plans = plan_workers(spec, [c for c in chosen if c.node_id in kept])
            if len(plans) < self.min_workers:
                self._release()
                return {"status": "failed", "code": "not_enough_workers", "retryable": True,
                        "message": f"only {len(plans)} node(s) accepted a worker, "
                        f"placement.min_workers is {self.min_workers}",
                        "seconds": time.time() - started}
            with self._lock:
                self._current, self._regrow, self._done = plans, False, []
                verb = "starting" if attempt == 0 else (
                    "growing" if len(plans) > previous else "shrinking" if len(plans) < previous
                    else "restarting")
                self._event(f"{verb}: {len(plans)} worker(s) of {self.workers} "
                            f"(min {self.min_workers}); batch {spec.batch_size} per step: "
                            f"{describe(plans)}", workers=[p.as_dict() for p in plans],
                            attempt=attempt, resume_step=self._checkpoint[0]
                            if self._checkpoint else None)
            previous = len(plans)
            if self._checkpoint is not None:
                step, files = self._checkpoint
                resume = {"key": f"{self.job_id}-step-{step}", "files": files}
            finished = threading.Event()
            threading.Thread(target=self._monitor, args=(len(plans), finished),
                             daemon=True).start()
            trainer = TorchTrainer(
                _train_worker,
                train_loop_config={
                    "channel": ray.get_runtime_context().current_actor, "job_id": self.job_id,
                    "attempt": attempt, "payload": {**payload, "resume": resume},
                    "plans": {p.node_id: p.as_dict() for p in plans}, "use_gpu": self._use_gpu,
                    "cpu_threads": self.cpu_threads},
                scaling_config=ScalingConfig(
                    num_workers=len(plans), use_gpu=self._use_gpu,
                    resources_per_worker={"GPU": 1} if self._use_gpu else {"CPU": 1},
                    placement_strategy="PACK",
                    label_selector=[{"ray.io/node-id": p.node_id} for p in plans]),
                run_config=RunConfig(
                    name=f"{self.job_id}-attempt-{attempt}",
                    storage_path=tempfile.mkdtemp(prefix="lorapool-raytrain-"),
                    failure_config=FailureConfig(max_failures=0)),
            )
            error: Optional[str] = None
            try:
                trainer.fit()
            except Exception as exc:  # a worker or its node died; Ray Train tore the group down
                error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            finally:
                finished.set()
            main = next((d for d in self._done if d.get("rank") == 0), None)
            if error is None and main is not None:
                if main["status"] == "completed":
                    return self._result(main, started)
                if self._stop_reason is not None:
                    return self._result(main, started)
                continue  # stopped to regrow: the next attempt takes the freed node
            if self._stop_reason is not None:
                return {"status": "stopped", "step": self._checkpoint[0] if self._checkpoint
                        else 0, "total_steps": None, "metrics": {},
                        "stop_reason": self._stop_reason, "seconds": time.time() - started,
                        **({"checkpoint_files": self._checkpoint[1]} if self._checkpoint else {})}
            with self._lock:
                self._event(f"worker lost ({error}): continuing from "
                            f"{'checkpoint step ' + str(self._checkpoint[0]) if self._checkpoint else 'the start'}"
                            " with the nodes still alive", error=error)
        return {"status": "failed", "code": "too_many_restarts", "retryable": True,
                "message": f"the job lost workers {MAX_RESTARTS + 1} times",
                "seconds": time.time() - started}

    def _result(self, main: dict[str, Any], started: float) -> dict[str, Any]:
        out = {"status": main["status"], "step": main.get("step"),
               "total_steps": main.get("total_steps"), "metrics": main.get("metrics", {}),
               "stop_reason": self._stop_reason, "seconds": time.time() - started,
               "peak_memory": (main.get("metrics") or {}).get("peak_memory_bytes"),
               "workers": [{k: v for k, v in d.items() if not k.endswith("_files")
                            and k != "metrics"} for d in sorted(self._done,
                                                                key=lambda d: d["rank"])]}
        for key in ("adapter_files", "checkpoint_files"):
            if main.get(key):
                out[key] = main[key]
        return out


RemoteDistributedJobRunner = ray.remote(num_cpus=0, max_concurrency=16)(DistributedJobRunner)


def start_distributed_runner(job_id: str, placement: dict[str, Any], chosen: str,
                             reports: list[tuple[str, dict[str, Any], bool]],
                             agent_name: Any, namespace: str,
                             estimate_base_model: Optional[str] = None) -> Any:
    """The scheduler's hook: a `DistributedJobRunner` on the head for a job whose placement
    asks for several workers. Candidates are the pool's online nodes (the scheduler's chosen
    node first, then the rest by free memory); `plan_workers` fits each one's micro-batch."""
    from ..train.spec import DeviceInfo

    def candidate(name: str, r: dict[str, Any]) -> dict[str, Any]:
        return {"node_id": r["node_id"], "name": name, "ip": r.get("ip", ""),
                "agent": agent_name(name), "device": DeviceInfo(**r["device"]),
                "speed": r.get("speed")}

    online = [(name, r) for name, r, offline in reports if not offline and r.get("node_id")]
    # On the head, where the scheduler calls from: a donor that leaves must not take the job's
    # runner (and with it the job's checkpoint and events) along.
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(),
                                          soft=False)
    online.sort(key=lambda nr: (nr[0] != chosen, -int(nr[1].get("free_memory") or 0)))
    if placement.get("node"):  # pinned: that node alone (its GPUs, one worker each)
        online = [nr for nr in online if nr[0] == placement["node"]]
    return RemoteDistributedJobRunner.options(name=f"lorapool-job:{job_id}",
                                              namespace=namespace,
                                              scheduling_strategy=here).remote(
        job_id, workers=int(placement["workers"]), estimate_base_model=estimate_base_model,
        min_workers=placement.get("min_workers"),
        candidates=[candidate(name, r) for name, r in online],
        cpu_threads=None)
