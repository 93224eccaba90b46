"""`NodeRegistry` (service/pool/node_registry.py) and `ActiveJobs`' bookkeeping, without Ray:
reports arrive through `note_report` (what `refresh` calls for each agent's answer), and a
refresh with no agents only ages them. The cluster tests cover the Ray half."""

from __future__ import annotations

import time

from lorapool.service.pool.active_jobs import ActiveJob, ActiveJobs
from lorapool.service.pool.node_registry import NodeRegistry

GiB = 1024**3


def report(node_id: str, *, kind: str = "cuda", free: int = 8 * GiB, jobs=(), reserved: int = 0,
           **extra) -> dict:
    return {"node_id": node_id, "free_memory": free, "reserved_memory": reserved,
            "jobs": list(jobs), "state": "idle",
            "device": {"kind": kind, "name": f"gpu-{node_id}", "total_memory": 12 * GiB,
                       "compute_capability": [8, 6]}, **extra}


def active(job_id: str, node: str, estimate: int, tenant: str = "acme",
           stepped: bool = False) -> ActiveJob:
    return ActiveJob(job_id, tenant, node, runner=None, run_ref=None, estimate=estimate,
                     attempt=0, started_at=time.time(), stepped=stepped)


def test_views_promise_memory_the_reports_do_not_show_yet_and_count_dying_runners():
    reg = NodeRegistry(agents=dict)
    reg.note_report("desk1", report("n1", jobs=["seen"], reserved=0))
    reg.note_report("desk2", report("n2", kind="cpu", cpu_slots=2))
    jobs = [active("new", "desk1", 3 * GiB),  # not in desk1's report yet: promised
            active("seen", "desk1", 2 * GiB),  # listed, but still loading with 0 reserved
            active("other", "desk2", 1 * GiB)]
    views = {v.name: v for v in reg.views(jobs, {"desk1": 2})}
    assert views["desk1"].promised == 5 * GiB
    assert views["desk1"].running_jobs == 4  # two active + two killed runners not yet gone
    assert views["desk1"].max_jobs is None and views["desk2"].max_jobs == 2
    assert views["desk2"].running_jobs == 1 and views["desk2"].promised == 1 * GiB
    # Once it has stepped, a job the node lists is in its free memory already.
    stepped = [active("seen", "desk1", 2 * GiB, stepped=True)]
    assert reg.views(stepped, {})[0].promised == 0


def test_a_silent_node_goes_offline_leaves_the_views_and_shows_offline_with_its_jobs():
    reg = NodeRegistry(heartbeat_timeout=5.0, agents=dict)
    reg.note_report("desk1", report("n1"), at=time.time() - 60)
    reg.note_report("desk2", report("n2", accepting=False))
    jobs = [active("b", "desk1", GiB), active("a", "desk1", GiB)]
    assert {v.name for v in reg.views(jobs, {})} == {"desk1", "desk2"}
    reg.refresh(force=True)  # no agents answer: only the heartbeat ages
    assert [v.name for v in reg.views(jobs, {})] == ["desk2"]
    assert not reg.views([], {})[0].accepting and reg.views([], {}, include_busy=True)[0].accepting
    nodes = {n.name: n for n in reg.public_nodes(jobs)}
    assert (nodes["desk1"].state, nodes["desk1"].jobs) == ("offline", ["a", "b"])
    assert (nodes["desk2"].id, nodes["desk2"].compute_capability, nodes["desk2"].bf16) == (
        "n2", "8.6", True)
    assert reg.reports()[0][2] is True  # (name, report, offline)


def test_active_jobs_track_cancels_once_and_count_by_tenant():
    jobs = ActiveJobs()
    jobs.add(active("j1", "desk1", GiB, tenant="acme"))
    jobs.add(active("j2", "desk1", GiB, tenant="globex"))
    jobs.add(active("j3", "desk2", GiB, tenant="acme"))
    assert jobs.running_by_tenant() == {"acme": 2, "globex": 1} and "j2" in jobs
    a, first = jobs.mark_cancel("j1", "cancelled by user")
    assert first and a.stop_reason == "cancelled by user" and a.cancel_at is not None
    assert jobs.mark_cancel("j1", "again") == (a, False) and a.stop_reason == "cancelled by user"
    assert jobs.mark_cancel("nope", "x") == (None, False)
    assert jobs.not_yet_cancelled() == {"j2", "j3"}
    assert jobs.pop("j2").tenant == "globex" and jobs.ids() == {"j1", "j3"}
    assert jobs.dying_by_node() == {}
