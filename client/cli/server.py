"""Server-side commands: `serve`, `token create`, `models add|list`, `demo`, `donate`.

They import `lorapool.service` lazily (`service()`), printing how to install it when it is
missing; every one finds the data directory the same way (`_datadir.py`).
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

from ._app import (
    JsonOption,
    app,
    client,
    err,
    friendly,
    models_app,
    out,
    pairs,
    server_errors,
    service,
    table,
    token_app,
)
from ._datadir import config_path, remember_data_dir, resolve_data_dir

DataDir = Annotated[Optional[Path], typer.Option(
    "--data-dir", help="Server data directory: SQLite file, artifacts. Default: "
    "LORAPOOL_DATA_DIR, else the one `lorapool serve --data-dir` last used (kept in "
    "~/.config/lorapool/config.toml), else ~/.lorapool.", show_default=False)]
DatabaseUrl = Annotated[Optional[str], typer.Option(
    "--database-url", help="Any SQLAlchemy URL (default sqlite:///DATA_DIR/lorapool.db).")]


def settings(data_dir: Optional[Path] = None, database_url: Optional[str] = None,
             **more: Any) -> Any:
    """The server's Settings, the data dir found as `_datadir.resolve_data_dir` says."""
    Settings = service("config", "Settings")
    resolved = resolve_data_dir(data_dir)
    return server_errors(lambda: Settings.from_env(data_dir=resolved,
                                                   database_url=database_url, **more))


