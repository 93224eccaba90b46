"""The `lorapool` command line (typer + rich), one module per command group.

Client commands talk to a server through `lorapool.Client`; the server URL and token come from
--base-url/--api-key (before or after the sub-command) or LORAPOOL_BASE_URL/LORAPOOL_API_KEY.
Server-side commands import `lorapool.service` lazily and say how to install it when it is
missing. Every error prints as one red line and exits with status 1.

    _app.py     the app, global options, consoles, errors, tables (imports no command module)
    _datadir.py where the server's data directory is (serve, token create, models add …)
    server.py   serve, token, models add|list, demo, donate
    jobs.py     submit, jobs, logs, download, nodes, federate
    files.py    files list|upload|delete
    merges.py   merge, merges, adapters, eval, export, models download
"""

from __future__ import annotations

from . import files, jobs, merges, server  # noqa: F401  (each registers its commands)
from ._app import app


def main() -> None:
    app()


__all__ = ["app", "main"]
