"""The NodeAgent: one Ray actor per donating node, the scheduler's eyes and hands there.

It reports the node's device (GPU name, compute capability, bf16, total and free memory as the
driver sees it, or a simulated GPU), every GPU the node sees (`gpus`: a job too big for one card
may run split over several of them, multi_gpu.py; one-card jobs use `gpu_index`), the memory lorapool's own jobs hold, whether the node is
accepting work, the base models its cache holds (by content id), and a heartbeat. A CPU node
reports its RAM (available now, less what its jobs are still expected to grow into) and its
cores, and takes at most `cpu_slots` jobs at once. When the owner takes the GPU back
(`reclaim()`, or the donation policy says so) it asks every job running here to checkpoint and
stop, and stops accepting new ones. Job runners on the node ask it for the node-local working
folder, so no path ever travels from the head.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import ray
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .devices import (
    SimulatedGPU,
    cpu_cores,
    cpu_slots,
    detect_device,
    measure_speed,
    measure_speed_isolated,
)
from .policy import DonationPolicy, GpuActivity, nvml_probe

NAMESPACE = "lorapool"
AGENT_PREFIX = "lorapool-agent:"
CONTEXT_PROBE_TRIES = 3
CONTEXT_PROBE_RETRY_S = 60.0  # a disturbed probe (a job started meanwhile) waits, then retries


class AgentConfig(BaseModel):
    """What a donor offers. Paths here are the donor's own."""

    model_config = ConfigDict(extra="forbid")

    name: str
    work_dir: str
    simulate_gpu: Optional[SimulatedGPU] = None
    # Several simulated GPUs of one machine (tests, CPU-only donors): the first is the card
    # one-card jobs use (`simulate_gpu`, set from it); all of them can hold a job split over
    # them, which a simulated node trains over "cpu" devices.
    simulate_gpus: Optional[list[SimulatedGPU]] = Field(None, min_length=1, max_length=64)
    gpu_index: int = 0
    memory_cap: Optional[int] = Field(None, ge=0)  # "at most 10 GiB of my 12"
    cpu_only: bool = False
    cpu_memory: Optional[int] = None  # what a --cpu-only donor offers
    # CPU threads a job on this node may use when it trains on the CPU (None: Ray's default of
    # one per actor, right where several jobs share a machine's cores).
    cpu_threads: Optional[int] = Field(None, ge=1, le=1024)
    # Jobs a CPU node trains at once (None: its cores // cpu_threads, at least one). Each job is
    # a process with torch loaded; more of them than cores only thrash.
    cpu_slots: Optional[int] = Field(None, ge=1, le=1024)
    # Measured speed (TFLOP/s) is re-measured while the node is idle, at most this often.
    speed_refresh_s: float = Field(600.0, ge=1.0)
    labels: dict[str, str] = Field(default_factory=dict)
    datasets: dict[str, str] = Field(default_factory=dict)  # node-local data sets: name → path
    # Who may train on each data set (name → tenants). Secure by default: a data set nobody
    # was granted is offered to nobody.
    dataset_tenants: dict[str, list[str]] = Field(default_factory=dict)
    policy: DonationPolicy = Field(default_factory=DonationPolicy)

    @field_validator("datasets")
    @classmethod
    def _dataset_names(cls, v: dict[str, str]) -> dict[str, str]:
        from .local_data import check_name

        return {check_name(name): str(Path(path).expanduser().absolute())
                for name, path in v.items()}

    @model_validator(mode="after")
    def _one_first_gpu(self) -> "AgentConfig":
        if self.simulate_gpus:
            if self.simulate_gpu is None:
                self.simulate_gpu = self.simulate_gpus[0]
            elif self.simulate_gpu != self.simulate_gpus[0]:
                raise ValueError("simulate_gpu and simulate_gpus[0] differ: give one of them")
        return self

    @model_validator(mode="after")
    def _grants_name_offered_sets(self) -> "AgentConfig":
        unknown = sorted(set(self.dataset_tenants) - set(self.datasets))
        if unknown:
            raise ValueError(f"tenants granted to data sets this node does not offer: "
                             f"{', '.join(unknown)}")
        return self


