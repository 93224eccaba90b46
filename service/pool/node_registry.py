"""The head's picture of the pool's nodes, built from their NodeAgents' reports.

`NodeRegistry` asks every NodeAgent for its report (one call in flight per agent, so a slow
agent never gets a queue of them), marks a node offline once it has been silent for
`heartbeat_timeout`, and turns the reports into the placement policy's `NodeView`s and the
API's public `Node` list. What runs where comes from the caller (active_jobs.py): the registry
holds no job state.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Protocol

import ray

from lorapool.types import Node, NodeGpu

from ..train.spec import DeviceInfo
from .agent import list_agents

log = logging.getLogger("lorapool.pool")


@dataclass
class NodeState:
    """One node's latest report, when it came, and its agent's handle."""

    name: str
    report: dict[str, Any]
    seen_at: float
    offline: bool = False
    handle: Any = None


class JobOnNode(Protocol):
    """What the registry needs of a running job to count it against its node."""

    job_id: str
    node: str
    estimate: int
    stepped: bool

    def remaining_s(self, now: float) -> Optional[float]:
        """Seconds until the job is expected to end (None: not known yet)."""


class NodeRegistry:
    """Node reports, heartbeats and offline marks; see the module docstring."""

    def __init__(self, *, heartbeat_timeout: float = 20.0, refresh_interval: float = 1.0,
                 agents: Optional[Callable[[], dict[str, Any]]] = None) -> None:
        self.heartbeat_timeout = heartbeat_timeout
        self.refresh_interval = refresh_interval
        self._agents = agents  # who lists the NodeAgents (default: agent.list_agents)
        self._nodes: dict[str, NodeState] = {}
        self._report_refs: dict[str, Any] = {}
        self._lock = threading.RLock()
        # The API's threads may ask too (check_fits, nodes): one refresh at a time.
        self._refresh_lock = threading.Lock()
        self._last_refresh = 0.0

    # -- reading ---------------------------------------------------------------------------
    def __bool__(self) -> bool:
        return bool(self._nodes)

    def get(self, name: str) -> Optional[NodeState]:
        return self._nodes.get(name)

    def states(self) -> list[NodeState]:
        with self._lock:
            return list(self._nodes.values())

    def reports(self) -> list[tuple[str, dict[str, Any], bool]]:
        """(name, report, offline) of every known node (a multi-worker job's candidates)."""
        with self._lock:
            return [(n.name, n.report, n.offline) for n in self._nodes.values()]

    # -- refreshing ------------------------------------------------------------------------
    def refresh(self, force: bool = False) -> None:
        """Collect the reports that arrived (at most every `refresh_interval` unless forced)
        and mark silent nodes offline."""
        with self._refresh_lock:
            self._refresh_locked(force)

    def _refresh_locked(self, force: bool) -> None:
        now = time.time()
        if not force and now - self._last_refresh < self.refresh_interval:
            return
        self._last_refresh = now
        agents = (self._agents or list_agents)()
        refs = {}
        for name, handle in agents.items():
            ref = self._report_refs.get(name)
            if ref is None:
                ref = self._report_refs[name] = handle.report.remote()
            refs[name] = ref
        for name in set(self._report_refs) - set(agents):
            self._report_refs.pop(name, None)
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=2.0) if refs else ([], [])
        ready_set = set(ready)
        with self._lock:
            for name, ref in refs.items():
                if ref in ready_set:
                    self._report_refs.pop(name, None)
                    try:
                        report = ray.get(ref)
                    except Exception:
                        continue
                    self.note_report(name, report, agents[name], now)
            for name, st in self._nodes.items():
                if not st.offline and now - st.seen_at > self.heartbeat_timeout:
                    st.offline = True
                    log.warning("node %s is offline (no heartbeat for %.0f s)", name,
                                now - st.seen_at)

    def note_report(self, name: str, report: dict[str, Any], handle: Any = None,
                    at: Optional[float] = None) -> None:
        """Record a report that arrived from the node's agent (a fresh heartbeat)."""
        with self._lock:
            if name not in self._nodes:
                log.info("node %s joined", name)
            self._nodes[name] = NodeState(name, report, time.time() if at is None else at,
                                          False, handle)

    # -- views -----------------------------------------------------------------------------
    def views(self, active: Iterable[JobOnNode], dying: Mapping[str, int],
              include_busy: bool = False) -> list[Any]:
        """The placement policy's view of every online node. `active`: the jobs running now;
        `dying`: killed runners per node, which hold their slot until they are gone.

        Besides memory and speed, each view carries the base models the node's cache holds
        (its agent's `cached_models`) and, for a node running jobs, when they are expected to
        end (`frees_in`: the latest of their `remaining_s`, None while any of them has no
        estimate yet) and the memory available then (`free_at_end`: what is available now
        plus those jobs' estimates, at most the device's total)."""
        from .placement import NodeView

        by_node: dict[str, list[JobOnNode]] = {}
        for a in active:
            by_node.setdefault(a.node, []).append(a)
        now = time.time()
        views = []
        with self._lock:
            for st in self._nodes.values():
                if st.offline:
                    continue
                r = st.report
                dev = DeviceInfo(**r["device"])
                # Memory the report does not show used yet: jobs the node does not list, and
                # CUDA jobs still loading on a node that reports nothing reserved.
                here = by_node.get(st.name, [])
                promised = sum(
                    a.estimate for a in here
                    if a.job_id not in r.get("jobs", ())
                    or (not a.stepped and dev.kind == "cuda" and r.get("reserved_memory", 0) == 0)
                )
                free = int(r["free_memory"])
                frees_in = free_at_end = None
                if here:
                    ends = [a.remaining_s(now) for a in here]
                    if None not in ends:
                        frees_in = max(ends)  # type: ignore[type-var]
                        free_at_end = min(dev.total_memory,
                                          free - promised + sum(a.estimate for a in here))
                views.append(NodeView(
                    node_id=st.name,
                    name=st.name,
                    device=dev,
                    free_memory=free,
                    promised=promised,
                    labels=dict(r.get("labels", {})),
                    accepting=bool(r.get("accepting", True)) or include_busy,
                    running_jobs=len(here) + int(dying.get(st.name, 0)),
                    max_jobs=(int(r["cpu_slots"]) if dev.kind == "cpu" and r.get("cpu_slots")
                              else None),
                    # Measured at join and while idle by the NodeAgent: placement by speed.
                    speed=r.get("speed_tflops"),
                    cached_models=frozenset(r.get("cached_models") or ()),
                    frees_in=frees_in,
                    free_at_end=free_at_end,
                ))
        return views

    def public_nodes(self, active: Iterable[JobOnNode]) -> list[Node]:
        """Every known node as the API shows it (GET /v1/nodes)."""
        active = list(active)
        out = []
        for st in self.states():
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
                speed=r.get("speed_tflops"),
                gpus=_public_gpus(r),
            ))
        return out


def _public_gpus(report: dict) -> list[NodeGpu]:
    """The report's GPUs (`gpus`, `gpu_reserved`) as GET /v1/nodes shows them."""
    reserved = list(report.get("gpu_reserved") or [])
    out = []
    for i, g in enumerate(report.get("gpus") or []):
        cc = g.get("compute_capability")
        out.append(NodeGpu(
            index=i, name=g.get("name"),
            compute_capability=f"{cc[0]}.{cc[1]}" if cc else None,
            total_memory_bytes=int(g.get("total_memory") or 0),
            free_memory_bytes=int(g.get("free_memory") or 0),
            reserved_memory_bytes=int(reserved[i]) if i < len(reserved) else 0))
    return out
