"""Where a job too big for every single card of the pool runs split over one node's GPUs.

placement.py places one-card jobs; this module places what it never can: a job that no single
card of the pool could ever hold (`Placer.check_fits` refuses it) but that some node's GPUs
together hold (multi_gpu.plan_split). Such a job runs as one runner holding all the GPUs of its
split, its decoder layers spread over them (service/train/model_split.py).

The accounting is the simplest that is correct: a split starts only on an idle node (no job of
lorapool running, starting or dying there), and while it runs the node takes no other job (the
scheduler hides it from placement.py). A split job that waits for a busy node holds it: the
node takes no new one-card job until it is idle, so a stream of small jobs cannot starve the
split forever (the placer's own reservation, without backfill). Pure data, no Ray:

    nodes = split_nodes(reports, views)                       # SplitNode per online node
    answer = submit_check(job, nodes, safety_margin=0.1)      # at submit: ok, and why
    result = plan_splits(jobs, nodes, safety_margin=0.1)      # each pass: placed, held, waiting
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

from ..train.spec import DeviceInfo
from .multi_gpu import NodeSplit, explain, plan_split

GiB = 1024**3


@dataclass(frozen=True)
class SplitNode:
    """One node as split placement sees it: its placement view (name, labels, GPU 0 for the
    job's constraints, whether it accepts work), every GPU with its free memory now, how a
    runner there names each GPU, the bytes lorapool's jobs reserve on each, and whether any
    job of lorapool runs, starts or dies there."""

    view: Any  # placement.NodeView
    gpus: tuple[DeviceInfo, ...]
    devices: tuple[str, ...]
    reserved: tuple[int, ...] = ()
    busy: bool = False

    @property
    def name(self) -> str:
        return self.view.name

    def whole(self) -> list[DeviceInfo]:
        """Its GPUs as they are with nothing else on them: what the node could ever hold."""
        return [g.model_copy(update={"free_memory": g.total_memory}) for g in self.gpus]

    def once_idle(self) -> list[DeviceInfo]:
        """Its GPUs once lorapool's jobs here end (their reservations back, others' use kept)."""
        out = []
        for i, g in enumerate(self.gpus):
            back = self.reserved[i] if i < len(self.reserved) else 0
            free = min(g.total_memory, int(g.free_memory or 0) + back)
            out.append(g.model_copy(update={"free_memory": free}))
        return out


def split_nodes(reports: Iterable[tuple[str, dict[str, Any]]], views: Sequence[Any]
                ) -> list[SplitNode]:
    """The nodes with several GPUs, from their agents' reports (`gpus`, `gpu_devices`,
    `gpu_reserved`) and the scheduler's placement views (NodeView by name; a node without a
    view is offline). Busy: the view counts running or dying runners, or the node lists jobs."""
    by_name = {v.name: v for v in views}
    out = []
    for name, report in reports:
        view = by_name.get(name)
        gpus = report.get("gpus") or []
        if view is None or len(gpus) < 2:
            continue
        devices = list(report.get("gpu_devices") or [])
        if len(devices) != len(gpus):
            continue  # an agent of another version: no split there
        busy = bool(view.running_jobs) or bool(report.get("jobs"))
        out.append(SplitNode(view=view, gpus=tuple(DeviceInfo(**g) for g in gpus),
                             devices=tuple(devices),
                             reserved=tuple(int(b) for b in report.get("gpu_reserved") or ()),
                             busy=busy))
    return out


def _matches(job: Any, node: SplitNode) -> bool:
    """The job's constraints (pinned node, labels, bf16 and minimum memory of its GPU 0)."""
    from .placement import Placer

    return Placer.matches(job, node.view)


def _avoided(job: Any, node: SplitNode) -> bool:
    """A node where the job's earlier attempt ended badly: used only where nothing else is."""
    return node.name in (getattr(job, "avoid_nodes", None) or ())


@dataclass(frozen=True)
class SubmitAnswer:
    """Whether some node's GPUs together could ever hold a job, and the line that says so."""

    ok: bool
    message: str
    node: Optional[str] = None
    split: Optional[NodeSplit] = None


