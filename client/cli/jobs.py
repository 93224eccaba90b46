"""Job commands: `submit`, `jobs list|get|cancel|wait`, `logs`, `download`, `nodes`,
`federate`. `submit`'s options come from `SubmitParams` (described there once)."""

from __future__ import annotations

import datetime as dt
import inspect
import json
import typing
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import typer.core
from rich.markup import escape

from .._plans import SubmitParams
from ..types import TERMINAL_STATUSES, FineTuningJob, JobEvent
from ._app import (
    JsonOption,
    app,
    client,
    err,
    fail,
    friendly,
    job_line,
    jobs_app,
    out,
    pairs,
    status_style,
    table,
)

# -- submit ----------------------------------------------------------------------------------


def _load_config(path: Path) -> dict[str, Any]:
    """The mapping in a YAML spec file, its keys checked against submit()'s arguments."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror}")
    except yaml.YAMLError as exc:
        fail(f"{path} is not valid YAML: {str(exc).splitlines()[0]}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        fail(f"{path} must hold a mapping of submit() arguments")
    unknown = sorted(str(k) for k in data if k not in SubmitParams.model_fields)
    if unknown:
        fail(f"{path}: unknown key(s) {', '.join(unknown)}; known: "
             f"{', '.join(SubmitParams.model_fields)}")
    # Data paths in a spec file are relative to the spec file, not to where it is run from.
    for key in ("training_file", "validation_file"):
        value = data.get(key)
        if isinstance(value, str) and not value.startswith("file-"):
            candidate = Path(value).expanduser()
            if not candidate.is_absolute():
                data[key] = str(path.parent / candidate)
    return data


# SubmitParams fields that become plain `--name VALUE` options (the structured ones — lora,
# metadata, placement, extra_body — have flags of their own below or come from --config).
FLAT_FIELDS = ("validation_file", "dataset", "n_epochs", "batch_size", "learning_rate",
               "quantization", "max_seq_len", "micro_batch_size", "checkpoint_every", "suffix",
               "seed", "idempotency_key")


def _cli_type(annotation: Any) -> type:
    """int or float where the field is only that; str otherwise ("auto"|int, paths, enums:
    pydantic converts the text)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if annotation in (int, float) or (len(args) == 1 and args[0] in (int, float)):
        return args[0] if args else annotation
    return str


def _field_option(name: str) -> inspect.Parameter:
    info = SubmitParams.model_fields[name]
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    shown = extra.get("cli_default")
    option = typer.Option(help=info.description,
                          show_default=str(shown) if shown is not None else False)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[Optional[_cli_type(info.annotation)], option])


