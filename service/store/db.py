"""Opening the database and bringing its schema to this version's (Alembic migrations).

For SQLite (the default) every connection runs in WAL mode (readers never block the writer)
with a busy timeout, and write transactions start with `BEGIN IMMEDIATE`: a transaction that
reads and then writes would otherwise fail at once with "database is locked" when two writers
meet, instead of waiting its turn. Other backends are used as SQLAlchemy configures them.

Schema: `migrate(engine)` runs at every store start. It reads `alembic_version` (one cheap
read; the usual case, a database already at head, stops there) and otherwise, holding the
database's write lock (SQLite: `BEGIN IMMEDIATE`, so of several processes starting at once one
migrates and the others then find it at head), runs the revisions in `migrations/versions/`
inside that one transaction:
- an empty database: every revision from the baseline up;
- a database made by a lorapool before Alembic (its tables, no `alembic_version`): first the
  old catch-up (missing tables, columns and indexes of the baseline are created, columns with
  their constant default), then it is stamped at the baseline and upgraded from there;
- a database at a revision this code does not know (a newer lorapool migrated it): refused with
  `SchemaError` before anything is written.

How to change the schema: edit the models (schema.py, federations.py), then
`python -m lorapool.service.store.migrate revision -m "what changed"`, which autogenerates
`migrations/versions/NNNN_what_changed.py` by comparing the models with a scratch database at
head; read and fix it (autogenerate misses renames and some type changes), keep it
backward-compatible where you can (add columns nullable or with a `server_default`), and run
tests/store/test_migrations.py, which fails while models and migrations disagree. On SQLite the
revision uses `op.batch_alter_table` (copy-and-swap); the migration runs with foreign keys off
and is checked with `PRAGMA foreign_key_check` before it commits.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from alembic import command
from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection, Engine, MetaData, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import StaticPool

BUSY_TIMEOUT_MS = 30_000
WRITE_OPTION = "lorapool_write"


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def _use_wal(cur: Any) -> None:
    """Switch the file to WAL (a setting the file keeps). Switching needs the file to itself,
    and SQLite answers "database is locked" at once, without its busy handler, while another
    process holds a lock — as when several processes open a new database together and one is
    already migrating it — so retry until the busy timeout."""
    import sqlite3
    import time

    if str(cur.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
        return
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def make_engine(url: str) -> Engine:
    u = make_url(url)
    if u.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)

    memory = u.database in (None, "", ":memory:")
    kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False,
                                                "timeout": BUSY_TIMEOUT_MS / 1000}}
    if memory:
        # One shared connection, or every thread would see its own empty database.
        kwargs["poolclass"] = StaticPool
    else:
        Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event below issue BEGIN itself (pysqlite's own implicit
        # transactions would defer the lock and ignore BEGIN IMMEDIATE).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        if not memory:
            _use_wal(cur)
            cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        if conn.get_execution_options().get(WRITE_OPTION):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")

    return engine


MIGRATIONS_DIR = Path(__file__).parent / "migrations"
BASELINE = "0001"  # the revision a pre-Alembic database is stamped at (versions/0001_baseline.py)


class SchemaError(RuntimeError):
    """The database's schema is not one this lorapool can use or migrate."""


@dataclass
class MigrateResult:
    """What `migrate` found and did."""

    before: Optional[str]  # the revision found (None: empty or made before Alembic)
    after: str  # the revision the database is at now (head)
    migrated: bool  # this call ran revisions (False: another process had, or nothing to do)
    caught_up: list[str] = field(default_factory=list)  # pre-Alembic catch-up: what it added


def models_metadata() -> MetaData:
    """The models' MetaData with every table registered (some models live outside schema.py)."""
    from . import (
        exports,  # noqa: F401 - registers ExportRow on Base
        federations,  # noqa: F401 - registers FederationRow on Base
    )
    from .schema import Base

    return Base.metadata


