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
4. **Earliest expected finish.** Among nodes that fit, the job goes where it is expected to
   finish first: transfer of the base model (none where the node already caches it) + the
   job's work (tokens × per-token FLOPs of its model shape, over the fraction of the card's
   speed a step of its micro-batch reaches: `step_efficiency`) / the node's measured speed,
   shared with the jobs already computing on that GPU. Ties (same speed class, same load) go to the
   node with the least memory left over (best fit), so big GPUs stay free for big jobs. Nodes
   with no measured speed count at `default_speed` and are never treated as shared, which makes
   this rule plain best fit when no node reports a speed. A node may cap its own job count
   (`NodeView.max_jobs`: a CPU node's slots, one job per `cpu_threads` cores), and its memory is
   then its RAM, which the CPU estimate covers.
5. **Auto-fit.** When the job as submitted fits no candidate now, smaller variants are tried, in
   this order, and the first that fits some node is placed with the changes recorded as
   human-readable text for the job's events: halve `micro_batch_size` down to 1 (doubling
   accumulation, so the effective batch is the same); then the same again with gradient
   checkpointing on; then shorter `max_seq_len` (halving, down to the job's `min_seq_len`, only
   if the user allowed it). A job that still fits nowhere waits for the next pass. An
   auto-fitted variant runs slower for the whole job (a smaller micro-batch reaches less of the
   card, checkpointing recomputes): when a node that frees within `max_wait_s` would hold the
   job as submitted and finish it sooner, the job waits for that node instead, which is claimed
   for it as in rule 6 (at most `max_room_waits` such jobs per pass).
   **Fit-up.** The other way round, a job placed as submitted on a node with room to spare
   runs a larger micro-batch (same effective batch: `_fit_up`), up to the first that carries
   `fit_up_work` (tokens × compute params) and within half of what the node would have left,
   never at the cost of the fast path's richer configuration there.
6. **Waiting for a much faster card (bounded).** A job that would start now on a node that is
   at least `wait_speedup` × slower than a busy node of the pool waits instead, when that faster
   node is expected to free (`NodeView.frees_in`) within `max_wait_s` *and* early enough that
   the job still finishes there first. With `wait_counts_sharing`, "slower" counts the
   sharing: on a GPU already computing k jobs a newcomer gets 1/(k + 1) of its speed, so a card
   as fast that frees in minutes (where it would run alone) is worth waiting for too. In a busy
   pool most of a job's completion time is its run slowed by sharing, not its wait: on
   bench/placement.py's traces this (the default) shortens the mean completion time by a tenth
   or more against counting the card's own speed (README), at the price of more jobs checking
   for a card to wait for: most are ruled out without a walk (`_Pass.soon_first`). The
   node waited for is then claimed for it (its free memory then counts only for jobs that end
   before it frees: `_Pass.room`). A long job may wait longer: up to `wait_fraction` of
   its expected run on the slow card (at most `max_long_wait_s`), so that a job of days does
   not spend them on the slowest card of the pool because the fast ones were busy for the
   first half hour.
7. **Reservation and backfill.** The oldest jobs that fit nowhere now (up to
   `max_reservations` per pass, by priority then age) claim the node where they would finish
   first once its running jobs end. A claimed node still takes other jobs, but only those
   expected to finish before it frees (backfill into the gap), so small jobs never starve a big
   one.

`plan()` is built to stay in the low milliseconds at thousands of queued jobs and hundreds of
nodes: per-job estimates, work, the smallest need and the configurations per device class are
cached across passes; jobs that need more than the largest free node skip the pass in O(1);
the open nodes are bucketed by (device class, speed, load), each bucket a list sorted by free
memory (bisect), and the buckets are walked in one list by rate (speed / (1 + load)), so a
placement costs O(buckets visited · log nodes), not O(nodes): a bucket where the job fits no
node is skipped on its most free memory, and the first that fits but loses on rate alone ends
the walk (checked against a full scan in tests/pool/test_placement_index.py). Per-variant data
is kept by index and device classes as small ints, since hashing tuples was a large share of
the hot loop. Jobs with node constraints take a plain linear scan. A job's turn (priority,
turn, smallest need, tenant, ...) is one cached tuple while its view object comes back, so a
pass reads one object per waiting job, and a tenant's turns keep their sorted order while the
same ones come back. Nothing a pass builds is in a reference cycle (bucket keys name an entry
by index), so it all goes by reference counting when the pass ends; cyclic garbage from every
pass had made the collector's sweeps the slow tail of `plan()`
(tests/pool/test_placement_gc.py).

`check_fits()` answers the API's question at submit time: could any node of the pool hold this
job (as submitted or auto-fitted) in its *total* memory, once its other jobs are done? If not,
it returns the refusal, e.g. "needs 9.1 GiB; largest free node has 7.6 GiB (rtx-3070-desk12)".

Estimates are cached per (job spec, auto-fit variant, device class); the estimator must depend
on the device only through `kind` and `compute_capability` (true for `estimate_memory`).

