"""Opening the database: an SQLAlchemy engine set up for many threads and a few processes.

For SQLite (the default) every connection runs in WAL mode (readers never block the writer)
with a busy timeout, and write transactions start with `BEGIN IMMEDIATE`: a transaction that
reads and then writes would otherwise fail at once with "database is locked" when two writers
meet, instead of waiting its turn. Other backends are used as SQLAlchemy configures them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, MetaData, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool

BUSY_TIMEOUT_MS = 30_000
WRITE_OPTION = "lorapool_write"


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


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
        if not memory:
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        if conn.get_execution_options().get(WRITE_OPTION):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")

    return engine


def add_missing_columns(engine: Engine, metadata: MetaData) -> list[str]:
    """Bring tables made by an older lorapool up to this version's columns; the added ones.

    New columns are only ever added (never renamed or dropped), so `ALTER TABLE … ADD COLUMN`
    with the column's constant default (or NULL) is a complete migration; rows written by the
    older version read back with that default.
    """
    missing = []
    with engine.connect() as conn:
        existing = inspect(conn)
        tables = set(existing.get_table_names())
        for table in metadata.sorted_tables:
            if table.name in tables:
                have = {c["name"] for c in existing.get_columns(table.name)}
                missing += [(table.name, col) for col in table.columns if col.name not in have]
    if not missing:
        return []
    with engine.begin() as conn:
        for table_name, col in missing:
            ddl = col.type.compile(engine.dialect)
            default = _default_value(col)
            if default is not None:
                ddl += f" DEFAULT {_literal(default)}"
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
