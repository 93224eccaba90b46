"""The store's Alembic migrations on real SQLite files: the migrations build exactly the models'
schema, an empty and a pre-Alembic database end at the same head, a database from a newer
lorapool is refused untouched, concurrent starts migrate once, and a later batch ALTER of a
referenced table keeps its rows and foreign keys."""

from __future__ import annotations

import multiprocessing
import shutil
import sqlite3
import textwrap
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from lorapool.service.store import JobRecord, Store, new_id
from lorapool.service.store.db import (
    MIGRATIONS_DIR,
    SchemaError,
    _baseline_metadata,
    _script,
    make_engine,
    migrate,
    models_metadata,
)
from lorapool.service.store.migrate import main as migrate_main

HEAD = _script(str(MIGRATIONS_DIR)).get_current_head()


def _url(path: Path) -> str:
    return f"sqlite:///{path}"


def _diff(url: str) -> list:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            return compare_metadata(ctx, models_metadata())
    finally:
        engine.dispose()


def _schema(url: str) -> dict:
    """Every table's columns (name, type, nullability), indexes, uniques and foreign keys."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            insp = inspect(conn)
            out = {}
            for t in sorted(insp.get_table_names()):
                out[t] = {
                    "columns": sorted((c["name"], str(c["type"]), c["nullable"])
                                      for c in insp.get_columns(t)),
                    "indexes": sorted((i["name"], tuple(i["column_names"]), bool(i["unique"]))
                                      for i in insp.get_indexes(t)),
                    "unique": sorted(tuple(u["column_names"])
                                     for u in insp.get_unique_constraints(t)),
                    "fks": sorted((tuple(f["constrained_columns"]), f["referred_table"])
                                  for f in insp.get_foreign_keys(t)),
                }
            return out
    finally:
        engine.dispose()


def _ddl_items(sql: str | None) -> list[str] | None:
    """A CREATE statement's column and constraint clauses, in a stable order: Alembic's batch
    mode (SQLite "move and copy") writes a rebuilt table's constraints in no fixed order."""
    if sql is None:
        return None
    head, _, body = sql.partition("(")
    items = [i.strip().rstrip(",").strip() for i in body.rstrip().rstrip(")").split("\n")]
    return [head.strip()] + sorted(i for i in items if i)


def _sqlite_master(path: Path) -> list:
    con = sqlite3.connect(path)
    try:
        rows = con.execute("SELECT type, name, tbl_name, sql FROM sqlite_master "
                           "ORDER BY type, name").fetchall()
    finally:
        con.close()
    return [(t, n, tbl, _ddl_items(sql)) for t, n, tbl, sql in rows]


def _version(path: Path) -> list:
    con = sqlite3.connect(path)
    try:
        return [r[0] for r in con.execute("SELECT version_num FROM alembic_version")]
    finally:
        con.close()


def _pre_alembic_db(path: Path) -> None:
    """A database as lorapool made it before Alembic: `create_all` of that day's tables (the
    baseline's frozen copy), no alembic_version, one tenant row."""
    engine = make_engine(_url(path))
    try:
        _baseline_metadata(_script(str(MIGRATIONS_DIR))).create_all(engine)
        with engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO tenants (name, created_at) VALUES ('acme', 1)")
    finally:
        engine.dispose()


def test_migrations_build_exactly_the_models(tmp_path):
    url = _url(tmp_path / "new.db")
    result = migrate(make_engine(url))
    assert (result.before, result.after, result.migrated) == (None, HEAD, True)
    assert _diff(url) == []
    # The comparison does see a difference when there is one.
    con = sqlite3.connect(tmp_path / "new.db")
    con.execute("DROP INDEX ix_jobs_status_seq")
    con.close()
    assert [d[0] for d in _diff(url)] == ["add_index"]
    # And so does the by-hand check command (on its own scratch database: they agree).
    assert migrate_main(["check"]) == 0


