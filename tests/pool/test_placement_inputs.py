"""What the production scheduler hands the placer besides memory: each queued job's training
tokens and base model (content id, bytes), each node's cached base models (from its agent's
report), and when a busy node frees (its running jobs' step progress) with the memory it has
then. Without them the placer falls back to its defaults and its speed, cache, wait and
reservation rules never fire; these tests fail if the scheduler stops passing them.

No Ray cluster: a real SQLite store, the scheduler's own `JobViews`/`_absorb`, the registry's
`views` fed through `note_report`, and the agent's cache listing on a real folder."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from lorapool.service.pool.active_jobs import ActiveJob, StepProgress
from lorapool.service.pool.agent import AgentConfig, NodeAgent
from lorapool.service.pool.job_views import BYTES_PER_TOKEN, DataSize, training_tokens
from lorapool.service.pool.node_registry import NodeRegistry
from lorapool.service.pool.outcomes import RunnerEvent, RunnerItem
from lorapool.service.pool.placement import Placer
from lorapool.service.pool.scheduler import RayExecutor
from lorapool.service.pool.transfer import materialise
from lorapool.service.store import Store
from lorapool.service.store.records import JobRecord, ModelEntry
from lorapool.service.train.spec import TrainSpec

GiB = 1024**3
SHA = "f" * 64


@pytest.fixture()
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    yield s
    s.close()


def _model(store: Store, path: Path, sha: str = SHA, size: int = 2 * GiB) -> ModelEntry:
    return store.add_model(ModelEntry(name="llama-1b", path=str(path), format="hf", sha256=sha,
                                      bytes=size))


def _file(store: Store, examples: int, nbytes: int) -> str:
    return store.add_file(tenant="acme", filename="d.jsonl", bytes=nbytes, sha256="a" * 64,
                          artifact_id="sha256:" + "a" * 64, examples=examples,
                          format="chat").id


def _job(store: Store, job_id: str, **kw) -> JobRecord:
    spec = {"max_seq_len": 512, "batch_size": 8, "micro_batch_size": 4, "n_epochs": 2,
            "fast": "off", **kw.pop("spec", {})}
    return store.create_job(JobRecord(id=job_id, tenant="acme", model="llama-1b", spec=spec,
                                      **kw))


def _executor(store: Store, **placer) -> RayExecutor:
    return RayExecutor(store, None, placer=Placer(**placer))  # nothing started: no Ray


def _views(ex: RayExecutor):
    queued = ex.store.jobs_in_status("queued")
    views, errors = ex.job_views.views(queued, {m.name: m for m in ex.store.list_models()})
    assert not errors
    return {v.job_id: v for v in views}


# -- jobs --------------------------------------------------------------------------------------

def test_a_stored_job_view_carries_its_tokens_and_base_model(store, model):
    m = _model(store, model)
    # 100 examples of ~100 tokens (400 bytes each at BYTES_PER_TOKEN), 2 epochs.
    fid = _file(store, 100, int(100 * 100 * BYTES_PER_TOKEN))
    _job(store, "by-file", training_file=fid)
    # Long examples: each counts at most max_seq_len (512) tokens.
    long_id = _file(store, 10, int(10 * 5000 * BYTES_PER_TOKEN))
    _job(store, "long", training_file=long_id)
    # Bounded by steps: max_steps x batch_size examples.
    _job(store, "steps", training_file=fid, spec={"max_steps": 5})
    # A node-local data set: its count is known, its size not (each example up to 512).
    _job(store, "local", dataset={"node": "desk1", "name": "hr", "examples": 30},
         placement={"node": "desk1"})
    # Nothing known of the data: the placer's own default applies.
    _job(store, "unknown")

    views = _views(_executor(store))
    v = views["by-file"]
    assert v.tokens == pytest.approx(2 * 100 * 100)
    assert (v.model_key, v.model_bytes) == (m.sha256, m.bytes)
    assert views["long"].tokens == pytest.approx(2 * 10 * 512)
    assert views["steps"].tokens == pytest.approx(5 * 8 * 100)
    assert views["local"].tokens == pytest.approx(2 * 30 * 512)
    assert views["unknown"].tokens is None and views["unknown"].model_key == m.sha256


def test_training_tokens_rules():
    s = TrainSpec(base_model="m", max_seq_len=1024, n_epochs=3, batch_size=4,
                  micro_batch_size=4)
    assert training_tokens(s, None) is None
    assert training_tokens(s, DataSize(0, 10)) is None
    assert training_tokens(s, DataSize(10, int(10 * 50 * BYTES_PER_TOKEN))) == 3 * 10 * 50
    assert training_tokens(s, DataSize(10)) == 3 * 10 * 1024


# -- nodes -------------------------------------------------------------------------------------

def _agent(work: Path) -> NodeAgent:
    a = object.__new__(NodeAgent)  # no Ray runtime: only the cache listing is exercised
    a.config = AgentConfig(name="n", work_dir=str(work))
    a._lock = threading.Lock()
    return a


def test_the_agent_reports_the_base_models_its_cache_holds(tmp_path):
    agent = _agent(tmp_path / "node")
    assert agent.cached_models() == []  # no cache folder yet
    # What a runner on the node does with a job's model payload (runner.py `_materialise`).
    materialise(tmp_path / "node" / "cache" / "models", SHA, {"config.json": b"{}"})
    # A copy still being written (no .complete marker) does not count.
    (tmp_path / "node" / "cache" / "models" / ("e" * 64)).mkdir()
    assert agent.cached_models() == [SHA]


def _report(node_id: str, *, free: int, total: int = 24 * GiB, jobs=(), speed=None,
            cached=()) -> dict:
    return {"node_id": node_id, "free_memory": free, "reserved_memory": 0, "jobs": list(jobs),
            "state": "training" if jobs else "idle", "speed_tflops": speed,
            "cached_models": list(cached),
            "device": {"kind": "cuda", "name": f"gpu-{node_id}", "total_memory": total,
                       "compute_capability": [8, 6]}}


def _active(job_id: str, node: str, estimate: int) -> ActiveJob:
    return ActiveJob(job_id, "acme", node, runner=None, run_ref=None, estimate=estimate,
                     attempt=0, started_at=time.time(), stepped=True)


def test_node_views_carry_cached_models_and_when_running_jobs_free():
    reg = NodeRegistry(agents=dict)
    reg.note_report("desk1", _report("n1", free=4 * GiB, jobs=["a", "b"], cached=[SHA]))
    reg.note_report("desk2", _report("n2", free=20 * GiB))
    a, b = _active("a", "desk1", 8 * GiB), _active("b", "desk1", 6 * GiB)
    now = time.time()
    a.progress.note(10, 110, now - 10)  # 1 s a step, 100 steps left: ~90 s from now
    a.progress.note(20, 110, now)
    views = {v.name: v for v in reg.views([a, b], {})}
    assert views["desk1"].cached_models == frozenset({SHA})
    assert views["desk2"].cached_models == frozenset() and views["desk2"].frees_in is None
    # b has no step time yet: when desk1 frees is not known.
    assert views["desk1"].frees_in is None and views["desk1"].free_at_end is None
    b.progress.note(5, 10, now - 2)  # 1 s a step, 5 left
    b.progress.note(7, 10, now)
    d1 = {v.name: v for v in reg.views([a, b], {})}["desk1"]
    assert d1.frees_in == pytest.approx(90, abs=2)  # the later of the two
    assert d1.free_at_end == 4 * GiB + 14 * GiB  # free now + what its jobs hold


def test_step_progress_uses_one_point_per_drain_and_restarts_when_the_step_goes_back():
    p = StepProgress()
    for step in (1, 2, 3, 4):  # one drain's events: all arrive at once
        p.note(step, 44, 100.0)
    assert p.remaining_s(100.0) is None  # one drain: no step time yet
    for step in (5, 6, 7, 8):
        p.note(step, 44, 102.0)
    assert p.remaining_s(102.0) == pytest.approx(0.5 * 36)  # 4 steps in 2 s
    p.note(1, 44, 200.0)  # resumed from an earlier step
    assert list(p.window) == [(200.0, 1)]


def test_the_scheduler_feeds_step_events_into_its_running_jobs_progress(store):
    _job(store, "run", status="running")
    ex = _executor(store)
    a = _active("run", "desk1", 2 * GiB)
    for at, steps in ((1000.0, (1, 2)), (1004.0, (3, 4))):
        for s in steps:
            ex._absorb(a, RunnerItem(RunnerEvent(type="step", step=s, total_steps=12,
                                                 loss=1.0)), at)
    assert a.remaining_s(1004.0) == pytest.approx(2.0 * 8)
    assert store.get_job("run").step == 4  # stored as before


# -- the placer acting on them -----------------------------------------------------------------

def test_the_placer_prefers_the_node_that_caches_the_jobs_model(store, model):
    _model(store, model, size=4 * GiB)
    _job(store, "j", training_file=_file(store, 100, 40_000))
    ex = _executor(store)
    # Equal speed; desk-a is the better fit by memory, but desk-b has the model cached.
    ex.registry = NodeRegistry(agents=dict)
    ex.registry.note_report("desk-a", _report("na", free=12 * GiB, speed=20.0))
    ex.registry.note_report("desk-b", _report("nb", free=16 * GiB, speed=20.0, cached=[SHA]))
    [p] = ex.placer.plan(list(_views(ex).values()), ex._node_views(), {})
    assert p.node_id == "desk-b"
    # Nobody caches it: best fit decides.
    ex.registry.note_report("desk-b", _report("nb", free=16 * GiB, speed=20.0))
    [p] = ex.placer.plan(list(_views(ex).values()), ex._node_views(), {})
    assert p.node_id == "desk-a"


def test_a_job_waits_for_a_much_faster_card_that_frees_soon(store, model):
    _model(store, model, size=100_000_000)
    # 2 epochs x 2,000 examples x 256 tokens: ~1M tokens, minutes on the slow card.
    _job(store, "j", training_file=_file(store, 2000, int(2000 * 256 * BYTES_PER_TOKEN)))
    ex = _executor(store)
    ex.registry = NodeRegistry(agents=dict)
    ex.registry.note_report("slow", _report("ns", free=20 * GiB, speed=5.0, cached=[SHA]))
    ex.registry.note_report("fast", _report("nf", free=1 * GiB, speed=100.0, jobs=["r"],
                                            cached=[SHA]))
    running = _active("r", "fast", 18 * GiB)
    now = time.time()
    running.progress.note(10, 40, now - 10)  # 1 s a step, 30 left: frees in ~30 s
    running.progress.note(20, 40, now)
    ex.active.add(running)
    views = _views(ex)
    assert ex.placer.plan(list(views.values()), ex._node_views(), {}) == []
    assert ex.placer.last_waits == {"j": "fast"}
    # Without the running job's progress the fast card's end is unknown: the job starts now.
    running.progress = StepProgress()
    [p] = ex.placer.plan(list(views.values()), ex._node_views(), {})
    assert p.node_id == "slow"
