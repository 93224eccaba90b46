"""What every `lorapool` command shares: the typer app and its groups, the global options
(--base-url/--api-key, accepted before or after the sub-command), consoles, error printing,
the lazy import of the server, tables that never break ids, and the help-text fix.

The command modules (`server`, `jobs`, `files`, `merges`) import this one; it imports none of
them, so there is no import cycle.
"""

from __future__ import annotations

import functools
import importlib
from typing import Annotated, Any, Callable, NoReturn, Optional, Sequence, TypeVar

import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .._quiet import quiet_libraries
from .._sync import Client
from ..errors import LorapoolError
from ..types import FineTuningJob

F = TypeVar("F", bound=Callable[..., Any])

SERVICE_HINT = "the lorapool server is not installed here: pip install 'lorapool[service]'"
# Options of the root command that may also be written after a sub-command.
GLOBAL_OPTIONS = ("--base-url", "--api-key")


def hoist_global_options(args: Sequence[str]) -> list[str]:
    """Move `--api-key X`, `--api-key=X` (and --base-url) found anywhere before a `--` to the
    front, where the root command parses them: `lorapool jobs list --api-key X` works."""
    front: list[str] = []
    rest: list[str] = []
    i, args = 0, list(args)
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest.extend(args[i:])
            break
        name = arg.split("=", 1)[0]
        if name in GLOBAL_OPTIONS:
            if "=" in arg:
                front.append(arg)
            elif i + 1 < len(args):
                front.extend(args[i:i + 2])
                i += 1
            else:
                rest.append(arg)  # no value: leave it for click to complain about
        else:
            rest.append(arg)
        i += 1
    return front + rest


class RootGroup(typer.core.TyperGroup):
    """The root command: global options are accepted after the sub-command too."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, hoist_global_options(args))


app = typer.Typer(name="lorapool", cls=RootGroup, no_args_is_help=True, add_completion=False,
                  # Plain click help: at 80 columns rich's boxed panels cut option names
                  # mid-word and show flags as `--help <bool>`.
                  rich_markup_mode=None,
                  pretty_exceptions_enable=False,
                  help="Fine-tune LLMs with QLoRA on a pool of office GPUs.")
token_app = typer.Typer(no_args_is_help=True, help="API tokens (server side).")
models_app = typer.Typer(no_args_is_help=True, help="Base models.")
jobs_app = typer.Typer(no_args_is_help=True, help="Fine-tuning jobs.")
files_app = typer.Typer(no_args_is_help=True, help="Uploaded data files: list, upload, delete.")
adapters_app = typer.Typer(no_args_is_help=True, help="Adapters: list, share, unshare, import.")
merges_app = typer.Typer(no_args_is_help=True, help="Merges of adapters.")
for _sub, _name in ((token_app, "token"), (models_app, "models"), (jobs_app, "jobs"),
                    (files_app, "files"), (adapters_app, "adapters"), (merges_app, "merges")):
    app.add_typer(_sub, name=_name)


def out() -> Console:
    return Console(soft_wrap=True, highlight=False)


def err() -> Console:
    return Console(stderr=True, soft_wrap=True, highlight=False)


class ServiceMissing(Exception):
    pass


def fail(message: str) -> NoReturn:
    # One red line; details the server listed (e.g. every bad line of a data file) follow it.
    first, *rest = message.splitlines() or [""]
    console = err()
    console.print(f"[bold red]Error:[/] [red]{escape(first)}[/]")
    for line in rest:
        console.print(f"  {escape(line)}")
    raise typer.Exit(1)


def friendly(fn: F) -> F:
    """Print expected failures as one red line (exit 1) instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ServiceMissing as exc:
            fail(str(exc))
        except LorapoolError as exc:
            fail(str(exc))
        except (FileExistsError, FileNotFoundError, PermissionError) as exc:
            fail(str(exc))

    return wrapper  # type: ignore[return-value]