def test_empty_and_pre_alembic_databases_end_at_the_same_head(tmp_path):
    fresh, legacy, older = tmp_path / "fresh.db", tmp_path / "legacy.db", tmp_path / "older.db"
    migrate(make_engine(_url(fresh)))

    # Made by the code just before Alembic: stamped, nothing to add, same DDL to the byte.
    _pre_alembic_db(legacy)
    result = migrate(make_engine(_url(legacy)))
    assert (result.before, result.after, result.migrated) == (None, HEAD, True)
    assert result.caught_up == []
    assert _version(legacy) == [HEAD]
    assert _sqlite_master(legacy) == _sqlite_master(fresh)

    # Made by an older lorapool still: a table, a column and an index missing.
    _pre_alembic_db(older)
    con = sqlite3.connect(older)
    con.execute("DROP TABLE federations")
    con.execute("DROP INDEX ix_jobs_status_seq")
    con.execute("ALTER TABLE jobs DROP COLUMN placement")
    con.execute("INSERT INTO jobs (id, tenant, model, status, created_at, hyperparameters, seed, "
                "result_files, lora, quantization, max_seq_len, spec, cancel_requested, "
                "attempt, memory_breakdown) VALUES ('ftjob-old', 'acme', 'm', 'queued', 1, "
                "'{}', 42, '[]', '{}', 'nf4', 64, '{}', 0, 0, '{}')")
    con.commit()
    con.close()
    result = migrate(make_engine(_url(older)))
    assert sorted(result.caught_up) == ["federations", "jobs.placement",
                                        "jobs:ix_jobs_status_seq"]
    assert _version(older) == [HEAD]
    assert _schema(_url(older)) == _schema(_url(fresh))
    assert _diff(_url(older)) == []
    store = Store(_url(older))
    try:
        assert store.get_job("ftjob-old").placement == {}
        assert store.list_tenants() == ["acme"]
    finally:
        store.close()


def test_a_database_from_a_newer_lorapool_is_refused_untouched(tmp_path):
    db = tmp_path / "future.db"
    Store(_url(db)).close()
    con = sqlite3.connect(db)
    con.execute("UPDATE alembic_version SET version_num = 'f00d'")
    con.execute("ALTER TABLE jobs DROP COLUMN placement")  # as if a newer revision dropped it
    con.commit()
    con.close()
    before = _sqlite_master(db)
    with pytest.raises(SchemaError, match=r"revision 'f00d'.*does not know.*newer lorapool"):
        Store(_url(db))
    assert _version(db) == ["f00d"]
    assert _sqlite_master(db) == before


def _start(url: str, barrier, results) -> None:
    engine = make_engine(url)
    barrier.wait(60)
    result = migrate(engine)
    results.put((result.migrated, result.after))
    engine.dispose()


def test_processes_starting_at_once_migrate_once(tmp_path):
    url = _url(tmp_path / "shared.db")
    # fork: the children start in milliseconds, so they really meet at the lock (this process
    # holds no connection to the file, so nothing is shared across the fork).
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    n = 3
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_start, args=(url, barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    got = sorted(results.get(timeout=5) for _ in range(n))
    assert got == [(False, HEAD)] * (n - 1) + [(True, HEAD)]
    assert _version(tmp_path / "shared.db") == [HEAD]
    assert _diff(url) == []


_LATER_REVISION = '''
"""A later revision: alter a column of jobs (referenced by events and checkpoints)."""
import sqlalchemy as sa
from alembic import op

revision = "9001"
down_revision = "{head}"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.alter_column("suffix", type_=sa.String(128), existing_nullable=True)
        batch_op.add_column(sa.Column("priority", sa.Integer(), nullable=False,
                                      server_default="0"))


def downgrade():
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_column("priority")
'''


def test_a_later_batch_alter_of_a_referenced_table_keeps_rows_and_foreign_keys(tmp_path):
    """SQLite rewrites `jobs` (copy, drop, rename) while events and checkpoints point at it."""
    scripts = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, scripts, ignore=shutil.ignore_patterns("__pycache__"))
    (scripts / "versions" / "9001_later.py").write_text(
        textwrap.dedent(_LATER_REVISION.format(head=HEAD)))
    url = _url(tmp_path / "db.sqlite")
    store = Store(url)
    job = store.create_job(JobRecord(id=new_id("ftjob"), tenant="acme", model="m",
                                     suffix="x" * 60))
    store.add_event(job.id, "queued")
    store.close()

    engine = make_engine(url)
    result = migrate(engine, script_location=scripts)
    assert (result.before, result.after, result.migrated) == (HEAD, "9001", True)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1  # back on
        assert conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall() == []
        row = conn.exec_driver_sql("SELECT suffix, priority FROM jobs").one()
        assert tuple(row) == ("x" * 60, 0)
        joined = conn.exec_driver_sql(
            "SELECT count(*) FROM events JOIN jobs ON events.job_id = jobs.id").scalar()
        assert joined == 1
        cols = {c["name"]: c for c in inspect(conn).get_columns("jobs")}
        assert str(cols["suffix"]["type"]) == "VARCHAR(128)"
    engine.dispose()
