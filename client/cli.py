"""The `lorapool` command line (typer + rich).

Client commands (`submit`, `jobs`, `logs`, `download`, `nodes`, `models list`) talk to a server
through `lorapool.Client`; the server URL and token come from --base-url/--api-key or
LORAPOOL_BASE_URL/LORAPOOL_API_KEY (the token never has to be typed on a command line).
Server-side commands (`serve`, `token`, `models add`, `demo`, `donate`) import
`lorapool.service` lazily and say how to install it when it is missing. Every error prints as
one red line and exits with status 1.
"""

from __future__ import annotations

import functools
import importlib
import json
import socket
from pathlib import Path
from typing import Annotated, Any, Callable, NoReturn, Optional, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import Client
from .errors import LorapoolError
from .types import TERMINAL_STATUSES, FineTuningJob, JobEvent

F = TypeVar("F", bound=Callable[..., Any])

SERVICE_HINT = "the lorapool server is not installed here: pip install 'lorapool[service]'"

app = typer.Typer(name="lorapool", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False,
                  help="Fine-tune LLMs with QLoRA on a pool of office GPUs.")
token_app = typer.Typer(no_args_is_help=True, help="API tokens (server side).")
models_app = typer.Typer(no_args_is_help=True, help="Base models.")
jobs_app = typer.Typer(no_args_is_help=True, help="Fine-tuning jobs.")
app.add_typer(token_app, name="token")
app.add_typer(models_app, name="models")
app.add_typer(jobs_app, name="jobs")


def _out() -> Console:
    return Console(soft_wrap=True, highlight=False)


def _err() -> Console:
    return Console(stderr=True, soft_wrap=True, highlight=False)


class ServiceMissing(Exception):
    pass


def _fail(message: str) -> NoReturn:
    # One red line; details the server listed (e.g. every bad line of a data file) follow it.
    first, *rest = message.splitlines() or [""]
    err = _err()
    err.print(f"[bold red]Error:[/] [red]{escape(first)}[/]")
    for line in rest:
        err.print(f"  {escape(line)}")
    raise typer.Exit(1)


def friendly(fn: F) -> F:
    """Print expected failures as one red line (exit 1) instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ServiceMissing as exc:
            _fail(str(exc))
        except LorapoolError as exc:
            _fail(str(exc))
        except (FileExistsError, FileNotFoundError, PermissionError) as exc:
            _fail(str(exc))

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


def _server_errors(fn: Callable[[], Any]) -> Any:
    # The admin functions refuse bad input with ValueError (AdminError, pydantic's errors).
    try:
        return fn()
    except ValueError as exc:
        _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


# -- shared options --------------------------------------------------------------------------

DataDir = Annotated[Optional[Path], typer.Option(
    "--data-dir", help="Server data directory: SQLite file, artifacts (default ~/.lorapool or "
    "LORAPOOL_DATA_DIR).", show_default=False)]
DatabaseUrl = Annotated[Optional[str], typer.Option(
    "--database-url", help="Any SQLAlchemy URL (default sqlite:///DATA_DIR/lorapool.db).")]


def _settings(data_dir: Optional[Path] = None, database_url: Optional[str] = None,
              **more: Any) -> Any:
    Settings = service("config", "Settings")
    return _server_errors(lambda: Settings.from_env(data_dir=data_dir,
                                                    database_url=database_url, **more))


class State:
    def __init__(self, base_url: Optional[str], api_key: Optional[str]) -> None:
        self.base_url = base_url
        self.api_key = api_key

    def client(self) -> Client:
        return Client(self.base_url, self.api_key)


def _client(ctx: typer.Context) -> Client:
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
    ctx.obj = State(base_url, api_key)


# -- server side -----------------------------------------------------------------------------


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
    settings = _settings(data_dir, database_url, host=host, port=port, ray_address=ray_address)
    service("server", "serve")(settings)


@token_app.command("create")
@friendly
def token_create(
    tenant: Annotated[str, typer.Option(help="Tenant (team) the token acts for.")],
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Create an API token for TENANT and print it (only its hash is stored)."""
    settings = _settings(data_dir, database_url)
    create_token = service("admin", "create_token")
    token = _server_errors(lambda: create_token(settings, tenant))
    # Plain print: `export LORAPOOL_API_KEY=$(lorapool token create --tenant x)` must work.
    print(token)


