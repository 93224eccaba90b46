"""`lorapool files list|upload|delete`: the data files you uploaded (a submit uploads its
local files; a refused submit deletes them again)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._app import JsonOption, client, err, files_app, friendly, table


@files_app.command("list")
@friendly
def files_list(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(help="How many (newest first).")] = 20,
    after: Annotated[Optional[str], typer.Option(help="Start after this file id.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Your uploaded files, newest first."""
    with client(ctx) as c:
        page = c.files.list(limit=limit, after=after)
    if as_json:
        print(page.model_dump_json(indent=2))
        return
    table(["id", "filename", "bytes", "purpose", "uploaded"],
          [(f.id, f.filename, str(f.bytes), f.purpose,
            dt.datetime.fromtimestamp(f.created_at).strftime("%Y-%m-%d %H:%M"))
           for f in page.data], ids=["id"])
    if page.has_more:
        err().print(f"more: --after {page.last_id}")


@files_app.command("upload")
@friendly
def files_upload(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="A local JSONL file (checked line by line).")],
    purpose: Annotated[str, typer.Option(help="What the file is for.")] = "fine-tune",
) -> None:
    """Upload a data file; prints its id (use it as a job's TRAINING_FILE)."""
    with client(ctx) as c:
        f = c.files.upload(path, purpose=purpose)
    print(f.id)


@files_app.command("delete")
@friendly
def files_delete(
    ctx: typer.Context,
    file_ids: Annotated[list[str], typer.Argument(help="File ids (file-…).", metavar="FILE_ID")],
) -> None:
    """Delete uploaded files (jobs that used them keep their copy)."""
    with client(ctx) as c:
        for file_id in file_ids:
            c.files.delete(file_id)
            print(file_id)
