"""Where queued jobs go: the pure placement policy (data in, decisions out; no Ray, HTTP or DB).

The scheduler (service/pool/scheduler.py) turns its node reports and queued jobs into
`NodeView`s and `JobView`s, calls `Placer.plan()` once per scheduling pass, and starts each
returned `Placement` pinned to its node. The benchmark (bench/placement.py) drives the same code
in a simulation.

The rules, in the order `plan()` applies them:

1. **Order (fair share).** Jobs are taken by priority (higher first), then by how many jobs
   their tenant already has running *or placed earlier in this pass* (fewer first), then by
   submit time. A tenant that floods the queue therefore gets one job placed per turn like
   everybody else, not all of its backlog first.
2. **Constraints.** A node is a candidate for a job when it is `accepting` (not reclaimed,
   offline or outside its schedule), is the pinned node if the job names one (`node_id`, by id or
   name), carries every label the job asks for, supports bf16 if required, and has at least
   `min_memory` bytes in total.
3. **Fit.** The memory estimate comes from `estimator(spec, node.device)` (the trainer's
   `estimate_memory`), so it differs by dtype and capability. A job fits a node only when
   `estimate * (1 + safety_margin) <= free_memory - promised`, where `free_memory` is what the
   driver sees (other users' processes count) and `promised` is what jobs placed but still
   starting will take. Memory placed in this pass is promised at once (`estimate.total`).
4. **Best fit.** Among nodes that fit, the one with the least memory left over wins (then fewer
   running jobs, then name), so big GPUs stay free for big jobs; several small jobs may share a
   large GPU (`max_jobs_per_node` caps that when set). A node may cap its own count too
   (`NodeView.max_jobs`: a CPU node's slots, one job per `cpu_threads` cores), and its memory
   is then its RAM, which the CPU estimate covers (runtime, weights as loaded, activations).
5. **Auto-fit.** When the job as submitted fits no candidate now, smaller variants are tried, in
   this order, and the first that fits some node is placed with the changes recorded as
   human-readable text for the job's events: halve `micro_batch_size` down to 1 (doubling
   accumulation, so the effective batch is the same); then the same again with gradient
   checkpointing on; then shorter `max_seq_len` (halving, down to the job's `min_seq_len`, only
   if the user allowed it). A job that still fits nowhere waits for the next pass.

`check_fits()` answers the API's question at submit time: could any node of the pool hold this
job (as submitted or auto-fitted) in its *total* memory, once its other jobs are done? If not,
it returns the refusal, e.g. "needs 9.1 GiB; largest free node has 7.6 GiB (rtx-3070-desk12)".

Estimates are cached per (job spec, auto-fit variant, device class); the estimator must depend
on the device only through `kind` and `compute_capability` (true for `estimate_memory`).

`FirstFitStatic` is the baseline the benchmark compares against: what plain Ray custom resources
would do (a fixed whole-GiB memory request per job against a static per-node capacity, first
node in order, FIFO, no auto-fit, blind to other processes' memory).
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ..train.memory import MemoryEstimate, estimate_memory
from ..train.spec import DeviceInfo, TrainSpec

log = logging.getLogger("lorapool.pool.placement")

GiB = 1024**3

Estimator = Callable[[TrainSpec, DeviceInfo], MemoryEstimate]


@dataclass
class NodeView:
    """One node as the policy sees it (built by the scheduler from its NodeAgent's report)."""

    node_id: str
    name: str
    device: DeviceInfo
    free_memory: int  # bytes free as the driver sees it (other processes count)
    promised: int = 0  # bytes promised to jobs placed here that are still starting
    labels: dict[str, str] = field(default_factory=dict)
    accepting: bool = True  # False: reclaimed, offline or outside the donation schedule
    running_jobs: int = 0
    # At most this many jobs at once (a CPU node's slots: its cores over a job's threads); None:
    # memory alone decides. Runners still dying count as running until they are gone.
    max_jobs: int | None = None

    @property
    def available(self) -> int:
        return self.free_memory - self.promised


@dataclass
class JobView:
    """One queued job and its placement constraints."""

    job_id: str
    tenant: str
    spec: TrainSpec
    priority: int = 0  # higher goes first
    submitted_at: float = 0.0
    min_memory: int | None = None  # the node's total memory must be at least this
    labels: dict[str, str] = field(default_factory=dict)  # the node must carry all of them
    node_id: str | None = None  # pinned to this node (id or name), e.g. for node-local data
    require_bf16: bool = False
    min_seq_len: int | None = None  # auto-fit may shorten max_seq_len down to this
    allow_autofit: bool = True  # False: place exactly as submitted or wait
    # Nodes where earlier attempts failed (lost, preempted, OOM): used only when no other fits.
    avoid_nodes: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Placement:
    """One decision: run `job_id` on `node_id` with `spec` (maybe auto-fitted)."""

    job_id: str
    node_id: str
    spec: TrainSpec
    estimate: MemoryEstimate
    changes: list[str] = field(default_factory=list)


# A variant of a job's spec: (micro_batch_size, gradient_checkpointing, max_seq_len).
Variant = tuple[int, bool, int]


def _fmt(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def autofit_variants(job: JobView) -> Iterator[Variant]:
    """The spec as submitted, then the auto-fit variants in the order they are tried."""
    s = job.spec
    yield (s.micro_batch_size, s.gradient_checkpointing, s.max_seq_len)
    if not job.allow_autofit:
        return
    micros = [s.micro_batch_size]
    while micros[-1] > 1:
        # The largest divisor of batch_size at most half the current micro-batch: the effective
        # batch stays batch_size (accumulation makes up the rest).
        m = micros[-1] // 2
        while s.batch_size % m:
            m -= 1
        micros.append(m)
    seqs = [s.max_seq_len]
    if job.min_seq_len is not None and job.min_seq_len < s.max_seq_len:
        floor = max(8, job.min_seq_len)
        while seqs[-1] > floor:
            seqs.append(max(floor, seqs[-1] // 2))
    ckpts = [s.gradient_checkpointing] + ([True] if not s.gradient_checkpointing else [])
    seen = {(s.micro_batch_size, s.gradient_checkpointing, s.max_seq_len)}
    for seq in seqs:
        for ckpt in ckpts:
            for micro in micros:
                v = (micro, ckpt, seq)
                if v not in seen:
                    seen.add(v)
                    yield v


def _describe_changes(job: JobView, v: Variant, node: NodeView) -> list[str]:
    s = job.spec
    where = f"to fit {node.name} ({_fmt(node.available)} free)"
    out = []
    micro, ckpt, seq = v
    if micro != s.micro_batch_size:
        out.append(f"micro_batch_size {s.micro_batch_size} → {micro}, gradient accumulation "
                   f"{s.grad_accum_steps} → {s.batch_size // micro} (same effective batch "
                   f"{s.batch_size}) {where}")
    if ckpt != s.gradient_checkpointing:
        out.append(f"gradient checkpointing turned on {where}")
    if seq != s.max_seq_len:
        out.append(f"max_seq_len {s.max_seq_len} → {seq} (allowed down to {job.min_seq_len}) "
                   f"{where}")
    return out


def _device_class(device: DeviceInfo) -> tuple:
    return (device.kind, tuple(device.compute_capability))


class Placer:
    """lorapool's placement policy; see the module docstring.

    `estimator(spec, device) -> MemoryEstimate`; `safety_margin` is the fraction added to each
    estimate before comparing with a node's free memory. Errors the estimator raises for a job
    (say its model vanished) do not stop the pass: the job is skipped and the message kept in
    `last_errors[job_id]` for the scheduler to act on.
    """

    def __init__(
        self,
        estimator: Estimator = estimate_memory,
        safety_margin: float = 0.10,
        *,
        max_jobs_per_node: int | None = None,
        cache_size: int = 200_000,
    ) -> None:
        if safety_margin < 0:
            raise ValueError(f"safety_margin must be >= 0, got {safety_margin}")
        self.estimator = estimator
        self.safety_margin = safety_margin
        self.max_jobs_per_node = max_jobs_per_node
        self.cache_size = cache_size
        self.last_errors: dict[str, str] = {}
        self._cache: dict[tuple, MemoryEstimate] = {}
        self._fingerprints: dict[str, tuple[int, str]] = {}

    # -- estimates ------------------------------------------------------------------------------
    def _fingerprint(self, job: JobView) -> str:
        # model_dump_json costs ~10 µs; keep it per job while its spec object is the same one.
        hit = self._fingerprints.get(job.job_id)
        if hit is not None and hit[0] == id(job.spec):
            return hit[1]
        fp = job.spec.model_dump_json()
        if len(self._fingerprints) > self.cache_size:
            self._fingerprints.clear()
        self._fingerprints[job.job_id] = (id(job.spec), fp)
        return fp

    def variant_spec(self, job: JobView, v: Variant) -> TrainSpec:
        s = job.spec
        if v == (s.micro_batch_size, s.gradient_checkpointing, s.max_seq_len):
            return s
        micro, ckpt, seq = v
        return s.model_copy(update={"micro_batch_size": micro, "gradient_checkpointing": ckpt,
                                    "max_seq_len": seq})

    def estimate(self, job: JobView, v: Variant, device: DeviceInfo) -> MemoryEstimate:
        """The (cached) estimate of `job` in variant `v` on `device`."""
        key = (self._fingerprint(job), v, _device_class(device))
        hit = self._cache.get(key)
        if hit is None:
            hit = self.estimator(self.variant_spec(job, v), device)
            if len(self._cache) >= self.cache_size:
                self._cache.clear()
            self._cache[key] = hit
        return hit

    def need(self, est: MemoryEstimate) -> int:
        """Bytes a node must have available for a job with this estimate."""
        return math.ceil(est.total * (1.0 + self.safety_margin))

    # -- constraints ------------------------------------------------------------------------------
    @staticmethod
    def matches(job: JobView, node: NodeView) -> bool:
        """The job's constraints (pinned node, labels, bf16, minimum memory) allow this node."""
        if job.node_id is not None and job.node_id not in (node.node_id, node.name):
            return False
        if job.require_bf16 and not node.device.supports_bf16:
            return False
        if job.min_memory is not None and node.device.total_memory < job.min_memory:
            return False
        return all(node.labels.get(k) == v for k, v in job.labels.items())

    @staticmethod
    def _constraint_text(job: JobView) -> str:
        parts = []
        if job.node_id is not None:
            parts.append(f"node {job.node_id!r}")
        if job.labels:
            parts.append("labels " + ", ".join(f"{k}={v}" for k, v in sorted(job.labels.items())))
        if job.require_bf16:
            parts.append("bf16")
        if job.min_memory is not None:
            parts.append(f"at least {_fmt(job.min_memory)} of GPU memory")
        return "; ".join(parts) or "none"

    # -- one pass -------------------------------------------------------------------------------
    def plan(
        self,
        queue: list[JobView],
        nodes: list[NodeView],
        running_by_tenant: dict[str, int] | None = None,
    ) -> list[Placement]:
        """One scheduling pass: where each queued job that fits somewhere now should run.

        Never places a job where `estimate * (1 + margin) > free - promised` (with memory placed
        earlier in the same pass counted as promised). The inputs are not modified.
        """
        self.last_errors = {}
        open_nodes = [n for n in nodes if n.accepting]
        if not queue or not open_nodes:
            return []
        avail = {n.node_id: n.available for n in open_nodes}
        count = {n.node_id: n.running_jobs for n in open_nodes}
        load = dict(running_by_tenant or {})

        # Per tenant: its jobs by (priority desc, submit time); a heap of the tenants' heads.
        per_tenant: dict[str, list[JobView]] = {}
        for job in queue:
            per_tenant.setdefault(job.tenant, []).append(job)
        for jobs in per_tenant.values():
            jobs.sort(key=lambda j: (-j.priority, j.submitted_at, j.job_id), reverse=True)
        heap = []
        for tenant, jobs in per_tenant.items():
            j = jobs[-1]
            heap.append((-j.priority, load.get(tenant, 0), j.submitted_at, j.job_id, tenant))
        heapq.heapify(heap)

        placements: list[Placement] = []
        while heap:
            _, _, _, _, tenant = heapq.heappop(heap)
            job = per_tenant[tenant].pop()
            placed = self._place_one(job, open_nodes, avail, count)
            if placed is not None:
                placements.append(placed)
                avail[placed.node_id] -= placed.estimate.total
                count[placed.node_id] += 1
                load[tenant] = load.get(tenant, 0) + 1
            if per_tenant[tenant]:
                j = per_tenant[tenant][-1]
                heapq.heappush(heap, (-j.priority, load.get(tenant, 0), j.submitted_at,
                                      j.job_id, tenant))
        return placements

    def _place_one(self, job: JobView, nodes: list[NodeView], avail: dict[str, int],
                   count: dict[str, int]) -> Placement | None:
        if job.avoid_nodes:
            others = [n for n in nodes
                      if n.node_id not in job.avoid_nodes and n.name not in job.avoid_nodes]
            placed = self._place_among(job, others, avail, count)
            if placed is not None:
                return placed
        return self._place_among(job, nodes, avail, count)

    def _place_among(self, job: JobView, nodes: list[NodeView], avail: dict[str, int],
                     count: dict[str, int]) -> Placement | None:
        cands = [n for n in nodes if self.matches(job, n)
                 and (self.max_jobs_per_node is None or count[n.node_id] < self.max_jobs_per_node)
                 and (n.max_jobs is None or count[n.node_id] < n.max_jobs)]
        if not cands:
            return None
        classes: dict[tuple, DeviceInfo] = {}
        for n in cands:
            classes.setdefault(_device_class(n.device), n.device)
        most = max(avail[n.node_id] for n in cands)
        try:
            variants = list(autofit_variants(job))
            # Cheap early exit: if even the smallest variant fits no candidate, skip the job.
            smallest = variants[-1]
            if all(self.need(self.estimate(job, smallest, dev)) > most
                   for dev in classes.values()):
                return None
            for v in variants:
                need = {c: self.need(self.estimate(job, v, dev)) for c, dev in classes.items()}
                best: tuple | None = None
                for n in cands:
                    left = avail[n.node_id] - need[_device_class(n.device)]
                    if left < 0:
                        continue
                    key = (left, count[n.node_id], n.name)
                    if best is None or key < best[0]:
                        best = (key, n)
                if best is not None:
                    node = best[1]
                    est = self.estimate(job, v, node.device)
                    view = NodeView(node.node_id, node.name, node.device, node.free_memory,
                                    node.free_memory - avail[node.node_id])
                    return Placement(job.job_id, node.node_id, self.variant_spec(job, v), est,
                                     _describe_changes(job, v, view))
        except Exception as exc:  # noqa: BLE001 - one bad job must not stop the pass
            log.warning("cannot estimate %s: %s", job.job_id, exc)
            self.last_errors[job.job_id] = f"{type(exc).__name__}: {exc}"
        return None

    # -- submit-time check ----------------------------------------------------------------------
    def check_fits(self, job: JobView, nodes: list[NodeView]) -> str | None:
        """None when some node could hold the job (as submitted or auto-fitted) in its total
        memory, now or once it is free; else the refusal message. An empty pool says None (a
        donor may still join). `accepting` is ignored: a reclaimed node comes back."""
        if not nodes:
            return None
        cands = [n for n in nodes if self.matches(job, n)]
        if not cands:
            return f"no node matches the job's constraints ({self._constraint_text(job)})"
        variants = list(autofit_variants(job))
        smallest = variants[-1]
        best_short: tuple[int, int, NodeView] | None = None  # (capacity, need, node)
        for n in cands:
            need = self.need(self.estimate(job, smallest, n.device))
            if need <= n.device.total_memory:
                return None
            cap = n.device.total_memory
            if best_short is None or (cap, -need) > (best_short[0], -best_short[1]):
                best_short = (cap, need, n)
        assert best_short is not None
        cap, need, node = best_short
        ram = " of RAM" if node.device.kind == "cpu" else ""  # a CPU node trains in its RAM
        msg = f"needs {_fmt(need)}{ram}; largest free node has {_fmt(cap)}{ram} ({node.name})"
        if len(variants) > 1:
            micro, ckpt, seq = smallest
            msg += (f" (smallest setting tried: micro_batch_size {micro}, "
                    f"gradient checkpointing {'on' if ckpt else 'off'}, max_seq_len {seq})")
        return msg


class FirstFitStatic:
    """The baseline: what plain Ray custom resources would do.

    Each job asks for a fixed number of whole-GiB "memory units" (its estimate on a reference
    GPU, rounded up, as a user would declare it once), taken from each node's static capacity
    (its total memory in whole GiB, as declared when the node joined). Jobs go in submit order
    (FIFO, no fair share) to the first node, in the order given, with enough units left. No
    auto-fit; other processes' memory is invisible to it.

    Unlike `Placer` it is stateful, like Ray's resource accounting: `plan()` takes units, and
    `release(job_id)` gives them back when a job ends or leaves its node.
    """

    def __init__(self, estimator: Estimator = estimate_memory, *,
                 reference_device: DeviceInfo | None = None, unit: int = GiB) -> None:
        self.estimator = estimator
        self.reference = reference_device or DeviceInfo(
            kind="cuda", name="reference", total_memory=24 * GiB, compute_capability=(8, 6))
        self.unit = unit
        self._held: dict[str, tuple[str, int]] = {}  # job_id -> (node_id, units)
        self._units: dict[str, int] = {}  # job_id -> units requested

    def units(self, job: JobView) -> int:
        if job.job_id not in self._units:
            est = self.estimator(job.spec, self.reference)
            self._units[job.job_id] = max(1, math.ceil(est.total / self.unit))
        return self._units[job.job_id]

    def capacity(self, node: NodeView) -> int:
        return node.device.total_memory // self.unit

    def used(self, node_id: str) -> int:
        return sum(u for n, u in self._held.values() if n == node_id)

    def release(self, job_id: str) -> None:
        self._held.pop(job_id, None)

    def check_fits(self, job: JobView, nodes: list[NodeView]) -> str | None:
        """Ray's "infeasible": no node's static capacity covers the request."""
        cands = [n for n in nodes if Placer.matches(job, n)]
        if not nodes or any(self.capacity(n) >= self.units(job) for n in cands):
            return None
        return f"needs {self.units(job)} memory units; no node has that many"

    def plan(self, queue: list[JobView], nodes: list[NodeView],
             running_by_tenant: dict[str, int] | None = None) -> list[Placement]:
        used = {n.node_id: self.used(n.node_id) for n in nodes}
        out = []
        for job in sorted(queue, key=lambda j: (j.submitted_at, j.job_id)):
            if job.job_id in self._held:
                continue
            want = self.units(job)
            for n in nodes:
                if not n.accepting or not Placer.matches(job, n):
                    continue
                if self.capacity(n) - used[n.node_id] >= want:
                    used[n.node_id] += want
                    self._held[job.job_id] = (n.node_id, want)
                    out.append(Placement(job.job_id, n.node_id, job.spec,
                                         self.estimator(job.spec, n.device), []))
                    break
        return out


__all__ = ["FirstFitStatic", "JobView", "NodeView", "Placement", "Placer", "autofit_variants"]