@app.command()
@friendly
def serve(
    host: Annotated[str, typer.Option(help="Address the API listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="API port.")] = 8000,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
    ray_address: Annotated[Optional[str], typer.Option(
        help="Ray cluster to join (default: start a local head on loopback).")] = None,
) -> None:
    """Run the lorapool server (API, scheduler, local Ray head) until Ctrl-C."""
    s = settings(data_dir, database_url, host=host, port=port, ray_address=ray_address)
    if data_dir is not None:
        # `token create` and friends, run later without --data-dir, find this server's data.
        try:
            where = remember_data_dir(s.data_dir)
            err().print(f"[dim]data dir {escape(str(s.data_dir))} (remembered in "
                        f"{escape(str(where))})[/]")
        except OSError as exc:
            err().print(f"[yellow]could not record the data dir in {config_path()}: "
                        f"{escape(str(exc))}[/]")
    service("server", "serve")(s)


@token_app.command("create")
@friendly
def token_create(
    tenant: Annotated[str, typer.Option(help="Tenant (team) the token acts for.")],
    admin: Annotated[bool, typer.Option(
        "--admin", help="An admin token: /metrics and the dashboard's admin views.")] = False,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Create an API token for TENANT and print it (only its hash is stored)."""
    s = settings(data_dir, database_url)
    create_token = service("admin", "create_token")
    extra = {"admin": True} if admin else {}
    token = server_errors(lambda: create_token(s, tenant, **extra))
    # Plain print: `export LORAPOOL_API_KEY=$(lorapool token create --tenant x)` must work.
    print(token)
    err().print(f"[dim]stored in the server data dir {escape(str(s.data_dir))}[/]")


@models_app.command("add")
@friendly
def models_add(
    name: Annotated[str, typer.Argument(help="Name jobs will use.")],
    path: Annotated[Path, typer.Argument(help="An HF model folder or a .gguf file.")],
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Register a base model on the server (server side)."""
    s = settings(data_dir, database_url)
    add_model = service("admin", "add_model")
    entry = server_errors(lambda: add_model(s, name, path))
    out().print(f"Added [bold]{escape(entry.name)}[/] ({entry.format}, sha256 "
                f"{str(entry.sha256)[:12]}…) from {escape(str(entry.path))}")


@models_app.command("list")
@friendly
def models_list(
    ctx: typer.Context,
    local: Annotated[bool, typer.Option(
        "--local", help="Read the server's registry directly (server side) instead of the "
        "API; implied by --data-dir/--database-url.")] = False,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
    as_json: JsonOption = False,
) -> None:
    """The base models jobs can use."""
    import json

    if local or data_dir is not None or database_url is not None:
        s = settings(data_dir, database_url)
        entries = server_errors(lambda: service("admin", "list_models")(s))
        if as_json:
            print(json.dumps([e.model_dump(mode="json") for e in entries], indent=2))
            return
        table(["name", "format", "sha256", "path"],
              [(e.name, str(e.format), str(e.sha256)[:12], str(e.path)) for e in entries],
              ids=["name"])
        return
    with client(ctx) as c:
        models = c.models.list()
    if as_json:
        print(json.dumps([m.model_dump(mode="json") for m in models], indent=2))
        return
    table(["id", "owned by"], [(m.id, m.owned_by) for m in models], ids=["id"])


@app.command()
@friendly
def demo(data_dir: Annotated[Optional[Path], typer.Option(
        help="Keep the demo's server data here (default: a temporary folder).")] = None
         ) -> None:
    """Fine-tune SmolLM2-135M on a small bundled data set, end to end on this machine."""
    run_demo = service("demo", "run_demo")
    run_demo(data_dir, out())


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
          "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4,
          "tb": 1000**4, "tib": 1024**4}


def size(value: Optional[str], option: str) -> Optional[int]:
    """"10GiB", "8 GB", "512MiB" or plain bytes → bytes."""
    if value is None:
        return None
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", value)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise typer.BadParameter(f"expected a size like 10GiB or 8GB, got {value!r}",
                                 param_hint=option)
    return int(float(m.group(1)) * _UNITS[unit])


def grants(values: Optional[list[str]]) -> dict[str, list[str]]:
    result: dict[str, list[str]] = {}
    for item in values or []:
        name, sep, tenant = item.partition("=")
        if not sep or not name or not tenant:
            raise typer.BadParameter(f"expected NAME=TENANT, got {item!r}",
                                     param_hint="--dataset-tenant")
        result.setdefault(name, []).append(tenant)
    return result


@app.command()
@friendly
def donate(
    address: Annotated[str, typer.Option(help="The head's Ray address (host:port).")],
    name: Annotated[Optional[str], typer.Option(
        help="Node name (default: this host's name).")] = None,
    work_dir: Annotated[Path, typer.Option(help="This node's own working folder.")] = Path(
        "~/.lorapool/node"),
    token_file: Annotated[Optional[str], typer.Option(
        help="File with the cluster's Ray auth token (or LORAPOOL_RAY_TOKEN_FILE).")] = None,
    gpus: Annotated[Optional[str], typer.Option(help="CUDA_VISIBLE_DEVICES to donate.")] = None,
    memory_cap: Annotated[Optional[str], typer.Option(
        help='Offer at most this much GPU memory, e.g. "10GiB" (the rest stays the owner\'s).')
    ] = None,
    cpu_only: Annotated[bool, typer.Option(help="Donate CPU only (no GPU).")] = False,
    memory: Annotated[Optional[str], typer.Option(
        help='With --cpu-only: how much system memory jobs may use, e.g. "8GiB".')] = None,
    cpu_threads: Annotated[Optional[int], typer.Option(
        help="CPU threads a job may use when it trains on the CPU.")] = None,
    schedule: Annotated[Optional[str], typer.Option(
        help='When the GPU may be used, e.g. "19:00-07:00,sat,sun".')] = None,
    only_when_unused: Annotated[bool, typer.Option(
        help="Take the GPU back whenever another process uses it.")] = False,
    max_other_utilization: Annotated[Optional[float], typer.Option(
        help="Take the GPU back when other processes keep it above this % busy for "
        "--busy-minutes.")] = None,
    busy_minutes: Annotated[float, typer.Option(
        help="Minutes of --max-other-utilization before the GPU is taken back.")] = 1.0,
    label: Annotated[Optional[list[str]], typer.Option(help="KEY=VALUE node label.")] = None,
    dataset: Annotated[Optional[list[str]], typer.Option(
        help="NAME=PATH node-local data set (never leaves this machine).")] = None,
    dataset_tenant: Annotated[Optional[list[str]], typer.Option(
        help="NAME=TENANT: let TENANT train on data set NAME (repeatable; a data set granted "
        "to no tenant is offered to none).")] = None,
    node_ip: Annotated[Optional[str], typer.Option(help="This node's IP for Ray.")] = None,
) -> None:
    """Join a lorapool cluster and lend this machine's GPU until Ctrl-C."""
    AgentConfig = service("pool.agent", "AgentConfig")
    DonationPolicy = service("pool.policy", "DonationPolicy")
    run = service("pool.donate", "donate")
    config = server_errors(lambda: AgentConfig(
        name=name or socket.gethostname() or "node",
        work_dir=str(work_dir.expanduser()),
        memory_cap=size(memory_cap, "--memory-cap"),
        cpu_only=cpu_only,
        cpu_memory=size(memory, "--memory"),
        cpu_threads=cpu_threads,
        labels=pairs(label, "--label"),
        datasets=pairs(dataset, "--dataset"),
        dataset_tenants=grants(dataset_tenant),
        policy=DonationPolicy(schedule=schedule, only_when_unused=only_when_unused,
                              max_other_utilization=max_other_utilization,
                              busy_minutes=busy_minutes),
    ))
    run(address, config, token_file=token_file, gpus=gpus, node_ip=node_ip, console=out())
