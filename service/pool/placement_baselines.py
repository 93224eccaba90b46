"""The baselines bench/placement.py compares lorapool's `Placer` against: what a user who skipped
lorapool would script with Ray custom resources.

A fixed whole-GiB memory request per job against a static per-node capacity declared when the
node joins, FIFO, no auto-fit, blind to speed and to memory other processes take later; taking
the first node in order (`FirstFitStatic`) or the one left with the fewest units
(`BestFitStatic`). They share `Placer`'s views and constraint matching, so the comparison is of
the policy alone.
"""

from __future__ import annotations

import math

from ..train.memory import estimate_memory
from ..train.spec import DeviceInfo
from .placement import Estimator, GiB, JobView, NodeView, Placement, Placer


class FirstFitStatic:
    """The baseline: what plain Ray custom resources would do.

    Each job asks for a fixed number of whole-GiB "memory units" (its estimate on a reference
    GPU, rounded up, as a user would declare it once), taken from each node's static capacity:
    what the donor declared when it joined (`ray start --resources '{"gpu_memory_gib": N}'`,
    N = the whole GiB its card had free then, `declare()`), or its total memory in whole GiB
    for a node that declared nothing. Jobs go in submit order (FIFO, no fair share) to the first
    node, in the order given, with enough units left. No auto-fit; memory that other processes
    take after the node joined is invisible to it, and so is speed.

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
        self._declared: dict[str, int] = {}  # node_id -> units it declared when it joined

    def declare(self, node_id: str, free_memory: int) -> None:
        """A node (re)joins and declares the whole GiB free on its card then, as a donor's
        `ray start` script would from nvidia-smi; static from then on."""
        self._declared[node_id] = max(0, free_memory) // self.unit

    def units(self, job: JobView) -> int:
        if job.job_id not in self._units:
            est = self.estimator(job.spec, self.reference)
            self._units[job.job_id] = max(1, math.ceil(est.total / self.unit))
        return self._units[job.job_id]

    def capacity(self, node: NodeView) -> int:
        declared = self._declared.get(node.node_id)
        return declared if declared is not None else node.device.total_memory // self.unit

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

    def _choose(self, job: JobView, nodes: list[NodeView], used: dict[str, int],
                want: int) -> NodeView | None:
        """The first node, in the order given, with `want` units left."""
        for n in nodes:
            if n.accepting and Placer.matches(job, n) and \
                    self.capacity(n) - used[n.node_id] >= want:
                return n
        return None

    def plan(self, queue: list[JobView], nodes: list[NodeView],
             running_by_tenant: dict[str, int] | None = None) -> list[Placement]:
        used: dict[str, int] = {n.node_id: 0 for n in nodes}
        for node_id, units in self._held.values():
            if node_id in used:
                used[node_id] += units
        out = []
        # The most units any node has left: a request above it fits nowhere (same answer, fast).
        most = max((self.capacity(n) - used[n.node_id] for n in nodes if n.accepting),
                   default=0)
        for job in sorted(queue, key=lambda j: (j.submitted_at, j.job_id)):
            if job.job_id in self._held:
                continue
            want = self.units(job)
            if want > most:
                continue
            n = self._choose(job, nodes, used, want)
            if n is not None:
                used[n.node_id] += want
                most = max(self.capacity(m) - used[m.node_id] for m in nodes if m.accepting)
                self._held[job.job_id] = (n.node_id, want)
                out.append(Placement(job.job_id, n.node_id, job.spec,
                                     self.estimator(job.spec, n.device), []))
        return out


class BestFitStatic(FirstFitStatic):
    """The second baseline: Ray GPU-memory custom resources + best fit, as a user would script
    it (each node declares `gpu_memory_gib` when it joins, see `FirstFitStatic`; each job
    requests its estimate on a reference GPU in whole GiB and is pinned to the node that has the
    fewest units left after it). Still FIFO, static, blind to node speed."""

    def _choose(self, job: JobView, nodes: list[NodeView], used: dict[str, int],
                want: int) -> NodeView | None:
        best: tuple[int, str, NodeView] | None = None
        for n in nodes:
            if not n.accepting or not Placer.matches(job, n):
                continue
            left = self.capacity(n) - used[n.node_id] - want
            if left >= 0 and (best is None or (left, n.name) < best[:2]):
                best = (left, n.name, n)
        return best[2] if best is not None else None


__all__ = ["BestFitStatic", "FirstFitStatic"]