def submit_check(job: Any, nodes: Sequence[SplitNode], *, safety_margin: float
                 ) -> SubmitAnswer:
    """For a job no single card holds: the first node (fewest GPUs, then most memory) whose
    GPUs together would hold it with nothing else on them, or why none would (multi_gpu's
    `explain` for the node with the most GPU memory among those the job may use)."""
    cands = sorted((n for n in nodes if _matches(job, n)),
                   key=lambda n: (len(n.gpus), -sum(g.total_memory for g in n.gpus), n.name))
    for n in cands:
        split = plan_split(job.spec, n.whole(), safety_margin=safety_margin)
        if split is not None:
            return SubmitAnswer(True, f"Fits no single GPU of the pool; runs split over "
                                f"{split.num_gpus} GPUs of {n.name} once that node is free: "
                                f"{split.reason}", n.name, split)
    if not cands:
        return SubmitAnswer(False, "and no node with several GPUs it may use could split it")
    best = max(cands, key=lambda n: (sum(g.total_memory for g in n.gpus), n.name))
    return SubmitAnswer(False, f"split over {best.name}'s {len(best.gpus)} GPUs: "
                        f"{explain(job.spec, best.whole(), safety_margin=safety_margin)}")


@dataclass(frozen=True)
class SplitPlacement:
    """One split job to start now: on `node`, over `split.gpus`, whose runner names them
    `devices` (in the split's layer order)."""

    job_id: str
    node: str
    split: NodeSplit
    devices: tuple[str, ...]

    def split_spec(self) -> dict[str, Any]:
        """The payload's "split" entry (the trainer's SplitSpec, as plain data)."""
        return self.split.split_spec(list(self.devices)).model_dump(mode="json")


@dataclass
class SplitPass:
    """One pass: the splits to start, the busy nodes held for waiting split jobs (no new
    one-card job goes there), and why each other split job waits."""

    placed: list[SplitPlacement] = field(default_factory=list)
    held: dict[str, str] = field(default_factory=dict)  # node -> the job holding it
    waiting: dict[str, str] = field(default_factory=dict)  # job -> why it waits

    @property
    def taken(self) -> set[str]:
        """The nodes placement.py must not use this pass."""
        return {p.node for p in self.placed} | set(self.held)


def plan_splits(jobs: Sequence[Any], nodes: Sequence[SplitNode], *, safety_margin: float
                ) -> SplitPass:
    """Place split jobs (placement.JobViews none of whose single cards could ever hold them),
    highest priority then oldest first: each on an idle, accepting node whose GPUs' free memory
    now holds its split (fewest GPUs, then the most room left); one job per node. A job whose
    only nodes are busy holds the one with the fewest running jobs where its split fits once
    lorapool's jobs there end."""
    out = SplitPass()
    used: set[str] = set()
    for job in sorted(jobs, key=lambda j: (-j.priority, j.submitted_at, j.job_id)):
        cands = [n for n in nodes if n.view.accepting and n.name not in used
                 and _matches(job, n)]
        best: Optional[tuple[tuple[bool, int, int, str], SplitNode, NodeSplit]] = None
        for n in cands:
            if n.busy:
                continue
            split = plan_split(job.spec, n.gpus, safety_margin=safety_margin)
            if split is None:
                continue
            room = sum(int(n.gpus[g].free_memory or 0) for g in split.gpus) - split.total
            key = (_avoided(job, n), split.num_gpus, -room, n.name)
            if best is None or key < best[0]:
                best = (key, n, split)
        if best is not None:
            _, n, split = best
            used.add(n.name)
            out.placed.append(SplitPlacement(job.job_id, n.name, split,
                                             tuple(n.devices[g] for g in split.gpus)))
            continue
        busy = [n for n in cands if n.busy
                and plan_split(job.spec, n.once_idle(), safety_margin=safety_margin)]
        if busy:
            hold = min(busy, key=lambda n: (_avoided(job, n), n.view.running_jobs, n.name))
            used.add(hold.name)
            out.held[hold.name] = job.job_id
            out.waiting[job.job_id] = (f"waits for {hold.name} to finish its other jobs "
                                       "(a split takes the whole node); it takes no new ones")
        else:
            out.waiting[job.job_id] = "no node's GPUs hold its split now"
    return out


__all__ = ["SplitNode", "SplitPass", "SplitPlacement", "SubmitAnswer", "plan_splits",
           "split_nodes", "submit_check"]