class NodeAgent:
    """See the module docstring. Runs as a threaded Ray actor pinned to its node."""

    def __init__(self, config: AgentConfig,
                 probe: Optional[Callable[[], Optional[GpuActivity]]] = None):
        self.config = config
        self.node_id = ray.get_runtime_context().get_node_id()
        Path(config.work_dir).mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._runners: dict[str, Any] = {}
        self._slotless: set[str] = set()  # runners that hold memory but no CPU slot
        self._reserved: dict[str, int] = {}
        # A split job's bytes on each GPU (GPU index -> bytes), multi_gpu.py; one-card jobs
        # reserve on `gpu_index` only (`_reserved`).
        self._gpu_reserved: dict[str, dict[int, int]] = {}
        self._reclaimed: Optional[str] = None
        # Returns a reason when the owner wants the GPU back (schedule/idle rules), else None.
        # NVML's view of this node's own card (`gpu_index`), not of whichever is first.
        self._availability = config.policy.checker(
            probe or (lambda: nvml_probe(config.gpu_index)))
        self._pids: dict[str, Any] = {}  # job -> ObjectRef of its runner's pid
        self._pid_values: dict[str, int] = {}  # resolved pids
        self._cpu: Optional[bool] = None  # does this node train on its CPU (decided once)
        self._simulated_free: Optional[int] = None
        from .local_data import DatasetCatalog

        # Validated here, on the node; reports carry only counts and line errors.
        self._datasets = DatasetCatalog(config.datasets, config.dataset_tenants)
        self._datasets.describe()
        # Measured speed: once at join time, then again while idle (see _speed()).
        self._speed: Optional[float] = None
        self._speed_at = 0.0
        self._speed_probe: Optional[threading.Thread] = None
        # A training process's CUDA context on this card: probed once, in the background, at
        # join (see _measured_context). `_registrations` tells the probe a job started meanwhile.
        self._context: Optional[int] = None
        self._context_probe: Optional[threading.Thread] = None
        self._registrations = 0

    # -- reports ---------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        self._apply_policy()
        cfg = self.config
        if cfg.cpu_only:
            device = detect_device(None, cpu_memory=cfg.cpu_memory, memory_cap=cfg.memory_cap)
            device = device.model_copy(update={"kind": "cpu"})
        else:
            sim = cfg.simulate_gpu
            if sim is not None and self._simulated_free is not None:
                sim = sim.model_copy(update={"free_memory": self._simulated_free})
            device = detect_device(sim, gpu_index=cfg.gpu_index, memory_cap=cfg.memory_cap,
                                   cpu_memory=cfg.cpu_memory)
        self._cpu = device.kind == "cpu"
        speed = self._measured_speed(device.kind)
        context = self._measured_context(device.kind)
        if context is not None:
            device = device.model_copy(update={"context_bytes": context})
        with self._lock:
            reserved = sum(self._reserved.values())
            jobs = sorted(self._runners)
            reclaimed = self._reclaimed
            estimates = dict(self._reserved)
            per_gpu = {j: dict(g) for j, g in self._gpu_reserved.items()}
        free = device.free_memory if device.free_memory is not None else device.total_memory
        cores = slots = None
        if device.kind == "cpu":
            cores = cpu_cores()
            slots = cpu_slots(cores, cfg.cpu_threads, cfg.cpu_slots)
            free = self._cpu_free(device.total_memory, free, estimates)
        elif cfg.simulate_gpu is not None:
            # A simulated GPU does not see our jobs' allocations: subtract them.
            free = max(0, free - reserved)
        gpus, gpu_devices, gpu_reserved = self._gpus(device, free, estimates, per_gpu)
        return {
            "node_id": self.node_id,
            "name": cfg.name,
            "device": device.model_dump(mode="json"),
            "free_memory": free,
            "reserved_memory": reserved,
            # Every GPU of the node (free memory as for `device`), how a runner here names each
            # ("cuda:<i>"; "cpu" for a simulated one, which trains on the CPU) and the bytes
            # lorapool's jobs reserve on each: what a split over several GPUs is placed by.
            "gpus": [g.model_dump(mode="json") for g in gpus],
            "gpu_devices": gpu_devices,
            "gpu_reserved": gpu_reserved,
            "accepting": reclaimed is None,
            "state": "reclaimed" if reclaimed else ("training" if jobs else "idle"),
            "reclaim_reason": reclaimed,
            "jobs": jobs,
            "labels": cfg.labels,
            "datasets": sorted(cfg.datasets),
            "dataset_info": self._datasets.describe(),
            "cpu_cores": cores,
            "cpu_slots": slots,
            "speed_tflops": speed,
            # Base models this node's cache holds (content ids): placement sends a job where
            # its model needs no transfer when that finishes first.
            "cached_models": self.cached_models(),
            "heartbeat": time.time(),
        }

    def _gpus(self, device: Any, free: int, estimates: dict[str, int],
              per_gpu: dict[str, dict[int, int]]) -> tuple[list[Any], list[str], list[int]]:
        """(each GPU's DeviceInfo with free memory, its local device name, bytes reserved on
        it). The one-card GPU (`gpu_index`) is `device` itself with the report's free memory;
        a CPU node has none."""
        cfg = self.config
        if device.kind != "cuda" or cfg.cpu_only:
            return [], [], []
        # Bytes reserved on each GPU: a split job's own map; a one-card job's all on the
        # one-card GPU (index 0 of the list for simulated GPUs, `gpu_index` for real ones).
        first = 0 if cfg.simulate_gpu is not None else cfg.gpu_index

        def held(i: int) -> int:
            return sum(per_gpu[j].get(i, 0) if j in per_gpu else (est if i == first else 0)
                       for j, est in estimates.items())

        if cfg.simulate_gpu is not None:
            sims = cfg.simulate_gpus or [cfg.simulate_gpu]
            out = []
            for i, sim in enumerate(sims):
                if i == 0:
                    out.append(device.model_copy(update={"free_memory": free}))
                    continue
                info = detect_device(sim, memory_cap=cfg.memory_cap)
                out.append(info.model_copy(update={
                    "free_memory": max(0, int(info.free_memory or 0) - held(i))}))
            return out, ["cpu"] * len(out), [held(i) for i in range(len(out))]
        count = _cuda_device_count()
        if count < 2:  # one card: the report's `device` says it all
            return [device.model_copy(update={"free_memory": free})], \
                [f"cuda:{cfg.gpu_index}"], [held(cfg.gpu_index)]
        # Each card's own numbers (the driver's free memory counts our jobs already), read
        # through NVML: no CUDA context of this process on any card.
        out = [device.model_copy(update={"free_memory": free}) if i == cfg.gpu_index else
               detect_device(None, gpu_index=i, memory_cap=cfg.memory_cap,
                             cpu_memory=cfg.cpu_memory)
               for i in range(count)]
        return out, [f"cuda:{i}" for i in range(count)], [held(i) for i in range(count)]

    def cached_models(self) -> list[str]:
        """The content ids of the base models complete in this node's cache (what runners,
        workers and tasks here materialise under `work_dir/cache/models/<key>`, transfer.py);
        a folder still being written, without its `.complete` marker, does not count."""
        root = Path(self.config.work_dir) / "cache" / "models"
        try:
            return sorted(d.name for d in root.iterdir()
                          if not d.name.startswith(".") and (d / ".complete").is_file())
        except OSError:  # no cache yet
            return []

    def _measured_speed(self, kind: str) -> Optional[float]:
        """TFLOP/s from a short calibration matmul: at join time, then refreshed every
        `speed_refresh_s` while no job runs here (a job's own load would skew it, and the probe
        must not slow a job down). A simulated GPU reports its configured speed. A real GPU is
        measured by a child process in the background (devices.measure_speed_isolated): the
        agent holds no CUDA context on the donor's card, and a report never waits for the
        child's seconds of start-up; until the first reading the speed is None (unknown)."""
        sim = self.config.simulate_gpu
        if sim is not None and not self.config.cpu_only:
            return sim.speed_tflops
        now = time.monotonic()
        with self._lock:
            idle = not self._runners
            running = self._speed_probe is not None and self._speed_probe.is_alive()
        due = self._speed is None or (idle and now - self._speed_at >= self.config.speed_refresh_s)
        if not due or not (idle or self._speed is None) or running:
            return self._speed
        self._speed_at = now
        if kind != "cuda":  # a CPU matmul holds nothing: measure here, at once
            self._set_speed(measure_speed(kind, gpu_index=self.config.gpu_index))
        else:
            self._speed_probe = threading.Thread(
                target=lambda: self._set_speed(
                    measure_speed_isolated(kind, gpu_index=self.config.gpu_index)),
                daemon=True, name="lorapool-speed-probe")
            self._speed_probe.start()
        return self._speed

    def _set_speed(self, measured: Optional[float]) -> None:
        if measured is not None:
            self._speed = measured

    def _measured_context(self, kind: str) -> Optional[int]:
        """The CUDA context a training process takes on this card (context_probe.py), so that
        placement's estimate fits this card's driver instead of a constant; None until the
        probe is done (the estimate keeps its constant meanwhile), on CPU and simulated GPUs."""
        if kind != "cuda" or self.config.simulate_gpu is not None or self.config.cpu_only:
            return None
        if self._context_probe is None:
            self._context_probe = threading.Thread(target=self._probe_context, daemon=True,
                                                   name="lorapool-context-probe")
            self._context_probe.start()
        return self._context

    def _probe_context(self) -> None:
        from ..train.context_probe import measure_context_bytes

        for _ in range(CONTEXT_PROBE_TRIES):
            with self._lock:  # a job starting during the probe would be counted as context
                busy, seen = bool(self._runners), self._registrations
            if not busy:
                measured = measure_context_bytes(self.config.gpu_index)
                with self._lock:
                    undisturbed = not self._runners and self._registrations == seen
                if measured is not None and undisturbed:
                    self._context = measured
                    return
            time.sleep(CONTEXT_PROBE_RETRY_S)

    def _cpu_free(self, total: int, available: int, estimates: dict[str, int]) -> int:
        """RAM a new job may take: available now, less what each job here is still expected to
        grow into (its estimate minus the RSS it already holds, which `available` has seen);
        and never more than the offered total less every job's max(estimate, RSS)."""
        rss = self._runner_rss()
        outstanding = sum(max(0, est - rss.get(job, 0)) for job, est in estimates.items())
        held = sum(max(est, rss.get(job, 0)) for job, est in estimates.items())
        return max(0, min(available - outstanding, total - held))

    def _runner_rss(self) -> dict[str, int]:
        import psutil

        self._own_pids()  # resolves the pids that are known by now
        with self._lock:
            pids = dict(self._pid_values)
        out = {}
        for job, pid in pids.items():
            try:
                out[job] = int(psutil.Process(pid).memory_info().rss)
            except (psutil.Error, OSError):
                continue
        return out

    def local_config(self) -> dict[str, Any]:
        """For runners on this node only: the node-local folder and device kind."""
        kind = "cpu" if (self.config.cpu_only or self.config.simulate_gpu is not None) else None
        if kind is None:
            kind = detect_device(None, gpu_index=self.config.gpu_index).kind
        return {"work_dir": self.config.work_dir, "device_kind": kind,
                "datasets": dict(self.config.datasets), "cpu_threads": self.config.cpu_threads}

    # -- jobs ------------------------------------------------------------------------------
    def register_job(self, job_id: str, runner: Any, reserve_bytes: int,
                     slot: bool = True, gpus: Optional[dict[int, int]] = None) -> bool:
        """Track a runner placed here; False (and nothing tracked) when reclaimed meanwhile, or
        when a CPU node's slots are all taken (the scheduler's count is the first guard, this
        the node's own). `slot=False`: memory only, no CPU slot (the inference worker, whose
        loaded bases hold memory but no cores while idle). `gpus`: a split job's bytes on each
        GPU it holds (GPU index -> bytes; `reserve_bytes` is then their sum)."""
        if self._cpu is None:
            self.report()
        with self._lock:
            if self._reclaimed is not None:
                return False
            in_slots = [j for j in self._runners if j not in self._slotless]
            if slot and self._cpu and job_id not in self._runners and len(in_slots) >= cpu_slots(
                    cpu_cores(), self.config.cpu_threads, self.config.cpu_slots):
                return False
            if not slot:
                self._slotless.add(job_id)
            self._runners[job_id] = runner
            self._registrations += 1
            self._reserved[job_id] = int(reserve_bytes)
            if gpus:
                self._gpu_reserved[job_id] = {int(i): int(b) for i, b in gpus.items()}
            self._pids[job_id] = runner.pid.remote(self.node_id)
        return True

    def unregister_job(self, job_id: str) -> None:
        with self._lock:
            self._runners.pop(job_id, None)
            self._slotless.discard(job_id)
            self._reserved.pop(job_id, None)
            self._gpu_reserved.pop(job_id, None)
            self._pids.pop(job_id, None)
            self._pid_values.pop(job_id, None)

    # -- the owner -------------------------------------------------------------------------
    def reclaim(self, reason: str = "the owner reclaimed the GPU") -> list[str]:
        """Stop accepting jobs and ask the running ones to checkpoint and stop."""
        with self._lock:
            self._reclaimed = reason
            runners = dict(self._runners)
        for runner in runners.values():
            runner.request_stop.remote(f"preempted: {reason}", node=self.node_id)
        return sorted(runners)

    def accepting(self) -> bool:
        """False while the owner has the GPU back (a multi-worker job asks before it returns)."""
        with self._lock:
            return self._reclaimed is None

    def release(self) -> None:
        """The owner is gone again: accept jobs."""
        with self._lock:
            self._reclaimed = None

    def set_simulated_free(self, free_memory: Optional[int]) -> None:
        """Tests: another process on the simulated GPU took (or gave back) memory."""
        self._simulated_free = free_memory

    def _own_pids(self) -> set[int]:
        """The pids of this node's runners known so far. Never waits: a runner still starting
        (in a storm, dozens) must not hold every report up."""
        with self._lock:
            pending = {job: ref for job, ref in self._pids.items() if job not in self._pid_values}
        if pending:
            ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=0)
            ready_set = set(ready)
            for job, ref in pending.items():
                if ref in ready_set:
                    try:
                        pid = int(ray.get(ref, timeout=0))
                    except Exception:  # the runner died before it answered: no pid to keep
                        continue
                    with self._lock:
                        if job in self._pids:
                            self._pid_values[job] = pid
        with self._lock:
            return set(self._pid_values.values())

    def _apply_policy(self) -> None:
        reason = self._availability(self._own_pids())
        if reason and self._reclaimed is None:
            self.reclaim(reason)
        elif not reason and self._reclaimed is not None and self._reclaimed_by_policy:
            self.release()
        self._reclaimed_by_policy = bool(reason)

    _reclaimed_by_policy = False


