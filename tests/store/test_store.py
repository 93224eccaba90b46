"""The SQLAlchemy store on a real SQLite file: WAL, concurrent writers, compare-and-set
transitions, idempotency, cursors, tenant scoping, token hashing."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading

import pytest

from lorapool.service.store import JobRecord, NotFound, Store, new_id


@pytest.fixture
def db_url(tmp_path):
    return f"sqlite:///{tmp_path / 'sub' / 'lorapool.db'}"


@pytest.fixture
def store(db_url):
    s = Store(db_url)
    yield s
    s.close()


def _job(tenant="acme", **kw):
    return JobRecord(id=new_id("ftjob"), tenant=tenant, model="m", **kw)


def test_sqlite_file_is_in_wal_mode_with_busy_timeout(store, tmp_path):
    path = tmp_path / "sub" / "lorapool.db"
    assert path.exists()
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 5000


def test_tokens_are_stored_only_as_hashes(store, tmp_path):
    token = store.create_token("acme")
    assert token.startswith("lp-") and len(token) > 30
    assert store.tenant_for_token(token) == "acme"
    assert store.tenant_for_token(token + "x") is None
    assert store.tenant_for_token("") is None
    raw = (tmp_path / "sub" / "lorapool.db").read_bytes()
    wal = tmp_path / "sub" / "lorapool.db-wal"
    raw += wal.read_bytes() if wal.exists() else b""
    assert token.encode() not in raw
    # A second token for the same tenant works too; tenants are created once.
    assert store.tenant_for_token(store.create_token("acme")) == "acme"
    assert store.list_tenants() == ["acme"]


def test_bad_tenant_names_are_refused(store):
    for bad in ("", "a b", "../x", "x" * 65, "-lead"):
        with pytest.raises(ValueError, match="invalid tenant name"):
            store.create_token(bad)


def test_transition_is_compare_and_set(store):
    job = store.create_job(_job())
    assert store.transition(job.id, {"queued"}, "running", node_id="n1", started_at=5)
    assert not store.transition(job.id, {"queued"}, "running", node_id="n2")
    got = store.get_job(job.id)
    assert (got.status, got.node_id, got.started_at) == ("running", "n1", 5)
    with pytest.raises(TypeError, match="not job fields: bogus"):
        store.transition(job.id, {"running"}, "failed", bogus=1)


def test_only_one_of_many_racing_transitions_wins(store):
    job = store.create_job(_job())
    wins: list[str] = []
    barrier = threading.Barrier(8)

    def racer(i: int) -> None:
        barrier.wait()
        if store.transition(job.id, {"queued"}, "running", node_id=f"n{i}"):
            wins.append(f"n{i}")

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert store.get_job(job.id).node_id == wins[0]


def test_idempotency_key_returns_the_first_job_per_tenant(store):
    first = store.create_job(_job(idempotency_key="k1"))
    again = store.create_job(_job(idempotency_key="k1"))
    assert again.id == first.id
    other_tenant = store.create_job(_job(tenant="globex", idempotency_key="k1"))
    assert other_tenant.id != first.id
    assert len(store.list_jobs("acme")[0]) == 1


def _write_events(url: str, job_id: str, n: int, tag: str) -> None:
    s = Store(url)
    try:
        for i in range(n):
            s.add_event(job_id, f"{tag}-{i}")
            s.update_job(job_id, step=i)
    finally:
        s.close()


def test_concurrent_writers_threads_and_processes_lose_nothing(store, db_url):
    job = store.create_job(_job())
    threads = [threading.Thread(target=_write_events, args=(db_url, job.id, 40, f"t{i}"))
               for i in range(3)]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_events, args=(db_url, job.id, 40, f"p{i}"))
             for i in range(2)]
    for w in threads + procs:
        w.start()
    for t in threads:
        t.join(60)
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    events = store.list_events(job.id, limit=10_000, order="asc")
    assert len(events) == 5 * 40
    # Each writer's own events keep their order.
    for tag in ("t0", "t1", "t2", "p0", "p1"):
        mine = [int(e.message.split("-")[1]) for e in events if e.message.startswith(tag + "-")]
        assert mine == list(range(40))


def test_event_cursors_page_both_ways(store):
    job = store.create_job(_job())
    ids = [store.add_event(job.id, f"e{i}").id for i in range(7)]
    newest = store.list_events(job.id, limit=3)
    assert [e.id for e in newest] == ids[::-1][:3]
    older = store.list_events(job.id, after=newest[-1].id, limit=3)
    assert [e.id for e in older] == ids[::-1][3:6]
    newer = store.list_events(job.id, after=ids[4], order="asc")
    assert [e.id for e in newer] == ids[5:]
    other = store.create_job(_job())
    with pytest.raises(NotFound):
        store.list_events(other.id, after=ids[0])  # another job's event is not a cursor here


def test_job_pages_are_newest_first_and_scoped_to_the_tenant(store):
    mine = [store.create_job(_job()).id for _ in range(5)]
    theirs = store.create_job(_job(tenant="globex")).id
    page1, more1 = store.list_jobs("acme", limit=2)
    page2, more2 = store.list_jobs("acme", after=page1[-1].id, limit=2)
    page3, more3 = store.list_jobs("acme", after=page2[-1].id, limit=2)
    assert [j.id for j in page1 + page2 + page3] == mine[::-1]
    assert (more1, more2, more3) == (True, True, False)
    with pytest.raises(NotFound):
        store.list_jobs("acme", after=theirs)
    assert store.get_job(theirs, "acme") is None and store.get_job(theirs, "globex") is not None


def test_jobs_in_status_oldest_first_and_cancel_flag(store):
    a, b, c = (store.create_job(_job()) for _ in range(3))
    store.transition(b.id, {"queued"}, "running")
    assert [j.id for j in store.jobs_in_status("queued")] == [a.id, c.id]
    assert store.request_cancel(b.id).cancel_requested
    with pytest.raises(NotFound):
        store.update_job("ftjob-missing", step=1)


def test_non_finite_metrics_are_stored_as_null(store):
    job = store.create_job(_job())
    ev = store.add_event(job.id, "diverged", type="metrics", data={"loss": float("nan"),
                                                                   "lr": 1e-4})
    assert ev.data == {"loss": None, "lr": 1e-4}
    ck = store.add_checkpoint(job.id, 3, "sha256:" + "0" * 64, {"train_loss": float("inf")})
    assert store.list_checkpoints(job.id)[0].metrics == {"train_loss": None} == ck.metrics


def test_files_adapters_and_artifact_references(store):
    aid = "sha256:" + "a" * 64
    f1 = store.add_file(tenant="acme", filename="a.jsonl", bytes=3, sha256="a" * 64,
                        artifact_id=aid)
    f2 = store.add_file(tenant="globex", filename="b.jsonl", bytes=3, sha256="a" * 64,
                        artifact_id=aid)
    assert store.get_file(f1.id, "globex") is None
    assert [f.id for f in store.list_files("acme")[0]] == [f1.id]
    assert store.delete_file(f1.id, "globex") is None  # not theirs: nothing deleted
    assert store.delete_file(f1.id, "acme").id == f1.id
    assert store.artifact_referenced(aid)  # globex's file still points at it
    store.delete_file(f2.id)
    assert not store.artifact_referenced(aid)
    ad = store.add_adapter("acme", "m", "b" * 64, None, aid, 10, "c" * 64, {"eval_loss": 1.0})
    assert ad.id.startswith("ft-adapter-") and store.artifact_referenced(aid)
    assert store.get_adapter(ad.id, "globex") is None
    assert store.get_adapter(ad.id, "acme").metrics == {"eval_loss": 1.0}


def test_in_memory_url_is_shared_between_threads():
    s = Store("sqlite://")
    job = s.create_job(_job())
    seen = []
    t = threading.Thread(target=lambda: seen.append(s.get_job(job.id)))
    t.start()
    t.join()
    assert seen[0] is not None and seen[0].id == job.id
    s.close()


def test_float_metrics_for_integer_fields_read_back_valid(store):
    job = store.create_job(_job())
    store.transition(job.id, {"queued"}, "running", predicted_memory=1.5e9,
                     memory_breakdown={"weights": 1.0e9, "activations": 2.5e8})
    got = store.update_job(job.id, trained_tokens=1234.0, step=7.0,
                           measured_peak_memory=float("nan"))
    assert (got.trained_tokens, got.step, got.predicted_memory) == (1234, 7, 1_500_000_000)
    assert got.measured_peak_memory is None
    assert got.memory_breakdown == {"weights": 1_000_000_000, "activations": 250_000_000}


def test_a_database_from_an_older_version_gets_the_new_columns(tmp_path):
    """Columns are only ever added: opening an older file adds them, and old rows read back."""
    import sqlite3

    from lorapool.service.store import Store

    db = tmp_path / "old.db"
    store = Store(f"sqlite:///{db}")
    store.close()
    con = sqlite3.connect(db)
    con.execute("ALTER TABLE jobs DROP COLUMN placement")
    con.execute("DROP TABLE alembic_version")  # lorapool before Alembic had none
    # ... nor the columns that migrations added since.
    con.execute("ALTER TABLE tokens DROP COLUMN is_admin")
    con.execute("ALTER TABLE jobs DROP COLUMN integrations")
    con.execute("DROP TABLE exports")  # (and the table of migration 0004)
    con.execute("INSERT INTO jobs (id, tenant, model, status, created_at, hyperparameters, seed, "
                "result_files, lora, quantization, max_seq_len, spec, cancel_requested, attempt, "
                "memory_breakdown) VALUES ('ftjob-old', 'acme', 'm', 'queued', 1, '{}', 42, "
                "'[]', '{}', 'nf4', 64, '{}', 0, 0, '{}')")
    con.commit()
    con.close()
    store = Store(f"sqlite:///{db}")
    try:
        job = store.get_job("ftjob-old")
        assert job is not None and job.placement == {}
    finally:
        store.close()
