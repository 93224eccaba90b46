"""Alembic's entry point for the store's migrations (run by `alembic.command.*`, never imported).

Two ways in:
- from `db.migrate` (store start): the caller passes an open connection in
  `config.attributes["connection"]`, already inside the transaction that holds the database's
  write lock; the migrations run in that transaction and the caller commits.
- from `python -m lorapool.service.store.migrate` (by hand): `sqlalchemy.url` is set on the
  Config and an engine is made here, the same way the store makes one (`db.make_engine`).

SQLite gets `render_as_batch`: SQLite's ALTER TABLE can add and rename but not much else, so
autogenerate writes later changes as batch operations (copy into a new table, swap it in).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from lorapool.service.store.db import WRITE_OPTION, make_engine, models_metadata

config = context.config


def _configure_and_run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=models_metadata(),
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    """`--sql` mode: print the DDL instead of running it (for a DBA to review)."""
    url = config.get_main_option("sqlalchemy.url")
    context.configure(url=url, target_metadata=models_metadata(), literal_binds=True,
                      render_as_batch=url is not None and url.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure_and_run(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database: set sqlalchemy.url on the Config (the migrate "
                           "command's --database-url)")
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            # BEGIN IMMEDIATE on SQLite: the write lock is held for the whole run.
            conn.execution_options(**{WRITE_OPTION: True})
            with conn.begin():
                _configure_and_run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