def _cuda_device_count() -> int:
    """CUDA GPUs this process sees (the donor's CUDA_VISIBLE_DEVICES; runners on this node see
    the same ones, as lorapool's runners claim no Ray GPUs), 0 without CUDA."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken driver: the node is what `device` says
        return 0


RemoteNodeAgent = ray.remote(num_cpus=0, max_concurrency=8)(NodeAgent)


def agent_name(name: str) -> str:
    return AGENT_PREFIX + name


def start_agent(
    config: AgentConfig,
    *,
    node_id: Optional[str] = None,
    detached: bool = False,
    probe: Optional[Callable[[], Optional[GpuActivity]]] = None,
) -> Any:
    """Start (or find) the NodeAgent named `config.name`, pinned to `node_id` (default: here)."""
    node_id = node_id or ray.get_runtime_context().get_node_id()
    return RemoteNodeAgent.options(
        name=agent_name(config.name),
        namespace=NAMESPACE,
        get_if_exists=True,
        lifetime="detached" if detached else None,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
    ).remote(config, probe)


def list_agents() -> dict[str, Any]:
    """Every NodeAgent in the cluster, by agent name."""
    out = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry.get("namespace") == NAMESPACE and entry["name"].startswith(AGENT_PREFIX):
            try:
                out[entry["name"][len(AGENT_PREFIX):]] = ray.get_actor(entry["name"], namespace=NAMESPACE)
            except ValueError:  # died between listing and lookup
                continue
    return out