def alembic_config(url: Optional[str] = None, connection: Optional[Connection] = None,
                   script_location: Union[str, Path, None] = None) -> Config:
    """An Alembic Config built in code (no alembic.ini): the packaged migrations, and either an
    open `connection` (used as is, in its transaction) or a database `url`."""
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location or MIGRATIONS_DIR))
    cfg.set_main_option("path_separator", "os")
    if url is not None:
        # The Config is a ConfigParser: a literal % (in a password) must be doubled.
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@functools.lru_cache(maxsize=8)
def _script(script_location: str) -> ScriptDirectory:
    # Parsing the revision files once per process keeps every later store start to one read.
    return ScriptDirectory.from_config(alembic_config(script_location=script_location))


def _state(conn: Connection, baseline_tables: set[str]) -> tuple[Optional[str], bool]:
    """(revision in alembic_version or None, whether lorapool tables exist without it)."""
    names = set(inspect(conn).get_table_names())
    if "alembic_version" not in names:
        return None, bool(names & baseline_tables)
    rows = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    if len(rows) > 1:
        raise SchemaError(f"alembic_version holds several revisions ({', '.join(rows)}); "
                          "lorapool's migrations are linear, so this database was changed "
                          "by something else")
    return (rows[0] if rows else None), False


def _check_known(script: ScriptDirectory, revision: Optional[str], url: str) -> None:
    if revision is None:
        return
    try:
        known = script.get_revision(revision) is not None
    except CommandError:
        known = False
    if not known:
        raise SchemaError(
            f"the database {make_url(url).render_as_string(hide_password=True)} is at schema "
            f"revision {revision!r}, which this lorapool does not know (it knows up to "
            f"{script.get_current_head()!r}): a newer lorapool has migrated it. Run that "
            "version, or restore a backup taken before the upgrade; nothing was changed.")


def migrate(engine: Engine, script_location: Union[str, Path, None] = None) -> MigrateResult:
    """Bring the database to the newest revision (see the module docstring); safe to call from
    several processes at once."""
    script = _script(str(script_location or MIGRATIONS_DIR))
    head = script.get_current_head()
    if head is None:
        raise SchemaError(f"no migrations found in {script.dir}")
    baseline_tables = set(_baseline_metadata(script).tables)
    url = str(engine.url)
    with engine.connect() as conn:
        before, _ = _state(conn, baseline_tables)
        conn.rollback()
    if before == head:
        return MigrateResult(before, head, migrated=False)
    _check_known(script, before, url)
    try:
        return _migrate_locked(engine, script, head, baseline_tables, script_location)
    except DBAPIError:
        # Backends without SQLite's write lock (two processes both creating a table): the
        # other one won; fine if it left the database at head, else report what failed.
        with engine.connect() as conn:
            now, _ = _state(conn, baseline_tables)
            conn.rollback()
        if now != head:
            raise
        return MigrateResult(before, head, migrated=False)


def _migrate_locked(engine: Engine, script: ScriptDirectory, head: str,
                    baseline_tables: set[str],
                    script_location: Union[str, Path, None]) -> MigrateResult:
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as conn:
        if sqlite:
            # Batch ALTERs copy a table, drop the old one and rename the copy; with foreign keys
            # on, dropping a referenced table (jobs ← events) fails or cascades. The pragma only
            # takes effect outside a transaction, so it is set on the driver connection here
            # and checked with foreign_key_check before commit.
            conn.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")
        try:
            conn.execution_options(**{WRITE_OPTION: True})  # SQLite: BEGIN IMMEDIATE
            with conn.begin():
                # Read again, now holding the write lock: another process may have migrated.
                before, legacy = _state(conn, baseline_tables)
                if before == head:
                    return MigrateResult(before, head, migrated=False)
                _check_known(script, before, str(engine.url))
                cfg = alembic_config(connection=conn, script_location=script_location)
                added: list[str] = []
                if legacy:
                    added = _catch_up_pre_alembic(conn, _baseline_metadata(script))
                    command.stamp(cfg, BASELINE)
                _upgrade_to_head(cfg, script)
                if sqlite:
                    bad = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if bad:
                        raise SchemaError(f"the migration to {head} broke foreign keys: {bad[:5]}")
                return MigrateResult(before, head, migrated=True, caught_up=added)
        finally:
            if sqlite:
                conn.connection.driver_connection.execute("PRAGMA foreign_keys=ON")


