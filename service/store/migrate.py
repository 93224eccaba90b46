"""`python -m lorapool.service.store.migrate`: the store's Alembic migrations by hand.

    upgrade  [--database-url URL]   bring a database to head (what every store start does)
    current  [--database-url URL]   the database's revision, and head
    check                           do the models and the migrations agree? (exit 1 if not)
    revision -m "what changed"      write migrations/versions/NNNN_what_changed.py

`--database-url` defaults to the server's (LORAPOOL_DATABASE_URL, else the SQLite file under
LORAPOOL_DATA_DIR). `check` and `revision` need no database: they migrate a scratch SQLite file
to head and compare it with the models (schema.py, federations.py) the way
`alembic revision --autogenerate` does. After `revision`, read the file: autogenerate sees
added/removed tables, columns, indexes and constraints and type changes, but writes a rename as
drop + add; new NOT NULL columns need a `server_default` for existing rows. Then run
`pytest tests/store/test_migrations.py`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from .db import (
    MIGRATIONS_DIR,
    _script,
    alembic_config,
    make_engine,
    migrate,
    models_metadata,
)


def _default_url() -> str:
    from ..config import Settings

    return str(Settings.from_env().database_url)


def schema_diff(url: str) -> list[Any]:
    """Alembic's differences between the database at `url` and the models (empty: they agree)."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(
                conn, opts={"compare_type": True,
                            "render_as_batch": conn.dialect.name == "sqlite"})
            return compare_metadata(ctx, models_metadata())
    finally:
        engine.dispose()


def _scratch_at_head(folder: str) -> str:
    url = f"sqlite:///{Path(folder) / 'scratch.db'}"
    engine = make_engine(url)
    try:
        migrate(engine)
    finally:
        engine.dispose()
    return url


def _next_rev_id() -> str:
    script = _script(str(MIGRATIONS_DIR))
    numbers = [int(r.revision) for r in script.walk_revisions() if r.revision.isdigit()]
    return f"{max(numbers, default=0) + 1:04d}"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorapool.service.store.migrate",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("upgrade", "current"):
        p = sub.add_parser(name)
        p.add_argument("--database-url", default=None)
    sub.add_parser("check")
    p = sub.add_parser("revision")
    p.add_argument("-m", "--message", required=True)
    p.add_argument("--empty", action="store_true",
                   help="write a revision even if the models did not change (a data migration)")
    args = parser.parse_args(argv)

    if args.cmd in ("upgrade", "current"):
        url = args.database_url or _default_url()
        engine = make_engine(url)
        try:
            if args.cmd == "upgrade":
                result = migrate(engine)
                print(f"{result.before or '(none)'} -> {result.after}"
                      + ("" if result.migrated else " (nothing to do)"))
                if result.caught_up:
                    print("pre-Alembic catch-up added: " + ", ".join(result.caught_up))
            else:
                with engine.connect() as conn:
                    current = MigrationContext.configure(conn).get_current_revision()
                head = _script(str(MIGRATIONS_DIR)).get_current_head()
                print(f"database: {current or '(none)'}  head: {head}")
        finally:
            engine.dispose()
        return 0

    with tempfile.TemporaryDirectory() as folder:
        url = _scratch_at_head(folder)
        diff = schema_diff(url)
        if args.cmd == "check":
            for d in diff:
                print(d)
            print("models and migrations agree" if not diff else
                  f"{len(diff)} difference(s): write a revision (see --help)")
            return 1 if diff else 0
        if not diff and not args.empty:
            print("models and migrations agree: nothing to generate (--empty for a data "
                  "migration)")
            return 1
        scripts = command.revision(alembic_config(url=url), message=args.message,
                                   autogenerate=not args.empty, rev_id=_next_rev_id())
        for s in scripts if isinstance(scripts, list) else [scripts]:
            if s is not None:
                print(f"wrote {s.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