@models_app.command("add")
@friendly
def models_add(
    name: Annotated[str, typer.Argument(help="Name jobs will use.")],
    path: Annotated[Path, typer.Argument(help="An HF model folder or a .gguf file.")],
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Register a base model on the server (server side)."""
    settings = _settings(data_dir, database_url)
    add_model = service("admin", "add_model")
    entry = _server_errors(lambda: add_model(settings, name, path))
    _out().print(f"Added [bold]{escape(entry.name)}[/] ({entry.format}, sha256 "
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
) -> None:
    """The base models jobs can use."""
    if local or data_dir is not None or database_url is not None:
        settings = _settings(data_dir, database_url)
        entries = _server_errors(lambda: service("admin", "list_models")(settings))
        table = Table("name", "format", "sha256", "path")
        for e in entries:
            table.add_row(e.name, str(e.format), str(e.sha256)[:12], str(e.path))
    else:
        with _client(ctx) as client:
            models = client.models.list()
        table = Table("id", "owned by")
        for m in models:
            table.add_row(m.id, m.owned_by)
    _out().print(table)


@app.command()
@friendly
def demo(data_dir: Annotated[Optional[Path], typer.Option(
        help="Keep the demo's server data here (default: a temporary folder).")] = None
         ) -> None:
    """Fine-tune SmolLM2-135M on a small bundled data set, end to end on this machine."""
    run_demo = service("demo", "run_demo")
    run_demo(data_dir, _out())


def _pairs(values: Optional[list[str]], option: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint=option)
        out[key] = value
    return out


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
          "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4,
          "tb": 1000**4, "tib": 1024**4}


def _size(value: Optional[str], option: str) -> Optional[int]:
    """"10GiB", "8 GB", "512MiB" or plain bytes → bytes."""
    if value is None:
        return None
    import re

    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", value)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise typer.BadParameter(f"expected a size like 10GiB or 8GB, got {value!r}",
                                 param_hint=option)
    return int(float(m.group(1)) * _UNITS[unit])


def _grants(values: Optional[list[str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in values or []:
        name, sep, tenant = item.partition("=")
        if not sep or not name or not tenant:
            raise typer.BadParameter(f"expected NAME=TENANT, got {item!r}",
                                     param_hint="--dataset-tenant")
        out.setdefault(name, []).append(tenant)
    return out


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
        help="Take the GPU back when other processes keep it above this % busy …")] = None,
    busy_minutes: Annotated[float, typer.Option(
        help="… for this many minutes.")] = 1.0,
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
    config = _server_errors(lambda: AgentConfig(
        name=name or socket.gethostname() or "node",
        work_dir=str(work_dir.expanduser()),
        memory_cap=_size(memory_cap, "--memory-cap"),
        cpu_only=cpu_only,
        cpu_memory=_size(memory, "--memory"),
        cpu_threads=cpu_threads,
        labels=_pairs(label, "--label"),
        datasets=_pairs(dataset, "--dataset"),
        dataset_tenants=_grants(dataset_tenant),
        policy=DonationPolicy(schedule=schedule, only_when_unused=only_when_unused,
                              max_other_utilization=max_other_utilization,
                              busy_minutes=busy_minutes),
    ))
    run(address, config, token_file=token_file, gpus=gpus, node_ip=node_ip, console=_out())


# -- client side -----------------------------------------------------------------------------


def _load_config(path: Path) -> dict[str, Any]:
    """The mapping in a YAML spec file, its keys checked against submit()'s arguments."""
    import yaml

    from ._plans import SubmitParams

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        _fail(f"cannot read {path}: {exc.strerror}")
    except yaml.YAMLError as exc:
        _fail(f"{path} is not valid YAML: {str(exc).splitlines()[0]}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        _fail(f"{path} must hold a mapping of submit() arguments")
    unknown = sorted(str(k) for k in data if k not in SubmitParams.model_fields)
    if unknown:
        _fail(f"{path}: unknown key(s) {', '.join(unknown)}; known: "
              f"{', '.join(SubmitParams.model_fields)}")
    # Data paths in a spec file are relative to the spec file, not to where it is run from.
    for key in ("training_file", "validation_file"):
        value = data.get(key)
        if isinstance(value, str) and not value.startswith("file-"):
            candidate = Path(value).expanduser()
            if not candidate.is_absolute():
                data[key] = str(path.parent / candidate)
    return data


def _status_style(status: str) -> str:
    return {"succeeded": "green", "failed": "red", "cancelled": "yellow",
            "running": "cyan"}.get(status, "white")


def _job_line(job: FineTuningJob) -> str:
    steps = f" step {job.step}/{job.total_steps}" if job.total_steps else ""
    return f"{job.id} [{_status_style(job.status)}]{job.status}[/]{steps}"


@app.command()
@friendly
def submit(
    ctx: typer.Context,
    model: Annotated[Optional[str], typer.Argument(help="Base model name.")] = None,
    training_file: Annotated[Optional[str], typer.Argument(
        help="Local .jsonl (uploaded) or a file-… id.")] = None,
    config: Annotated[Optional[Path], typer.Option(
        "--config", "-c", help="YAML spec whose keys are submit()'s arguments; flags win.")
    ] = None,
    validation_file: Annotated[Optional[str], typer.Option()] = None,
    dataset: Annotated[Optional[str], typer.Option(
        help="A node-local data set NODE:NAME instead of TRAINING_FILE (stays on its node).")
    ] = None,
    n_epochs: Annotated[Optional[int], typer.Option()] = None,
    batch_size: Annotated[Optional[int], typer.Option()] = None,
    learning_rate: Annotated[Optional[float], typer.Option()] = None,
    lora_r: Annotated[Optional[int], typer.Option(help="LoRA rank.")] = None,
    lora_alpha: Annotated[Optional[float], typer.Option()] = None,
    lora_dropout: Annotated[Optional[float], typer.Option()] = None,
    target_modules: Annotated[Optional[str], typer.Option(
        help='"all-linear" or a comma list, e.g. q_proj,v_proj.')] = None,
    use_rslora: Annotated[Optional[bool], typer.Option("--use-rslora/--no-rslora")] = None,
    use_dora: Annotated[Optional[bool], typer.Option("--use-dora/--no-dora")] = None,
    quantization: Annotated[Optional[str], typer.Option(help="nf4, fp4, int8 or none.")] = None,
    max_seq_len: Annotated[Optional[int], typer.Option()] = None,
    micro_batch_size: Annotated[Optional[int], typer.Option()] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option()] = None,
    suffix: Annotated[Optional[str], typer.Option()] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    metadata: Annotated[Optional[list[str]], typer.Option(help="KEY=VALUE, repeatable.")] = None,
    idempotency_key: Annotated[Optional[str], typer.Option()] = None,
    workers: Annotated[Optional[int], typer.Option(
        help="Train data-parallel on this many GPUs (placement.workers).")] = None,
    min_workers: Annotated[Optional[int], typer.Option(
        help="Go on with this many when donors leave (placement.min_workers).")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow with a progress bar.")] = False,
    poll_interval: Annotated[float, typer.Option(help="Seconds between polls with --wait.")
                             ] = 2.0,
) -> None:
    """Submit a fine-tuning job (prints its id). A local data file is uploaded first."""
    args: dict[str, Any] = _load_config(config) if config else {}
    flags = {"model": model, "training_file": training_file, "validation_file": validation_file,
             "dataset": dataset,
             "n_epochs": n_epochs, "batch_size": batch_size, "learning_rate": learning_rate,
             "quantization": quantization, "max_seq_len": max_seq_len,
             "micro_batch_size": micro_batch_size, "checkpoint_every": checkpoint_every,
             "suffix": suffix, "seed": seed, "idempotency_key": idempotency_key}
    args.update({k: v for k, v in flags.items() if v is not None})
    if metadata:
        args["metadata"] = {**(args.get("metadata") or {}), **_pairs(metadata, "--metadata")}
    lora_flags = {"r": lora_r, "alpha": lora_alpha, "dropout": lora_dropout,
                  "use_rslora": use_rslora, "use_dora": use_dora}
    if target_modules is not None:
        lora_flags["target_modules"] = (target_modules if target_modules == "all-linear"
                                        else [m.strip() for m in target_modules.split(",")
                                              if m.strip()])
    lora_flags = {k: v for k, v in lora_flags.items() if v is not None}
    if lora_flags:
        base = args.get("lora") or {}
        if not isinstance(base, dict):
            _fail("'lora' in the config must be a mapping")
        args["lora"] = {**base, **lora_flags}
    placement_flags = {k: v for k, v in (("workers", workers), ("min_workers", min_workers))
                       if v is not None}
    if placement_flags:
        base = args.get("placement") or {}
        if not isinstance(base, dict):
            _fail("'placement' in the config must be a mapping")
        args["placement"] = {**base, **placement_flags}
    for key in ("model", "training_file"):
        if not args.get(key) and not (key == "training_file" and args.get("dataset")):
            raise typer.BadParameter(f"give {key.upper()} as an argument or in --config"
                                     + (" (or --dataset NODE:NAME)" if key != "model" else ""),
                                     param_hint=key.upper())
    with _client(ctx) as client:
        job = client.submit(**args)
        _err().print(f"Submitted {_job_line(job)} ({escape(job.model)})")
        print(job.id)
        if not wait:
            return
        job = client.jobs.wait(job.id, progress=True, poll_interval=poll_interval)
    _report_final(job)


def _report_final(job: FineTuningJob) -> None:
    err = _err()
    if job.status == "succeeded":
        err.print(f"[green]Succeeded[/]: adapter [bold]{escape(str(job.fine_tuned_model))}[/]")
        return
    reason = f": {job.error.message}" if job.error else ""
    err.print(f"[bold red]Job {job.status}[/]{escape(reason)}")
    raise typer.Exit(1)


@jobs_app.command("list")
@friendly
def jobs_list(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(help="How many (newest first).")] = 20,
    after: Annotated[Optional[str], typer.Option(help="Start after this job id.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Your jobs, newest first."""
    with _client(ctx) as client:
        page = client.jobs.list(limit=limit, after=after)
    if as_json:
        print(page.model_dump_json(indent=2))
        return
    table = Table("id", "model", "status", "step", "adapter", "node")
    table.columns[0].no_wrap = True  # ids are for copying: never cut them
    table.columns[2].no_wrap = True
    table.columns[4].overflow = "fold"
    for j in page.data:
        step = f"{j.step or 0}/{j.total_steps}" if j.total_steps else ""
        table.add_row(j.id, j.model, f"[{_status_style(j.status)}]{j.status}[/]", step,
                      j.fine_tuned_model or "", j.node_id or "")
    _out().print(table)
    if page.has_more:
        _err().print(f"more: --after {page.last_id}")


@jobs_app.command("get")
@friendly
def jobs_get(ctx: typer.Context, job_id: str) -> None:
    """One job, as JSON."""
    with _client(ctx) as client:
        job = client.jobs.get(job_id)
    print(job.model_dump_json(indent=2))


@jobs_app.command("cancel")
@friendly
def jobs_cancel(ctx: typer.Context, job_id: str) -> None:
    """Cancel a job (a running one keeps its last checkpoint)."""
    with _client(ctx) as client:
        job = client.jobs.cancel(job_id)
    _out().print(_job_line(job))


@jobs_app.command("wait")
@friendly
def jobs_wait(
    ctx: typer.Context, job_id: str,
    poll_interval: Annotated[float, typer.Option()] = 2.0,
    timeout: Annotated[Optional[float], typer.Option(help="Give up after this many s.")] = None,
) -> None:
    """Wait for a job with a progress bar; exit 1 unless it succeeds."""
    with _client(ctx) as client:
        job = client.jobs.wait(job_id, progress=True, poll_interval=poll_interval,
                               timeout=timeout)
    _report_final(job)


def _event_line(e: JobEvent) -> str:
    import datetime as dt

    when = dt.datetime.fromtimestamp(e.created_at).strftime("%H:%M:%S")
    color = {"warn": "yellow", "error": "red"}.get(e.level, "dim")
    text = escape(e.message)
    if e.type == "metrics" and e.data:
        text += " [dim]" + escape(" ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in e.data.items()))
        text += "[/]"
    return f"[{color}]{when} {e.level:<5}[/] {text}"


@app.command()
@friendly
def logs(
    ctx: typer.Context,
    job_id: str,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep following until the job "
                                         "ends.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON event per line.")] = False,
) -> None:
    """A job's events, oldest first."""
    out = _out()
    with _client(ctx) as client:
        for event in client.jobs.events(job_id, follow=follow):
            if as_json:
                print(event.model_dump_json(), flush=True)
            else:
                out.print(_event_line(event))
        if follow:
            job = client.jobs.get(job_id)
            if job.status in TERMINAL_STATUSES:
                _err().print(f"job {_job_line(job)}")


@app.command()
@friendly
def download(
    ctx: typer.Context,
    adapter_id: str,
    dest: Path,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty DEST.")] = False,
) -> None:
    """Download an adapter (a PEFT folder) into DEST."""
    with _client(ctx) as client:
        path = client.adapters.download(adapter_id, dest, overwrite=overwrite)
    _err().print(f"Adapter {escape(adapter_id)} →")
    print(path)


def _gib(n: int) -> str:
    return f"{n / 1024**3:.1f}"


@app.command()
@friendly
def nodes(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The machines in the pool and their free GPU memory."""
    with _client(ctx) as client:
        items = client.nodes.list()
    if as_json:
        print(json.dumps([n.model_dump(mode="json") for n in items], indent=2))
        return
    table = Table("name", "gpu", "free GiB", "total GiB", "state", "jobs", "data sets")
    for n in items:
        sets = ", ".join(f"{d.name} ({d.examples} ex.)" if d.valid else f"{d.name} (invalid)"
                         for d in n.datasets)
        table.add_row(n.name, n.gpu_name or "cpu", _gib(n.free_memory_bytes),
                      _gib(n.total_memory_bytes), n.state, ", ".join(n.jobs), sets)
    _out().print(table)


def _participant(spec: str) -> dict[str, Any]:
    """[NAME=]REF: REF is a local file or "file-…" id (training_file) or NODE:DATASET."""
    name, sep, ref = spec.partition("=")
    if not sep:
        name, ref = "", spec
    if not ref:
        raise typer.BadParameter(f"expected [NAME=]NODE:DATASET or [NAME=]FILE, got {spec!r}",
                                 param_hint="--participant")
    entry: dict[str, Any] = {"name": name} if name else {}
    if ref.startswith("file-") or Path(ref).expanduser().is_file() or ":" not in ref:
        entry["training_file"] = ref
    else:
        entry["dataset"] = ref
    return entry


@app.command()
@friendly
def federate(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Base model name.")],
    participant: Annotated[list[str], typer.Option(
        help="[NAME=]NODE:DATASET (node-local data) or [NAME=]FILE; repeatable.")],
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = 3,
    local_steps: Annotated[Optional[int], typer.Option(help="Optimizer steps per round.")
                           ] = None,
    local_epochs: Annotated[Optional[int], typer.Option(help="Epochs per round.")] = None,
    method: Annotated[str, typer.Option(help="Aggregation (any merge method).")] = "exact",
    density: Annotated[Optional[float], typer.Option(help="For ties/dare/magnitude_prune.")
                       ] = None,
    weight: Annotated[Optional[list[str]], typer.Option(help="NAME=WEIGHT, repeatable.")
                      ] = None,
    min_quorum: Annotated[Optional[int], typer.Option(help="Adapters a round needs.")] = None,
    round_deadline: Annotated[Optional[float], typer.Option(help="Seconds per round.")] = None,
    batch_size: Annotated[Optional[int], typer.Option()] = None,
    micro_batch_size: Annotated[Optional[int], typer.Option()] = None,
    learning_rate: Annotated[Optional[float], typer.Option()] = None,
    lora_r: Annotated[Optional[int], typer.Option(help="LoRA rank.")] = None,
    lora_alpha: Annotated[Optional[float], typer.Option()] = None,
    max_seq_len: Annotated[Optional[int], typer.Option()] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait and print each round.")] = False,
) -> None:
    """Train one adapter in federated rounds; data stays where it is (prints the id)."""
    parts = [_participant(p) for p in participant]
    weights = {k: float(v) for k, v in _pairs(weight, "--weight").items()}
    for p in parts:
        if weights:
            if p.get("name") not in weights:
                raise typer.BadParameter("with --weight, name every participant (NAME=REF) and "
                                         "give each a weight", param_hint="--weight")
            p["weight"] = weights[p["name"]]
    lora = {k: v for k, v in (("r", lora_r), ("alpha", lora_alpha)) if v is not None}
    with _client(ctx) as client:
        fed = client.federate(
            model, parts, rounds=rounds, local_steps=local_steps, local_epochs=local_epochs,
            method=method, params={"density": density} if density is not None else None,
            min_quorum=min_quorum, round_deadline_s=round_deadline, batch_size=batch_size,
            micro_batch_size=micro_batch_size, learning_rate=learning_rate,
            lora=lora or None, max_seq_len=max_seq_len)
        _err().print(f"Federation {fed.id}: {len(fed.participants)} participants, "
                     f"{fed.rounds_total} rounds, {fed.method}")
        print(fed.id)
        if wait:
            fed = client.federations.wait(fed.id)
            for r in fed.rounds:
                m = r.metrics
                _err().print(f"round {r.round}: {r.status}; took part: {', '.join(r.took_part)}"
                             + (f"; dropped: {r.dropped}" if r.dropped else "")
                             + (f"; train loss {m['train_loss']:.4f}"
                                if m.get("train_loss") is not None else "")
                             + f"; adapter {r.global_adapter}")
            if fed.status != "succeeded":
                _fail(f"federation {fed.status}: {fed.error.message if fed.error else ''}")


# Commands kept in their own modules register themselves on `app` when imported.
from . import cli_merges  # noqa: E402,F401


def main() -> None:
    app()


if __name__ == "__main__":
    main()