def _upgrade_to_head(cfg: Config, script: ScriptDirectory) -> None:
    """`alembic.command.upgrade(cfg, "head")`, but with the already-parsed ScriptDirectory:
    the command parses every revision file again, which doubled a fresh store's start-up."""
    with EnvironmentContext(cfg, script, fn=lambda rev, _ctx: script._upgrade_revs("head", rev),
                            destination_rev="head"):
        script.run_env()


def _baseline_metadata(script: ScriptDirectory) -> MetaData:
    """The frozen tables of the baseline revision (versions/0001_baseline.py)."""
    rev = script.get_revision(BASELINE)
    if rev is None:
        raise SchemaError(f"baseline revision {BASELINE} missing from {script.dir}")
    return rev.module.METADATA


def _catch_up_pre_alembic(conn: Connection, baseline: MetaData) -> list[str]:
    """Bring a database made before Alembic to exactly the baseline: what the old start-up did
    (create missing tables, add missing columns) plus missing indexes. What was added."""
    existing = inspect(conn)
    have_tables = set(existing.get_table_names())
    added = []
    for table in baseline.sorted_tables:
        if table.name not in have_tables:
            table.create(conn)
            added.append(table.name)
            continue
        have_idx = {i["name"] for i in existing.get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in have_idx:
                index.create(conn)
                added.append(f"{table.name}:{index.name}")
    return added + add_missing_columns(conn, baseline)


def add_missing_columns(bind: Union[Engine, Connection], metadata: MetaData) -> list[str]:
    """Add the columns of `metadata` that the database's tables lack; the added ones.

    Used for databases made before Alembic (see `migrate`), whose schema only ever gained
    columns: `ALTER TABLE … ADD COLUMN` with the column's constant default (or NULL) is a
    complete migration; rows written by the older version read back with that default. Given a
    Connection it runs in that connection's transaction.
    """
    if isinstance(bind, Engine):
        with bind.begin() as conn:
            return add_missing_columns(conn, metadata)
    conn = bind
    existing = inspect(conn)
    tables = set(existing.get_table_names())
    missing = []
    for table in metadata.sorted_tables:
        if table.name in tables:
            have = {c["name"] for c in existing.get_columns(table.name)}
            missing += [(table.name, col) for col in table.columns if col.name not in have]
    for table_name, col in missing:
        ddl = col.type.compile(conn.dialect)
        default = _default_value(col)
        if default is not None:
            # Old rows get the default, so a required column can be NOT NULL straight away
            # (one without a default stays nullable: old rows have nothing to put there).
            ddl += f" DEFAULT {_literal(default)}" + ("" if col.nullable else " NOT NULL")
        conn.exec_driver_sql(f'ALTER TABLE "{table_name}" ADD COLUMN "{col.name}" {ddl}')
    return [f"{t}.{c.name}" for t, c in missing]


def _default_value(col: Any) -> Any:
    d = col.default
    if d is None:
        return None
    if getattr(d, "is_scalar", False):
        return d.arg
    if getattr(d, "is_callable", False):  # `default=dict` / `default=list` (JSON columns)
        try:
            return d.arg(None)
        except Exception:  # noqa: BLE001 - a default that needs a context: leave it NULL
            return None
    return None


def _literal(value: Any) -> str:
    import json

    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (dict, list)):
        value = json.dumps(value)
    return "'" + str(value).replace("'", "''") + "'"