The baselines the benchmark compares against (what a user who skipped lorapool would script
with Ray custom resources) are in placement_baselines.py.
"""

from __future__ import annotations

import bisect
import heapq
import logging
import math
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from ..train.memory import MemoryEstimate, estimate_memory, fast_variants, model_shape
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
    # Measured dense TFLOP/s (bf16 matmul on a GPU, fp32 on a CPU); None: not measured yet.
    speed: float | None = None
    # Content ids of the base models this node already caches (no transfer needed).
    cached_models: frozenset[str] = frozenset()
    # Seconds until the jobs running here are expected to end (None: unknown or idle), and the
    # bytes available then (None: unknown). Used to wait for or reserve a busy node.
    frees_in: float | None = None
    free_at_end: int | None = None

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
    # Training tokens the job will process (None: from max_steps, else `default_tokens`).
    tokens: float | None = None
    # The base model's content id and the bytes a node must fetch when it does not cache it.
    model_key: str | None = None
    model_bytes: int | None = None

    @property
    def constrained(self) -> bool:
        return bool(self.node_id is not None or self.labels or self.require_bf16
                    or self.min_memory is not None or self.avoid_nodes)


@dataclass(frozen=True)
class Placement:
    """One decision: run `job_id` on `node_id` with `spec` (maybe auto-fitted)."""

    job_id: str
    node_id: str
    spec: TrainSpec
    estimate: MemoryEstimate
    changes: list[str] = field(default_factory=list)
    expected_s: float | None = None  # expected transfer + run time there (seconds)


def _placement(job_id: str, node_id: str, spec: TrainSpec, estimate: MemoryEstimate,
               changes: list[str], expected_s: float | None) -> Placement:
    """`Placement(...)`, built without the frozen dataclass's per-field `object.__setattr__`
    (a third of a placement's cost in `plan()`); the same fields, the same object."""
    p = _new_placement(Placement)
    p.__dict__.update(job_id=job_id, node_id=node_id, spec=spec, estimate=estimate,
                      changes=changes, expected_s=expected_s)
    return p


_new_placement = object.__new__

# More bytes than any node has: "no fit-up here" compares as never fitting.
_NEVER = 1 << 80

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


def _describe_changes(job: JobView, v: Variant, node_name: str, available: int) -> list[str]:
    s = job.spec
    where = f"to fit {node_name} ({_fmt(available)} free)"
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


def _richness(est: MemoryEstimate) -> int:
    """How much of the fast path a configuration keeps: CUDA graphs, head on the GPU, head on
    the host."""
    return 2 if est.graphs else 0 if est.host_head else 1


def _device_class(device: DeviceInfo) -> tuple:
    return (device.kind, tuple(device.compute_capability))


def flops_per_token(params: int, checkpointing: bool) -> float:
    """Training FLOPs per token of a QLoRA step: forward (2·P) + input-gradient backward (2·P),
    + one more forward when activations are recomputed. The frozen base has no weight-gradient
    pass; the adapters' own FLOPs are negligible next to it."""
    return 2.0 * params * (2 + (1 if checkpointing else 0))


def step_efficiency(micro_batch: int, seq_len: int, params: int, saturation: float,
                    exponent: float) -> float:
    """The fraction of a card's speed a training step of this size reaches. A micro-batch
    whose work (tokens x compute params) is below `saturation` leaves the GPU waiting on kernel
    launches and small matmuls: the README's speed table measured micro-batch 4 at 1.4-1.9x the
    tokens/s of micro-batch 1 (1.94x for 1B, 1.66x for 3B, 1.43x for 8B at seq 2048), i.e.
    speed ~ work^0.24..0.48 there; past `saturation` a larger one gains nothing (fit-up's
    rule). 1.0 where either bound is off (0)."""
    if saturation <= 0 or exponent <= 0:
        return 1.0
    return min(1.0, micro_batch * seq_len * params / saturation) ** exponent


def compute_params(spec: TrainSpec) -> int:
    """Parameters that cost FLOPs per token (embedding lookups do not), from the model shape."""
    shape = model_shape(spec)
    return max(1, shape.total_params - shape.vocab_size * shape.hidden_size)


@dataclass(slots=True)  # attributes inside the object: fewer cache lines per job
class _JobInfo:
    """What `plan()` caches per job across passes (valid while its view, or an equal spec with the
    same auto-fit inputs, comes back). Per-variant data is kept in lists by the variant's index
    in `variants` (hashing a variant tuple on every look-up cost more than the rest)."""

    variants: list[Variant]
    params: int
    tokens: float
    # Per variant: its FLOPs over the fraction of a card's speed its step reaches
    # (`step_efficiency`): seconds at one FLOP/s, so work / speed is its run time.
    works: list[float]
    # need[i][device class id] → bytes a node must have available; est[i][class id] → estimate
    need: list[dict[int, int] | None] = field(default_factory=list)
    est: list[dict[int, MemoryEstimate] | None] = field(default_factory=list)
    min_need: dict[frozenset, int] = field(default_factory=dict)  # per class set: smallest need
    # The variant specs handed out in placements (built once: model_copy costs ~10 µs).
    specs: list[TrainSpec | None] = field(default_factory=list)
    size: float = 0.0  # work of the job as submitted (its size when ordering by run time)
    least_work: float = 0.0  # the least over its variants (a bound on its run anywhere)
    # Per device class id: the larger micro-batches the job may run with where memory allows
    # (`Placer.fit_up_work`; `Placer._fit_up_table`).
    up: dict[int, list] | None = None
    # Per device class id: the least room any fit-up there needs (the next micro-batch's
    # minimum; `_NEVER` where there is none), so that a node without that room skips `_fit_up`
    # in O(1): most placements are such, and the call alone cost more than the test.
    up_floor: dict[int, int] = field(default_factory=dict)
    # Per variant, per device class id: its configurations, richest first and the minimum last
    # (`Placer._configurations`), looked up by index here instead of by the estimate's id.
    rich: list[dict[int, list[tuple[int, MemoryEstimate, int]]]] = field(default_factory=list)
    # The class set each `need` entry is complete for (identity: interned per placer).
    ready: list[frozenset | None] = field(default_factory=list)
    # Per variant: its smallest need over the device classes of `ready` (skips, in O(1), a
    # variant no node has room for).
    least: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.variants)
        self.need, self.est = [None] * n, [None] * n
        self.specs, self.ready = [None] * n, [None] * n
        self.rich = [{} for _ in range(n)]
        self.least = [0] * n
        self.size = self.works[0]
        self.least_work = min(self.works)


class _Entry:
    """One open node inside a pass: its remaining memory and job count."""

    __slots__ = ("node", "name", "node_id", "cached_models", "avail", "count", "cap", "speed",
                 "shared", "cls", "claim", "key", "groups", "idx")

    def __init__(self, node: NodeView, cap: int | None, speed: float, shared: bool, cls: int,
                 idx: int):
        self.node = node
        self.idx = idx  # its place in the pass's entry list
        # The node's fields the hot loops read, one attribute hop closer.
        self.name = node.name
        self.node_id = node.node_id
        self.cached_models = node.cached_models
        self.avail = node.free_memory - node.promised  # NodeView.available
        self.count = node.running_jobs
        self.cap = cap
        self.speed = speed  # FLOP/s a job reaches alone there
        self.shared = shared  # jobs computing together share the GPU's speed
        self.cls = cls
        self.claim: tuple[str, float] | None = None  # (job id, seconds until it frees)
        # (avail, name, id, idx): its place in a group's bucket (ids are unique, so the index
        # is never compared). The index, not the entry itself: an entry holding a tuple that
        # holds it would be a reference cycle, and every pass's entries, buckets and groups
        # would then wait for the garbage collector (whose gen-1 pass over them was the slow
        # tail of plan()) instead of going when the pass ends.
        self.key: tuple | None = ()  # None: unlisted, no job of the pass fits (retire_below)
        # The indexes it is listed in: its speed group, and one group per base model it caches.
        self.groups: list[_Group] = []

    def full(self) -> bool:
        return self.cap is not None and self.count >= self.cap

    def rate(self) -> float:
        return self.speed / (1 + self.count) if self.shared else self.speed


# Below 1 by far more than float rounding: a rate bound computed from the best score so far
# prunes only buckets whose every node scores strictly worse.
_LIM_SLACK = 1.0 - 1e-9


class _Index:
    """Every load bucket of one source of nodes (all open nodes, or those caching one base
    model), fastest rate first: `order` holds (rate, device class, keys, avails) per bucket,
    rate = the group's speed / (1 + load), a job's speed on every node listed there (computed
    once, the same float as a score). `_Pass._best_fast` walks it until a bucket's rate alone
    loses, so it visits few buckets however many speed groups the pool has. `ranks` holds each
    bucket's place, (-rate, group number, load), for bisect when a bucket opens or closes."""

    __slots__ = ("order", "ranks")

    def __init__(self) -> None:
        self.order: list[tuple[float, int, list[tuple], list[int]]] = []
        self.ranks: list[tuple[float, int, int]] = []

    def insert(self, g: _Group, load: int, keys: list[tuple], avs: list[int]) -> None:
        rate = g.speed / (1 + load)
        rank = (-rate, g.seq, load)
        i = bisect.bisect_left(self.ranks, rank)
        self.ranks.insert(i, rank)
        self.order.insert(i, (rate, g.dev_cls, keys, avs))

    def remove(self, g: _Group, load: int) -> None:
        i = bisect.bisect_left(self.ranks, (-(g.speed / (1 + load)), g.seq, load))
        del self.ranks[i]
        del self.order[i]