def _submit_command(fn: Any) -> Any:
    """Give `fn(ctx, model, training_file, **fields)` one option per FLAT_FIELDS entry, from
    `SubmitParams` (typer reads `__signature__`)."""
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn, include_extras=True)
    fixed = [p.replace(annotation=hints[p.name]) for p in sig.parameters.values()
             if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params = fixed + [_field_option(n) for n in FLAT_FIELDS]
    fn.__signature__ = sig.replace(parameters=params)
    fn.__annotations__ = {**hints, **{p.name: p.annotation for p in params}}
    return fn


class SubmitCommand(typer.core.TyperCommand):
    """MODEL and TRAINING_FILE are required, except that --config (or --dataset) may give them,
    so click parses them as optional; the usage line shows them as what they are for almost
    every call: required."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return [p.strip("[]") if p in ("[MODEL]", "[TRAINING_FILE]") else p
                for p in super().collect_usage_pieces(ctx)]


_MODEL_HELP = SubmitParams.model_fields["model"].description
_FILE_HELP = SubmitParams.model_fields["training_file"].description


@app.command(cls=SubmitCommand)
@_submit_command
@friendly
def submit(
    ctx: typer.Context,
    model: Annotated[Optional[str], typer.Argument(
        metavar="MODEL", show_default=False,
        help=f"{_MODEL_HELP} Required (or `model:` in --config).")] = None,
    training_file: Annotated[Optional[str], typer.Argument(
        metavar="TRAINING_FILE", show_default=False,
        help=f"{_FILE_HELP} Required unless --dataset or --config gives one.")] = None,
    config: Annotated[Optional[Path], typer.Option(
        "--config", "-c", help="YAML spec whose keys are submit()'s arguments; flags win.")
    ] = None,
    lora_r: Annotated[Optional[int], typer.Option(help="LoRA rank.", show_default="16")
                      ] = None,
    lora_alpha: Annotated[Optional[float], typer.Option(
        help="LoRA scaling numerator (alpha / r).", show_default="32")] = None,
    lora_dropout: Annotated[Optional[float], typer.Option(
        help="Dropout on the LoRA input (0 keeps the fastest path).", show_default="0")] = None,
    target_modules: Annotated[Optional[str], typer.Option(
        help='"all-linear" or a comma list, e.g. q_proj,v_proj.', show_default="all-linear")
    ] = None,
    use_rslora: Annotated[Optional[bool], typer.Option(
        "--use-rslora/--no-rslora", help="Rank-stabilised scaling (alpha / sqrt(r)).",
        show_default=False)] = None,
    use_dora: Annotated[Optional[bool], typer.Option(
        "--use-dora/--no-dora", help="Weight-decomposed LoRA.", show_default=False)] = None,
    metadata: Annotated[Optional[list[str]], typer.Option(help="KEY=VALUE, repeatable.")
                        ] = None,
    workers: Annotated[Optional[int], typer.Option(
        help="Train data-parallel on this many GPUs (placement.workers).", show_default="1")
    ] = None,
    min_workers: Annotated[Optional[int], typer.Option(
        help="Go on with this many when donors leave (placement.min_workers).",
        show_default="workers")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow with a progress bar.")] = False,
    poll_interval: Annotated[float, typer.Option(help="Seconds between polls with --wait.")
                             ] = 2.0,
    **fields: Any,
) -> None:
    """Submit a fine-tuning job (prints its id). A local data file is uploaded first; a
    refused job leaves no upload behind."""
    args: dict[str, Any] = _load_config(config) if config else {}
    flags = {"model": model, "training_file": training_file, **fields}
    args.update({k: v for k, v in flags.items() if v is not None})
    if metadata:
        args["metadata"] = {**(args.get("metadata") or {}), **pairs(metadata, "--metadata")}
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
            fail("'lora' in the config must be a mapping")
        args["lora"] = {**base, **lora_flags}
    placement_flags = {k: v for k, v in (("workers", workers), ("min_workers", min_workers))
                       if v is not None}
    if placement_flags:
        base = args.get("placement") or {}
        if not isinstance(base, dict):
            fail("'placement' in the config must be a mapping")
        args["placement"] = {**base, **placement_flags}
    for key in ("model", "training_file"):
        if not args.get(key) and not (key == "training_file" and args.get("dataset")):
            raise typer.BadParameter(f"give {key.upper()} as an argument or in --config"
                                     + (" (or --dataset NODE:NAME)" if key != "model" else ""),
                                     param_hint=key.upper())
    with client(ctx) as c:
        job = c.submit(**args)
        err().print(f"Submitted {job_line(job)} ({escape(job.model)})")
        print(job.id)
        if not wait:
            return
        job = c.jobs.wait(job.id, progress=True, poll_interval=poll_interval)
    report_final(job)


def report_final(job: FineTuningJob) -> None:
    if job.status == "succeeded":
        err().print(f"[green]Succeeded[/]: adapter [bold]{escape(str(job.fine_tuned_model))}[/]")
        return
    reason = f": {job.error.message}" if job.error else ""
    err().print(f"[bold red]Job {job.status}[/]{escape(reason)}")
    raise typer.Exit(1)


# -- jobs ------------------------------------------------------------------------------------


@jobs_app.command("list")
@friendly
def jobs_list(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(help="How many (newest first).")] = 20,
    after: Annotated[Optional[str], typer.Option(help="Start after this job id.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Your jobs, newest first."""
    with client(ctx) as c:
        page = c.jobs.list(limit=limit, after=after)
    if as_json:
        print(page.model_dump_json(indent=2))
        return
    rows = []
    for j in page.data:
        step = f"{j.step or 0}/{j.total_steps}" if j.total_steps else ""
        rows.append((j.id, j.model, f"[{status_style(j.status)}]{j.status}[/]", step,
                     j.fine_tuned_model or "", j.node_id or ""))
    table(["id", "model", "status", "step", "adapter", "node"], rows, ids=["id", "adapter"])
    if page.has_more:
        err().print(f"more: --after {page.last_id}")


@jobs_app.command("get")
@friendly
def jobs_get(ctx: typer.Context, job_id: str) -> None:
    """One job, as JSON."""
    with client(ctx) as c:
        job = c.jobs.get(job_id)
    print(job.model_dump_json(indent=2))


@jobs_app.command("cancel")
@friendly
def jobs_cancel(ctx: typer.Context, job_id: str) -> None:
    """Cancel a job (a running one keeps its last checkpoint)."""
    with client(ctx) as c:
        job = c.jobs.cancel(job_id)
    out().print(job_line(job))


@jobs_app.command("wait")
@friendly
def jobs_wait(
    ctx: typer.Context, job_id: str,
    poll_interval: Annotated[float, typer.Option(help="Seconds between polls.")] = 2.0,
    timeout: Annotated[Optional[float], typer.Option(help="Give up after this many s.")] = None,
) -> None:
    """Wait for a job with a progress bar; exit 1 unless it succeeds."""
    with client(ctx) as c:
        job = c.jobs.wait(job_id, progress=True, poll_interval=poll_interval, timeout=timeout)
    report_final(job)


# -- logs ------------------------------------------------------------------------------------

# Metric keys the event message already states ("Step 3/8: training loss=0.6859").
_IN_MESSAGE = {"step", "total_steps", "loss", "train_loss", "valid_loss"}
_LABELS = {"lr": "lr", "grad_norm": "grad_norm", "tokens_per_s": "tok/s"}


def _value(key: str, v: Any) -> str:
    if key.startswith("memory_") and isinstance(v, (int, float)):
        return f"{v / 1024**3:.2f}GiB"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def event_line(e: JobEvent) -> str:
    """One clean line per event: time, level, message, then only the metrics the message
    does not already say (no empty fields, floats to 4 significant digits)."""
    when = dt.datetime.fromtimestamp(e.created_at).strftime("%H:%M:%S")
    color = {"warn": "yellow", "error": "red"}.get(e.level, "dim")
    text = escape(e.message)
    if e.type == "metrics" and e.data:
        stated = _IN_MESSAGE if e.message.startswith("Step ") else set()
        extra = [f"{_LABELS.get(k, k)}={_value(k, v)}" for k, v in e.data.items()
                 if v is not None and v != "" and k not in stated
                 and f"{k}=" not in e.message
                 and not (k == "train_loss" and "loss" in e.data and "loss=" in e.message)]
        if extra:
            text += " [dim]" + escape(" ".join(extra)) + "[/]"
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
    console = out()
    with client(ctx) as c:
        for event in c.jobs.events(job_id, follow=follow):
            if as_json:
                print(event.model_dump_json(), flush=True)
            else:
                console.print(event_line(event))
        if follow:
            job = c.jobs.get(job_id)
            if job.status in TERMINAL_STATUSES:
                err().print(f"job {job_line(job)}")


# -- adapters and nodes ----------------------------------------------------------------------


@app.command()
@friendly
def download(
    ctx: typer.Context,
    adapter_id: str,
    dest: Path,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty DEST.")] = False,
) -> None:
    """Download an adapter (a PEFT folder) into DEST; prints the folder."""
    with client(ctx) as c:
        path = c.adapters.download(adapter_id, dest, overwrite=overwrite)
    # One line on stdout, the folder: `cd $(lorapool download ad-… ./a)` works.
    print(path)


def _gib(n: int) -> str:
    return f"{n / 1024**3:.1f}"


@app.command()
@friendly
def nodes(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """The machines in the pool and their free GPU memory."""
    with client(ctx) as c:
        items = c.nodes.list()
    if as_json:
        print(json.dumps([n.model_dump(mode="json") for n in items], indent=2))
        return
    rows = []
    for n in items:
        sets = ", ".join(f"{d.name} ({d.examples} ex.)" if d.valid else f"{d.name} (invalid)"
                         for d in n.datasets)
        rows.append((n.name, n.gpu_name or "cpu", _gib(n.free_memory_bytes),
                     _gib(n.total_memory_bytes), n.state, ", ".join(n.jobs), sets))
    table(["name", "gpu", "free GiB", "total GiB", "state", "jobs", "data sets"], rows,
          ids=["name"])


# -- federations -----------------------------------------------------------------------------


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
    batch_size: Annotated[Optional[int], typer.Option(help="Examples per optimizer step.")
                          ] = None,
    micro_batch_size: Annotated[Optional[int], typer.Option(
        help="Examples per forward pass.")] = None,
    learning_rate: Annotated[Optional[float], typer.Option(help="Peak learning rate.")] = None,
    lora_r: Annotated[Optional[int], typer.Option(help="LoRA rank.")] = None,
    lora_alpha: Annotated[Optional[float], typer.Option(help="LoRA alpha.")] = None,
    max_seq_len: Annotated[Optional[int], typer.Option(help="Longest example in tokens.")
                           ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait and print each round.")] = False,
) -> None:
    """Train one adapter in federated rounds; data stays where it is (prints the id)."""
    parts = [_participant(p) for p in participant]
    weights = {k: float(v) for k, v in pairs(weight, "--weight").items()}
    for p in parts:
        if weights:
            if p.get("name") not in weights:
                raise typer.BadParameter("with --weight, name every participant (NAME=REF) and "
                                         "give each a weight", param_hint="--weight")
            p["weight"] = weights[p["name"]]
    lora = {k: v for k, v in (("r", lora_r), ("alpha", lora_alpha)) if v is not None}
    with client(ctx) as c:
        fed = c.federate(
            model, parts, rounds=rounds, local_steps=local_steps, local_epochs=local_epochs,
            method=method, params={"density": density} if density is not None else None,
            min_quorum=min_quorum, round_deadline_s=round_deadline, batch_size=batch_size,
            micro_batch_size=micro_batch_size, learning_rate=learning_rate,
            lora=lora or None, max_seq_len=max_seq_len)
        err().print(f"Federation {fed.id}: {len(fed.participants)} participants, "
                    f"{fed.rounds_total} rounds, {fed.method}")
        print(fed.id)
        if wait:
            fed = c.federations.wait(fed.id)
            for r in fed.rounds:
                m = r.metrics
                err().print(f"round {r.round}: {r.status}; took part: {', '.join(r.took_part)}"
                            + (f"; dropped: {r.dropped}" if r.dropped else "")
                            + (f"; train loss {m['train_loss']:.4f}"
                               if m.get("train_loss") is not None else "")
                            + f"; adapter {r.global_adapter}")
            if fed.status != "succeeded":
                fail(f"federation {fed.status}: {fed.error.message if fed.error else ''}")