def service(module: str, name: str) -> Any:
    """`from lorapool.service.<module> import <name>`, or the install hint when a dependency of
    the server (torch, ray, fastapi …) is missing. A missing lorapool module is a real bug and
    is not hidden behind the hint."""
    try:
        mod = importlib.import_module(f"lorapool.service.{module}")
        return getattr(mod, name)
    except ImportError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing and missing != "lorapool":
            raise ServiceMissing(f"{SERVICE_HINT} ({exc.name} is missing)") from exc
        raise


def server_errors(fn: Callable[[], Any]) -> Any:
    # The admin functions refuse bad input with ValueError (AdminError, pydantic's errors).
    try:
        return fn()
    except ValueError as exc:
        fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


class State:
    def __init__(self, base_url: Optional[str], api_key: Optional[str]) -> None:
        self.base_url = base_url
        self.api_key = api_key

    def client(self) -> Client:
        return Client(self.base_url, self.api_key)


def client(ctx: typer.Context) -> Client:
    state = ctx.find_root().obj
    return state.client() if isinstance(state, State) else Client()


@app.callback()
def root(
    ctx: typer.Context,
    base_url: Annotated[Optional[str], typer.Option(
        "--base-url", envvar="LORAPOOL_BASE_URL",
        help="Server URL (default http://127.0.0.1:8000).")] = None,
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", envvar="LORAPOOL_API_KEY", show_default=False,
        help="API token; better set LORAPOOL_API_KEY than type it.")] = None,
) -> None:
    quiet_libraries()
    ctx.obj = State(base_url, api_key)


# -- output ----------------------------------------------------------------------------------

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts).")]


def table(columns: Sequence[str], rows: Sequence[Sequence[str]], *,
          ids: Sequence[str] = ()) -> None:
    """Print rows on stdout. The `ids` columns are never cut or wrapped (ids are for copying):
    they get their full width and the other columns shrink and wrap. When the ids and a
    readable minimum of the rest do not fit the terminal, each row is printed as a short
    block instead (first id and the other values on one line, further ids below it)."""
    console = out()
    idx = {c: i for i, c in enumerate(columns)}

    def longest(col: str) -> int:
        return max([len(Text.from_markup(str(r[idx[col]])).plain) for r in rows] + [0])

    widths = {c: max(longest(c), len(c)) if c in ids else min(max(longest(c), 1),
                                                               max(len(c), 6))
              for c in columns}
    needed = sum(w + 3 for w in widths.values()) + 1  # borders and padding
    if needed <= console.width:
        t = Table(*columns)
        for col in t.columns:
            name = str(col.header)
            col.min_width = widths[name]
            if name in ids:
                col.no_wrap, col.overflow = True, "ignore"
            else:
                col.overflow = "fold"
        for r in rows:
            t.add_row(*r)
        console.print(t)
        return
    first, *more = [c for c in columns if c in ids] or [columns[0]]
    for r in rows:
        rest = [str(r[idx[c]]) for c in columns if c not in ids and str(r[idx[c]])]
        console.print(f"[bold]{escape(str(r[idx[first]]))}[/]  " + "  ".join(rest))
        for c in more:
            if str(r[idx[c]]):
                console.print(f"  {c}: {escape(str(r[idx[c]]))}")


def status_style(status: str) -> str:
    return {"succeeded": "green", "failed": "red", "cancelled": "yellow",
            "running": "cyan"}.get(status, "white")


def job_line(job: FineTuningJob) -> str:
    steps = f" step {job.step}/{job.total_steps}" if job.total_steps else ""
    return f"{job.id} [{status_style(job.status)}]{job.status}[/]{steps}"


def pairs(values: Optional[list[str]], option: str) -> dict[str, str]:
    """["K=V", …] → {"K": "V"}; BadParameter naming `option` otherwise."""
    result: dict[str, str] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint=option)
        result[key] = value
    return result