class _Group:
    """Open nodes of one (device class, speed) group of a source, by load: each load's bucket
    holds the keys (avail, name, id, entry index) sorted, and beside them the same nodes' free
    memory alone (an int list bisects faster than tuples and needs no probe tuple). Every
    bucket is listed in its source's `_Index`; one that empties is dropped from both
    (`_Pass._take`)."""

    __slots__ = ("speed", "dev_cls", "buckets", "index", "seq")

    def __init__(self, speed: float, dev_cls: int, index: _Index, seq: int):
        self.speed = speed
        self.dev_cls = dev_cls
        self.buckets: dict[int, tuple[list[tuple], list[int]]] = {}
        # The source's index (it holds the buckets' lists, never the group: no cycle).
        self.index = index
        self.seq = seq  # its number in the source: a fixed order among equal rates

    def build(self) -> None:
        """Sort the buckets filled in one go and list them in the index."""
        for load, (keys, avs) in self.buckets.items():
            keys.sort()
            avs[:] = [k[0] for k in keys]
            self.index.insert(self, load, keys, avs)

    def open_bucket(self, load: int) -> tuple[list[tuple], list[int]]:
        """A new, empty bucket for `load`, listed in the index."""
        b = self.buckets[load] = ([], [])
        self.index.insert(self, load, b[0], b[1])
        return b

    def close_bucket(self, load: int) -> None:
        """Drop the emptied bucket of `load` from the group and the index."""
        del self.buckets[load]
        self.index.remove(self, load)


class _Turn(NamedTuple):
    """A waiting job's place in `plan()`'s order, cached while its view object comes back.
    The first three fields decide the order (job ids are unique, so tuples compare no further);
    the rest is what the pass reads about the job without touching the view again."""

    neg_priority: int
    turn: float  # submit time, pushed back by the job's expected size
    job_id: str
    job: JobView
    info: _JobInfo
    min_need: int  # its smallest need on any device class of the pass
    class_set: frozenset  # the device classes `min_need` was taken over
    kw: float  # the size weight the turn was computed with
    tenant: str
    constrained: bool


class Placer:
    """lorapool's placement policy; see the module docstring.

    `estimator(spec, device) -> MemoryEstimate`; `safety_margin` is the fraction added to each
    estimate before comparing with a node's free memory. Errors the estimator raises for a job
    (say its model vanished) do not stop the pass: the job is skipped and the message kept in
    `last_errors[job_id]` for the scheduler to act on.

    Speed: `default_speed` TFLOP/s stands in for a node that has not measured itself yet;
    `efficiency` is the fraction of a node's measured matmul speed a QLoRA step reaches
    (dequantisation, attention, the optimizer); `link_bytes_per_s` is the head → node link the
    base model travels over; `default_tokens` is a job's size when neither its tokens nor its
    steps are known. `wait_speedup`/`max_wait_s` bound waiting for a faster card (0 turns it
    off); a long job may wait longer, up to `wait_fraction` of its expected run time on the card
    it would start on now, but never past `max_long_wait_s` (an 80-hour job on a slow card is
    worth a few hours' wait for one three times as fast; a ten-minute job is not); `max_reservations` bounds how many blocked jobs claim a node per pass (0 turns
    reservation and the backfill rule off). `graphs`: a job placed on a node with room to spare
    reserves there the richest configuration of the fast path that node holds (memory.py
    `fast_variants`: its output head on the GPU, CUDA graphs' pool), which its trainer then
    uses; every fit test before that uses the job's minimum (the estimate). `step_exponent`:
    how a micro-batch below `fit_up_work` slows a step (`step_efficiency`; 0: not at all), so
    that expected run times, the turn order and auto-fit's choice see it. `max_room_waits`
    bounds how many jobs per pass wait for a node with room for them as submitted rather than
    start auto-fitted (each claim lets only jobs that end before the node frees use it; a pass
    with many claimed nodes also spends its time on jobs that fit only there).
    `wait_counts_sharing`: the wait for a faster card compares against the job's share of a
    shared card, not the card's own speed (rule 6 of the module docstring).
    """

    def __init__(
        self,
        estimator: Estimator = estimate_memory,
        safety_margin: float = 0.10,
        *,
        max_jobs_per_node: int | None = None,
        cache_size: int = 200_000,
        default_speed: float = 10.0,
        efficiency: float = 0.3,
        link_bytes_per_s: float = 100e6,
        default_tokens: float = 1e6,
        wait_speedup: float = 3.0,
        max_wait_s: float = 1800.0,
        wait_fraction: float = 0.25,
        max_long_wait_s: float = 6 * 3600.0,
        max_reservations: int = 2,
        size_weight: float = 1.0,
        graphs: bool = True,
        fit_up_work: float = 4e12,
        step_exponent: float = 0.3,
        max_room_waits: int = 4,
        wait_counts_sharing: bool = True,
    ) -> None:
        if safety_margin < 0:
            raise ValueError(f"safety_margin must be >= 0, got {safety_margin}")
        self.estimator = estimator
        self.safety_margin = safety_margin
        self.max_jobs_per_node = max_jobs_per_node
        self.cache_size = cache_size
        self.default_speed = default_speed
        self.efficiency = efficiency
        self.link_bytes_per_s = link_bytes_per_s
        self.default_tokens = default_tokens
        self.wait_speedup = wait_speedup
        self.max_wait_s = max_wait_s
        self.wait_fraction = wait_fraction
        self.max_long_wait_s = max(max_wait_s, max_long_wait_s)
        self.max_reservations = max_reservations
        self.size_weight = size_weight
        self.graphs = graphs
        self.fit_up_work = fit_up_work
        self.step_exponent = step_exponent
        self.max_room_waits = max_room_waits
        self.wait_counts_sharing = wait_counts_sharing
        # id of an estimate → (that estimate, it with the graphs' pool or itself)
        self._variants: dict[int, tuple[MemoryEstimate, list[tuple[int, MemoryEstimate]]]] = {}
        self.last_errors: dict[str, str] = {}
        # Jobs left waiting for a faster card in the last pass: job id → node id.
        self.last_waits: dict[str, str] = {}
        self._cache: dict[tuple, MemoryEstimate] = {}
        self._fingerprints: dict[str, tuple[TrainSpec, str]] = {}
        self._infos: dict[str, tuple[JobView, _JobInfo]] = {}
        # job id → its turn in the last pass: (-priority, turn, job id, view, info, smallest
        # need, class set, size weight, tenant, constrained), reused while the same view, class
        # set and weight come back.
        self._turns: dict[str, _Turn] = {}
        self._kw_inputs: tuple = ()
        self._kw = 0.0
        # tenant → (its turns in the last pass, in queue order; the same sorted): `_by_turn`.
        self._orders: dict[str, tuple[list[_Turn], list[_Turn]]] = {}
        self._class_sets: dict[frozenset, frozenset] = {}
        # (kind, compute capability) → a small int id: per-class look-ups in the hot loops hash
        # an int, not a tuple.
        self._class_ids: dict[tuple, int] = {}

    # -- estimates ------------------------------------------------------------------------------
    def _fingerprint(self, job: JobView) -> str:
        # model_dump_json costs ~10 µs; keep it per job while its spec is the same object or an
        # equal one (the scheduler rebuilds every spec each pass; == on two specs is ~1 µs).
        hit = self._fingerprints.get(job.job_id)
        if hit is not None and (hit[0] is job.spec or hit[0] == job.spec):
            return hit[1]
        fp = job.spec.model_dump_json()
        if len(self._fingerprints) > self.cache_size:
            self._fingerprints.clear()
        self._fingerprints[job.job_id] = (job.spec, fp)
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

    def best_fit(self, spec: TrainSpec, device: DeviceInfo, est: MemoryEstimate,
                 available: int) -> MemoryEstimate:
        """The richest configuration of the job (memory.py `fast_variants`) that the chosen
        node's `available` bytes hold with the safety margin; `est` (its minimum) otherwise."""
        for need, v in self._richer(spec, device, est):  # richest first
            if need <= available:
                return v
        return est

    def _richer(self, spec: TrainSpec, device: DeviceInfo,
                est: MemoryEstimate) -> list[tuple[int, MemoryEstimate]]:
        """The job's configurations richer than its minimum `est`, richest first, each with its
        need (none without graphs or off CUDA)."""
        if not self.graphs or device.kind != "cuda":
            return []
        # The variants cost a spec walk; their input is the estimate object (cached per job,
        # variant and device class): remember them next to it.
        hit = self._variants.get(id(est))
        if hit is None or hit[0] is not est:
            if len(self._variants) >= self.cache_size:
                self._variants.clear()
            richer = [(self.need(v), v) for v in fast_variants(spec, device)
                      if v.total > est.total]
            hit = self._variants[id(est)] = (est, richer)
        return hit[1]

    def _configurations(self, spec: TrainSpec, device: DeviceInfo,
                        est: MemoryEstimate) -> list[tuple[int, MemoryEstimate, int]]:
        """The job's configurations on this device as (need, estimate, `_richness`), richest
        first and its minimum `est` last: what `best_fit` walks, with the richness that
        `_fit_up` must not go below at hand."""
        opts = [(need, v, _richness(v)) for need, v in self._richer(spec, device, est)]
        opts.append((self.need(est), est, _richness(est)))
        return opts

    def work(self, tokens: float, params: int, v: Variant) -> float:
        """A job's run time at one FLOP/s in variant `v`: its FLOPs (more with checkpointing)
        over the fraction of the speed its micro-batch reaches (`step_efficiency`), so that a
        smaller micro-batch, auto-fit's first resort, is expected to run slower, as it does."""
        micro, ckpt, seq = v
        return tokens * flops_per_token(params, ckpt) / step_efficiency(
            micro, seq, params, self.fit_up_work, self.step_exponent)

    def need(self, est: MemoryEstimate) -> int:
        """Bytes a node must have available for a job with this estimate."""
        return math.ceil(est.total * (1.0 + self.safety_margin))

    def _info(self, job: JobView) -> _JobInfo:
        """The job's cached variants, size and needs (rebuilt when its inputs change)."""
        hit = self._infos.get(job.job_id)
        if hit is not None:
            view, info = hit
            if view is job:  # the same view object as last pass: nothing can have changed
                return info
            if (view.allow_autofit == job.allow_autofit and view.min_seq_len == job.min_seq_len
                    and view.tokens == job.tokens and (view.spec is job.spec
                                                       or view.spec == job.spec)):
                self._infos[job.job_id] = (job, info)
                return info
        s = job.spec
        tokens = job.tokens
        if tokens is None:
            tokens = (float(s.max_steps * s.batch_size * s.max_seq_len) if s.max_steps
                      else self.default_tokens * s.n_epochs)
        variants = list(autofit_variants(job))
        params = compute_params(s)
        info = _JobInfo(variants, params, tokens, [self.work(tokens, params, v) for v in variants])
        if len(self._infos) > self.cache_size:
            self._infos.clear()
        self._infos[job.job_id] = (job, info)
        return info

    def _needs(self, job: JobView, info: _JobInfo, i: int,
               devices: dict[int, DeviceInfo]) -> dict[int, int]:
        """Bytes variant `i` of the job needs per device class id of `devices` (cached)."""
        per = info.need[i]
        ests = info.est[i]
        if per is None or ests is None:
            per = info.need[i] = {}
            ests = info.est[i] = {}
        for cls in devices:
            if cls not in per:
                est = ests[cls] = self.estimate(job, info.variants[i], devices[cls])
                per[cls] = self.need(est)
        return per

    def _min_need(self, job: JobView, info: _JobInfo, devices: dict[int, DeviceInfo],
                  class_set: frozenset) -> int:
        hit = info.min_need.get(class_set)
        if hit is None:
            per = self._needs(job, info, len(info.variants) - 1, devices)
            hit = info.min_need[class_set] = min(per[c] for c in devices)
        return hit

    def _fit_up(self, job: JobView, info: _JobInfo, e: _Entry, base: int,
                rank: int) -> tuple[TrainSpec, MemoryEstimate, str] | None:
        """A larger micro-batch for `job` (placed as submitted on `e`) where the node has room:
        same effective batch (accumulation makes up the rest, and the loss is normalised by
        the step's label tokens, so the update is the same), fewer and fuller micro-batches.
        Small micro-batches of small models leave a GPU waiting on kernel launches (the README's
        table: micro-batch 4 trains 1.4-1.9x the tokens/s of micro-batch 1); past
        `fit_up_work` (micro-batch tokens x compute params) a step is bound by the GPU and a
        larger one gains nothing, so the micro-batch grows only up to the first divisor of
        `batch_size` that reaches it. It may use at most half the memory the node would have
        left after the job as submitted, so it does not crowd out the next jobs, and never at the
        cost of the fast path's richer configuration (`rank`, `_richness` of what the job as
        submitted would get there: CUDA graphs, the head on the GPU). `base`: the job's need
        there as submitted (its minimum's)."""
        table = info.up.get(e.cls) if info.up is not None else None
        if table is None:
            table = self._fit_up_table(job, info, e.cls, e.node.device)
        if not table:
            return None
        room = base + (e.avail - base) // 2
        if table[0][2][-1][0] > room:
            return None  # not even the next micro-batch's minimum fits
        for k in range(len(table) - 1, -1, -1):  # the largest micro-batch first
            micro, spec, opts = table[k]
            for need, up_est, r in opts:  # its configurations, richest first
                if r < rank:
                    break
                if need <= room:
                    s = job.spec
                    change = (f"micro_batch_size {s.micro_batch_size} → {micro}, gradient "
                              f"accumulation {s.grad_accum_steps} → {s.batch_size // micro} "
                              f"(same effective batch {s.batch_size}) to use {e.name} "
                              f"({_fmt(e.avail)} free)")
                    return spec, up_est, change
        return None

    def _fit_up_table(self, job: JobView, info: _JobInfo, cls: int,
                      device: DeviceInfo) -> list[tuple[int, TrainSpec, list]]:
        """Per larger micro-batch (smallest first): (micro-batch, spec, its configurations on
        this device class as (need, estimate, richness), richest first, the minimum last)."""
        if info.up is None:
            info.up = {}
        s = job.spec
        table = []
        m = s.micro_batch_size
        if m * s.max_seq_len * info.params < self.fit_up_work:
            for d in range(m + 1, s.batch_size + 1):
                if s.batch_size % d:
                    continue
                v = (d, s.gradient_checkpointing, s.max_seq_len)
                spec = self.variant_spec(job, v)
                opts = self._configurations(spec, device, self.estimate(job, v, device))
                table.append((d, spec, opts))
                if d * s.max_seq_len * info.params >= self.fit_up_work:
                    break
        info.up[cls] = table
        info.up_floor[cls] = table[0][2][-1][0] if table else _NEVER
        return table

    def _fit_up_floor(self, job: JobView, info: _JobInfo, cls: int, device: DeviceInfo) -> int:
        """The least room (`_fit_up`'s) any larger micro-batch of the job needs on this device
        class; `_NEVER` when it has none to grow to."""
        floor = info.up_floor.get(cls)
        if floor is None:
            self._fit_up_table(job, info, cls, device)
            floor = info.up_floor[cls]
        return floor

    def _transfer_s(self, job: JobView, info: _JobInfo, node: NodeView) -> float:
        if job.model_key is not None and job.model_key in node.cached_models:
            return 0.0
        size = job.model_bytes if job.model_bytes is not None else 2 * info.params
        return size / self.link_bytes_per_s

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
        earlier in the same pass counted as promised). The inputs are not modified, and a
        `JobView` passed again as the same object is taken as unchanged (what is derived from
        it is cached by identity): a job whose fields change comes as a new view
        (`dataclasses.replace`, as the scheduler does for `avoid_nodes`).
        """
        self.last_errors = {}
        self.last_waits = {}
        if not queue:
            return []
        p = _Pass(self, nodes)
        if not p.entries:
            return []
        load = dict(running_by_tenant or {})

        # Jobs that need more than the largest free node cannot place in this pass at all (free
        # memory only shrinks within a pass): they skip the fair-share heap.
        weights = (self.size_weight, self.default_speed, self.efficiency)
        if weights != self._kw_inputs:  # one float object while they stay (compared by `is`)
            self._kw_inputs = weights
            self._kw = self.size_weight / (self.default_speed * 1e12 * self.efficiency)
        kw = self._kw
        # Per tenant: its jobs that may place in this pass, in queue order (sorted by turn below).
        per_tenant: dict[str, list[_Turn]] = {}
        blocked: list[_Turn] = []
        gmax = p.max_avail()
        least = gmax + 1  # the smallest need of any job that may place in this pass
        cs = p.class_set
        turns = self._turns
        for job in queue:
            # Fast path: the same view as last pass, the same device classes and weights. The
            # turn tuple is all this loop reads then (one look-up, few objects touched: at a
            # thousand jobs, cache misses cost more than the Python here).
            item = turns.get(job.job_id)
            if (item is None or item.job is not job or item.class_set is not cs
                    or item.kw is not kw):
                try:
                    info = self._info(job)
                    mn = self._min_need(job, info, p.devices, cs)
                except Exception as exc:  # noqa: BLE001 - one bad job must not stop the pass
                    log.warning("cannot estimate %s: %s", job.job_id, exc)
                    self.last_errors[job.job_id] = f"{type(exc).__name__}: {exc}"
                    continue
                # Its turn: submit time, pushed back by its expected size (shortest first
                # among jobs of similar age; a long job is overtaken only by jobs submitted
                # less than `size_weight` × its expected run time after it).
                item = _Turn(-job.priority, job.submitted_at + kw * info.size, job.job_id, job,
                             info, mn, cs, kw, job.tenant, job.constrained)
                if len(turns) > self.cache_size:
                    turns.clear()
                turns[job.job_id] = item
            # Jobs that need more than the largest free node cannot place in this pass at all
            # (free memory only shrinks within a pass): they skip the fair-share heap.
            if item.min_need > gmax:
                blocked.append(item)
            else:
                if item.min_need < least:
                    least = item.min_need
                jobs = per_tenant.get(item.tenant)
                if jobs is None:
                    jobs = per_tenant[item.tenant] = []
                jobs.append(item)
        p.retire_below(least)
        if blocked and self.max_reservations > 0 and p.freeing:
            oldest = heapq.nsmallest(
                self.max_reservations, blocked,
                key=lambda it: (it.neg_priority, it.job.submitted_at, it.job_id))
            for item in oldest:
                p.reserve(item.job, item.info)
        if not per_tenant:
            return []

        # Per tenant: its jobs by turn, the next one last; a heap of the tenants' heads by
        # (priority, jobs the tenant runs or was given in this pass, turn).
        heap = []
        for tenant in per_tenant:
            jobs = per_tenant[tenant] = self._by_turn(tenant, per_tenant[tenant])
            k = jobs[-1]
            heap.append((k.neg_priority, load.get(tenant, 0), k.turn, k.job_id, tenant))
        heapq.heapify(heap)
        # Only this pass's tenants keep a cached order (a tenant whose queue empties leaves).
        if len(self._orders) > len(per_tenant):
            self._orders = {t: self._orders[t] for t in per_tenant}

        placements: list[Placement] = []
        avails = p.avails
        while heap:
            tenant = heap[0][4]  # popped below, or replaced by the tenant's next turn
            jobs = per_tenant[tenant]
            item = jobs.pop()
            job, info = item.job, item.info
            try:
                # Most jobs have no node constraints and take the indexed path.
                placed = (p.place(job, info) if item.constrained
                          else p._place_among(job, info, None, item.min_need))
            except Exception as exc:  # noqa: BLE001 - one bad job must not stop the pass
                log.warning("cannot estimate %s: %s", job.job_id, exc)
                self.last_errors[job.job_id] = f"{type(exc).__name__}: {exc}"
                placed = None
            if placed is not None:
                placements.append(placed)
                load[tenant] = load.get(tenant, 0) + 1
            # Drop, without a turn, the tenant's next jobs that need more than any node has
            # left: they cannot place later in this pass either.
            most = avails[-1] if avails else -1
            while (jobs and jobs[-1].min_need > most
                   and not p.room(jobs[-1].min_need, jobs[-1].info.least_work)):
                jobs.pop()
            if jobs:
                k = jobs[-1]
                # (one sift instead of a pop and a push; keys are unique, so the order is the
                # same)
                heapq.heapreplace(heap, (k.neg_priority, load.get(tenant, 0), k.turn, k.job_id,
                                         tenant))
            else:
                heapq.heappop(heap)
        return placements

    def _by_turn(self, tenant: str, jobs: list[_Turn]) -> list[_Turn]:
        """The tenant's `jobs` (in queue order) sorted by turn, the next one last, as a list the
        caller may consume. A saturated pool sees the same queue pass after pass, and sorting
        each tenant's turns was a tenth of such a pass: the order is kept per tenant and reused
        while the same turn objects come in the same order (identity, not equality: a turn holds
        its view, and an equal view rebuilt must be the one placed)."""
        hit = self._orders.get(tenant)
        if hit is not None and len(hit[0]) == len(jobs) and all(map(operator.is_, hit[0], jobs)):
            return hit[1][:]
        ordered = sorted(jobs, reverse=True)  # (-priority, turn, job id): ids are unique
        self._orders[tenant] = (jobs, ordered)
        return ordered[:]

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


class _Pass:
    """The open nodes during one `plan()` pass, indexed for fast decisions (see the module
    docstring): groups of equal speed and device class, each bucketed by load and sorted by
    free memory; every node's free memory in one sorted list (the largest is the quick "fits
    nowhere" test); nodes that report when they free, soonest first; who caches which model."""

    def __init__(self, placer: Placer, nodes: list[NodeView]):
        self.placer = placer
        self.entries: dict[str, _Entry] = {}
        self.devices: dict[int, DeviceInfo] = {}  # device class id → one device of it
        groups: dict[tuple, _Group] = {}
        self.index = _Index()
        # Per base model: the nodes that cache it, grouped like `groups` (no transfer there).
        cached: dict[str, tuple[_Index, dict[tuple, _Group]]] = {}
        freeing: list[tuple[float, str]] = []
        per_job_cap = placer.max_jobs_per_node
        scale = 1e12 * placer.efficiency
        default_speed = placer.default_speed * scale
        entries = self.entries
        devices = self.devices
        # Every open node, by its `idx` (what the bucket keys hold).
        elist: list[_Entry] = []
        self.elist = elist
        class_ids = placer._class_ids
        for n in nodes:
            if not n.accepting:
                continue
            cap = n.max_jobs
            if per_job_cap is not None:
                cap = per_job_cap if cap is None else min(per_job_cap, cap)
            known = n.speed is not None and n.speed > 0
            speed = n.speed * scale if known else default_speed
            dev = n.device
            ckey = (dev.kind, tuple(dev.compute_capability))  # _device_class, inlined
            cls = class_ids.get(ckey)
            if cls is None:
                cls = class_ids[ckey] = len(class_ids)
            # A CPU job has its own cores (slots); GPU jobs computing together share the card.
            e = _Entry(n, cap, speed, known and dev.kind != "cpu", cls, len(elist))
            elist.append(e)
            entries[n.node_id] = e
            if cls not in devices:
                devices[cls] = dev
            g = groups.get((cls, speed))
            if g is None:
                g = groups[(cls, speed)] = _Group(speed, cls, self.index, len(groups))
            e.groups.append(g)
            for key in n.cached_models:
                src = cached.get(key)
                if src is None:
                    src = cached[key] = (_Index(), {})
                by_speed = src[1]
                g = by_speed.get((cls, speed))
                if g is None:
                    g = by_speed[(cls, speed)] = _Group(speed, cls, src[0], len(by_speed))
                e.groups.append(g)
            e.key = (e.avail, n.name, n.node_id, e.idx)
            if cap is None or e.count < cap:
                r = e.count if e.shared else 0
                for g in e.groups:  # listed unsorted here, sorted once below (_Group.build)
                    b = g.buckets.get(r)
                    if b is None:
                        b = g.buckets[r] = ([], [])
                    b[0].append(e.key)
            if n.frees_in is not None and n.free_at_end is not None:
                freeing.append((n.frees_in, n.node_id))
        for g in groups.values():
            g.build()
        for _, gs in cached.values():
            for g in gs.values():
                g.build()
        # Interned: the same object every pass while the classes stay the same, so per-job
        # caches keyed by it are found by identity.
        cs = frozenset(self.devices)
        self.class_set: frozenset = placer._class_sets.setdefault(cs, cs)
        # Per cached base model: the index of the nodes that hold it.
        self.cached = {k: src[0] for k, src in cached.items()}
        self.avails = sorted([e.avail for e in entries.values()
                              if e.cap is None or e.count < e.cap])
        freeing.sort()
        self.freeing = [self.entries[nid] for _, nid in freeing]
        frees = [t or 0.0 for t, _ in freeing]
        # The fastest node that frees within max_wait_s: a job on a node at least
        # 1/wait_speedup as fast (at its share of it, with `wait_counts_sharing`) never waits
        # (the common case skips the scan).
        max_wait = placer.max_long_wait_s if placer.wait_fraction > 0 else placer.max_wait_s
        self.soon = [(t, e) for t, e in zip(frees, self.freeing) if t <= max_wait]
        self.soon_speeds = sorted({e.speed for _, e in self.soon})
        # `soon` less the nodes slower than a floor (chosen speed × wait_speedup) and those
        # claimed, built when first needed: a job's wait check walks only the nodes it could
        # wait for. One per entry of soon_speeds (the slowest speed at or above the floor: the
        # same nodes), so that the many floors of `wait_counts_sharing` (speed / (1 + load))
        # share a few lists.
        self.soon_lists: list[list[tuple[float, _Entry]] | None] = [None] * len(self.soon_speeds)
        self.fastest_freeing = self.soon_speeds[-1] if self.soon_speeds else 0.0
        # Per entry of soon_speeds: at most the soonest any unclaimed node at least that fast
        # frees (exact at first, lowered by nothing after: claims only remove nodes), so most
        # jobs are ruled out of waiting without a call.
        first: dict[float, float] = {}
        for t, e in self.soon:  # (soonest first: the first time seen per speed is its least)
            first.setdefault(e.speed, t)
        self.soon_first = [first[v] for v in self.soon_speeds]
        for k in range(len(self.soon_first) - 2, -1, -1):
            if self.soon_first[k + 1] < self.soon_first[k]:
                self.soon_first[k] = self.soon_first[k + 1]
        self.room_waits = 0  # jobs left waiting for room as submitted in this pass
        # Nodes claimed in this pass for a waiting job (`_claim`): their free memory is out of
        # `avails`, since only jobs that end before they free may use them.
        self.claimed: list[_Entry] = []
        # At least the most free memory of any of them (placements there only lower it).
        self.claimed_most = -1
        # At least the most work any job could still do on one of them before it frees (its
        # rate times the wait; placements there only lower the rate).
        self.claimed_work_most = -1.0
        # Nodes with less memory than this are unlisted (`retire_below`); None: not listed.
        self.floor = 0
        # 0.0: no job waits in this pass; else a job waits only for a node this fast.
        self.may_wait = (self.fastest_freeing
                         if placer.wait_speedup > 0 and self.freeing else 0.0)

    def max_avail(self) -> int:
        return self.avails[-1] if self.avails else -1

    def retire_below(self, floor: int) -> None:
        """Unlist the open nodes with less memory than `floor`, the smallest need of any job
        this pass may still place, and from now on every node a placement leaves below it
        (`_take`): no job of the pass fits there (memory only shrinks within a pass), and in a
        busy pool they were most of the buckets every placement stepped over."""
        self.floor = floor
        avails = self.avails
        for e in self.elist:
            if e.avail < floor and e.key is not None and (e.cap is None or e.count < e.cap):
                self._unlist(e)
                del avails[bisect.bisect_left(avails, e.avail)]
                e.key = None

    def _unlist(self, e: _Entry) -> None:
        """Take `e` out of the bucket of its load in each of its groups."""
        old = e.key
        bucket = e.count if e.shared else 0
        for g in e.groups:
            keys, avs = g.buckets[bucket]
            # Its own key object is listed: bisect the ints, then step over equal memory.
            i = bisect.bisect_left(avs, old[0])
            while keys[i] is not old:
                i += 1
            del keys[i]
            del avs[i]
            if not keys:  # an emptied bucket leaves the walk (its nodes moved up a load)
                g.close_bucket(bucket)

    def _claim(self, e: _Entry, job_id: str, frees_in: float) -> None:
        """Claim `e` for `job_id`, which waits for it to free in `frees_in` s. Only jobs that
        end before then may still run there, so its memory leaves `avails` (the largest free
        memory that rules jobs in or out of the pass at a glance) for `self.claimed`: a claimed
        node holding the most free memory had every job left in the pass tried on every
        variant, and fail."""
        e.claim = (job_id, frees_in)
        if e.key is not None and not e.full():  # listed: in `avails`
            avails = self.avails
            del avails[bisect.bisect_left(avails, e.avail)]
            self.claimed.append(e)
            if e.avail > self.claimed_most:
                self.claimed_most = e.avail
            work = e.rate() * frees_in
            if work > self.claimed_work_most:
                self.claimed_work_most = work

    def room(self, need: int, least_work: float) -> bool:
        """Whether some open node could still take `need` bytes for a job whose variants' least
        work is `least_work`: an unclaimed one with the room, or a claimed one it could end on
        before the node frees (its run there is no shorter than that work at the node's
        rate)."""
        avails = self.avails
        if avails and avails[-1] >= need:
            return True
        if need > self.claimed_most or least_work > self.claimed_work_most:
            return False
        # (Every claimed node here is listed and not full: `_take` drops it from the list when
        # it stops being either.)
        for e in self.claimed:
            if e.avail >= need and least_work <= e.rate() * e.claim[1]:  # type: ignore[index]
                return True
        return False

    def _take(self, e: _Entry, nbytes: int) -> None:
        """Count a placement on `e`: less memory, one more job, re-indexed."""
        cap = e.cap
        avails = self.avails
        groups = e.groups
        claimed = e.claim is not None  # (then its memory is not in `avails`: `_claim`)
        if e.key is not None and (cap is None or e.count < cap):  # listed: out of its bucket
            self._unlist(e)
            if not claimed:
                del avails[bisect.bisect_left(avails, e.avail)]
        avail = e.avail = e.avail - nbytes
        e.count += 1
        gone = avail < self.floor  # no job of the pass fits there any more
        if claimed and (gone or (cap is not None and e.count >= cap)):
            # (room() would step over it for the rest of the pass; a node claimed while already
            # unlisted or full was never in the list)
            try:
                self.claimed.remove(e)
            except ValueError:
                pass
        if gone:
            e.key = None
            return
        key = e.key = (avail, e.name, e.node_id, e.idx)
        if cap is None or e.count < cap:
            bucket = e.count if e.shared else 0
            for g in groups:  # into the bucket of its new load (_Group.add, inlined)
                b = g.buckets.get(bucket)
                keys, avs = b if b is not None else g.open_bucket(bucket)
                # Bisect the ints (cheaper than tuples); the keys decide only among nodes with
                # the very same free memory.
                i = bisect.bisect_left(avs, avail)
                if i < len(avs) and avs[i] == avail:
                    i = bisect.bisect_left(keys, key, i, bisect.bisect_right(avs, avail, i))
                keys.insert(i, key)
                avs.insert(i, avail)
            if not claimed:
                bisect.insort(avails, avail)

    # -- scoring --------------------------------------------------------------------------------
    def _score(self, job: JobView, info: _JobInfo, e: _Entry, work: float) -> float:
        return self.placer._transfer_s(job, info, e.node) + work / e.rate()

    @staticmethod
    def _gap_ok(job: JobView, e: _Entry, score: float) -> bool:
        """A node claimed by another job takes this one only if it ends before the node frees."""
        return e.claim is None or e.claim[0] == job.job_id or score <= e.claim[1]

    def _best_fast(self, job: JobView, info: _JobInfo, needs: dict[int, int],
                   work: float) -> tuple[tuple, _Entry] | None:
        """The earliest-finishing node that fits, from the indexes: the nodes caching the job's
        model (no transfer), then all nodes (transfer unless cached); in each, load buckets go
        fastest rate first and the walk stops at the first whose rate alone cannot match the
        best so far; in a bucket, the best fit that the job's claim rules allow (among the next
        few). Returns ((score, memory left over, job count, node name), entry), as `_best_scan`.
        """
        best: _Entry | None = None
        best_s = math.inf
        best_left = best_count = 0
        best_name = ""
        mb = job.model_bytes
        transfer = (mb if mb is not None else 2 * info.params) / self.placer.link_bytes_per_s
        model = job.model_key
        jid = job.job_id
        elist = self.elist
        # (index, transfer time, the least transfer time a node of it can have)
        if model is not None and model in self.cached:
            sources = ((self.cached[model], 0.0, 0.0), (self.index, transfer, 0.0))
        else:
            model = None  # no node caches it: every node pays the transfer
            sources = ((self.index, transfer, transfer),)
        for index, offset, floor in sources:
            # Buckets slower than `lim` cannot win: floor + work / rate > best_s (kept a hair
            # low, so rounding never drops a bucket that could tie; a bucket let through by
            # the slack only yields scores above best_s, which the comparison below rejects).
            lim = work / (best_s - floor) * _LIM_SLACK if best_s > floor else math.inf
            for rate, dev_cls, keys, avs in index.order:
                # The fit test first: in a busy pool most buckets are skipped by it (the fast
                # cards fill first), and it is the cheaper one.
                need = needs[dev_cls]
                if avs[-1] < need:  # (a listed bucket is never empty)
                    continue  # fits on no node of the bucket
                if rate < lim:
                    break  # and every bucket after it is slower still
                n = len(avs)
                i = bisect.bisect_left(avs, need)
                stop = i + 8 if i + 8 < n else n  # the best fit, or the next few if claimed
                while i < stop:
                    key = keys[i]
                    e = elist[key[3]]
                    t = 0.0 if (offset and model is not None
                                and model in e.cached_models) else offset
                    count = e.count
                    # (every node of a bucket runs a job at its rate: a shared one
                    # has `load` jobs, one not shared is listed under load 0)
                    sc = t + work / rate
                    claim = e.claim
                    if claim is None or claim[0] == jid or sc <= claim[1]:
                        # (sc, left, count, name) < the best's, without building tuples
                        if best is None or sc < best_s or (sc == best_s and (
                                (key[0] - need, count, e.name)
                                < (best_left, best_count, best_name))):
                            best, best_s = e, sc
                            best_left, best_count, best_name = key[0] - need, count, e.name
                            lim = (work / (sc - floor) * _LIM_SLACK if sc > floor
                                   else math.inf)
                        break
                    i += 1
        if best is None:
            return None
        return (best_s, best_left, best_count, best_name), best

    def _best_scan(self, job: JobView, info: _JobInfo, needs: dict[int, int], work: float,
                   cands: list[_Entry]) -> tuple[tuple, _Entry] | None:
        best = None
        for e in cands:
            left = e.avail - needs[e.cls]
            if left < 0 or e.full():
                continue
            s = self._score(job, info, e, work)
            if not self._gap_ok(job, e, s):
                continue
            key = (s, left, e.count, e.node.name)
            if best is None or key < best[0]:
                best = (key, e)
        return best

    def place(self, job: JobView, info: _JobInfo) -> Placement | None:
        placer = self.placer
        if job.constrained:
            cands = [e for e in self.entries.values() if placer.matches(job, e.node)]
            if job.avoid_nodes:
                others = [e for e in cands if e.node.node_id not in job.avoid_nodes
                          and e.node.name not in job.avoid_nodes]
                got = self._place_among(job, info, others)
                if got is not None:
                    return got
            return self._place_among(job, info, cands)
        return self._place_among(job, info, None)

    def _place_among(self, job: JobView, info: _JobInfo, cands: list[_Entry] | None,
                     min_need: int | None = None) -> Placement | None:
        """Place `job` on the best of `cands` (None: any node, through the indexes).
        `min_need`: its smallest need in this pass, when the caller has it at hand."""
        if cands is not None and not cands:
            return None
        avails = self.avails
        most = avails[-1] if avails else -1
        if min_need is None:
            min_need = info.min_need.get(self.class_set, 0)
        if most < min_need and not self.room(min_need, info.least_work):
            return None
        placer = self.placer
        cs = self.class_set
        ready = info.ready
        least = info.least
        may_wait = self.may_wait
        for i in range(len(info.variants)):
            # The needs per device class of this pass: filled once per variant and class set.
            needs = info.need[i]
            if ready[i] is not cs or needs is None:
                needs = placer._needs(job, info, i, self.devices)
                least[i] = min(needs[c] for c in self.devices)
                ready[i] = cs
            if least[i] > most and not self.room(least[i], info.least_work):
                continue  # more than any node has left, on every device class: fits nowhere
            work = info.works[i]
            best = (self._best_fast(job, info, needs, work) if cands is None
                    else self._best_scan(job, info, needs, work, cands))
            if best is not None:
                break
        else:
            return None  # fits nowhere, in any variant
        (score, _, _, _), e = best
        v = info.variants[i]
        if cands is None and may_wait:
            floor = (e.rate() if placer.wait_counts_sharing else e.speed) * placer.wait_speedup
            if floor <= may_wait:
                # The slowest speed of `soon` at or above the floor (exists: floor <= the
                # fastest); the soonest such node frees no earlier than `first`.
                k = bisect.bisect_left(self.soon_speeds, floor)
                first = self.soon_first[k]
                if first < score:
                    # How long this job may wait (never longer than its run here): max_wait_s,
                    # or a share of its run here when that is longer.
                    horizon = min(score, max(placer.max_wait_s, min(
                        placer.wait_fraction * score, placer.max_long_wait_s)))
                    if first < horizon and self._wait_for_faster(job, info, k, horizon, score,
                                                                 work, i):
                        return None
        if i and cands is None and self.soon and self._wait_for_room(job, info, score):
            return None
        cls = e.cls
        avail = e.avail
        changes = [] if i == 0 else _describe_changes(job, v, e.name, avail)
        spec = info.specs[i]
        if spec is None:
            spec = info.specs[i] = placer.variant_spec(job, v)
        # Placer.best_fit: the richest configuration the node holds (the minimum, listed
        # last, always does: the node was chosen for it).
        opts = info.rich[i].get(cls)
        if opts is None:
            opts = info.rich[i][cls] = placer._configurations(
                spec, e.node.device, info.est[i][cls])  # type: ignore[index]  # by _needs
        for need, est, rank in opts:
            if need <= avail:
                break
        if i == 0 and placer.fit_up_work > 0 and job.allow_autofit:
            floor = info.up_floor.get(cls)
            if floor is None:
                floor = placer._fit_up_floor(job, info, cls, e.node.device)
            base = needs[cls]  # == placer.need(minimum)
            if floor <= base + (avail - base) // 2:  # _fit_up's room: it may grow here
                up = placer._fit_up(job, info, e, base, rank)
                if up is not None:
                    spec, est, change = up
                    changes = [change]
        self._take(e, est.total)
        return _placement(job.job_id, e.node_id, spec, est, changes, score)

    # -- waiting and reserving ------------------------------------------------------------------
    def _wait_for_faster(self, job: JobView, info: _JobInfo, k: int, horizon: float,
                         score: float, work: float, i: int) -> bool:
        """Leave `job` queued when a node at least `soon_speeds[k]` fast (at least wait_speedup
        × the speed of the node it would start on now, or with `wait_counts_sharing` its share
        of that node) frees within `horizon` and the job would still finish there first (it
        would finish `score` from now where it starts now); that node is claimed for it."""
        placer = self.placer
        soon = self.soon_lists[k]
        if soon is None:
            floor = self.soon_speeds[k]
            # From the list of the next slower speed already built (a superset, already less
            # the nodes claimed since), else from all of `soon`.
            j = k - 1
            while j >= 0 and self.soon_lists[j] is None:
                j -= 1
            src = self.soon_lists[j] if j >= 0 else self.soon
            soon = self.soon_lists[k] = [(t, e) for t, e in src  # type: ignore[union-attr]
                                         if e.speed >= floor and e.claim is None]
        needs = None
        claimed: list[int] = []
        waits = False
        for j, (t, e) in enumerate(soon):  # freeing within the horizon, soonest first
            if t >= horizon:
                break  # the rest free later
            if e.claim is not None:
                claimed.append(j)
                continue
            if needs is None:
                needs = placer._needs(job, info, i, self.devices)
            if (e.node.free_at_end or 0) < needs[e.cls]:
                continue
            if t + placer._transfer_s(job, info, e.node) + work / e.speed < score:
                self._claim(e, job.job_id, t)
                placer.last_waits[job.job_id] = e.node.node_id
                waits = True
                break
        # A claim lasts the pass, and a claimed node is skipped by every later job: drop those
        # walked over from the list once, rather than stepping over them job after job (waiting
        # jobs claim the fast nodes one by one, and then every job walked them all).
        for j in reversed(claimed):
            del soon[j]
        if soon and soon[0][0] > self.soon_first[k]:
            self.soon_first[k] = soon[0][0]
        elif not soon:
            self.soon_first[k] = math.inf
        return waits

    def _wait_for_room(self, job: JobView, info: _JobInfo, score: float) -> bool:
        """Leave `job`, which fits nowhere now as submitted, queued when a node frees within
        max_wait_s with room for it as submitted and it would still finish there before its
        auto-fitted variant (expected to finish `score` from now) would where it fits now; that
        node is claimed for it. Auto-fit's smaller micro-batch, checkpointing or shorter
        sequences cost speed for the whole run (`Placer.work`): worth it to start now, not to
        start a little earlier than the job as submitted could."""
        placer = self.placer
        if self.room_waits >= placer.max_room_waits:
            return False
        needs = None
        work = info.works[0]
        horizon = min(score, placer.max_wait_s)
        for t, e in self.soon:  # those freeing within max_wait_s, soonest first
            if t >= horizon:
                break  # the rest free later
            if e.claim is not None:
                continue
            if needs is None:
                needs = placer._needs(job, info, 0, self.devices)
            if (e.node.free_at_end or 0) < needs[e.cls]:
                continue
            if t + placer._transfer_s(job, info, e.node) + work / e.speed < score:
                self._claim(e, job.job_id, t)
                placer.last_waits[job.job_id] = e.node.node_id
                self.room_waits += 1
                return True
        return False

    def reserve(self, job: JobView, info: _JobInfo) -> None:
        """Claim, for a job that fits nowhere now, the node where it would finish first once
        that node's running jobs end."""
        placer = self.placer
        if job.constrained:
            return
        best = None
        for e in self.freeing:
            t = e.node.frees_in or 0.0
            if best is not None and t >= best[0]:
                break
            if e.claim is not None:
                continue
            for i in range(len(info.variants)):
                need = placer._needs(job, info, i, self.devices)[e.cls]
                if (e.node.free_at_end or 0) >= need:
                    finish = t + placer._transfer_s(job, info, e.node) + info.works[i] / e.speed
                    if best is None or finish < best[0]:
                        best = (finish, t, e)
                    break
        if best is not None:
            self._claim(best[2], job.job_id, best[1])


__all__ = ["JobView", "NodeView", "Placement", "Placer", "autofit_variants", "compute_params",
           "flops_per_token"]
