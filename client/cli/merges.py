"""CLI commands for merges, sharing and evaluations: `lorapool merge`, `lorapool merges …`,
`lorapool adapters share|unshare|list` and `lorapool eval`.

Same conventions as the rest of the CLI: the server URL and token come from the root options or the environment,
errors print as one red line and exit 1, `--json` prints the resource for scripts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from ..types import Evaluation, Merge
from ._app import JsonOption, adapters_app, app, friendly, merges_app, models_app, table
from ._app import client as _client
from ._app import err as _err
from ._app import fail as _fail
from ._app import out as _out


def _floats(text: Optional[str], option: str) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}",
                                 param_hint=option) from None


def _merge_line(m: Merge) -> str:
    style = {"succeeded": "green", "failed": "red", "running": "cyan"}.get(m.status, "white")
    return f"{m.id} [{style}]{m.status}[/] {m.method} of {len(m.adapters)}"


def _report_merge(m: Merge) -> None:
    err = _err()
    if m.status == "succeeded":
        extra = f", relative error {m.relative_error:.4g}" if m.relative_error is not None else ""
        err.print(f"[green]Merged[/] ({m.method}, rank {m.rank}{extra}): adapter "
                  f"[bold]{escape(str(m.result_adapter))}[/]")
        return
    if m.status == "failed":
        _fail(f"merge {m.id} failed: {m.error.message if m.error else 'unknown error'}")
    err.print(_merge_line(m))


@app.command()
@friendly
def merge(
    ctx: typer.Context,
    adapters: Annotated[list[str], typer.Argument(help="Adapter ids (yours or shared).")],
    method: Annotated[str, typer.Option(
        help="naive, exact, svd, ties, dare_linear, dare_ties, magnitude_prune, or *_svd.")
    ] = "exact",
    weights: Annotated[Optional[str], typer.Option(
        help="Comma list, one per adapter (default: training-sample counts).")] = None,
    no_normalize: Annotated[bool, typer.Option(
        "--no-normalize", help="Use the weights as given (task arithmetic's plain sum).")
    ] = False,
    density: Annotated[Optional[float], typer.Option(help="ties/dare/magnitude_prune.")] = None,
    majority_sign_method: Annotated[Optional[str], typer.Option(
        help="total or frequency (ties).")] = None,
    target_rank: Annotated[Optional[int], typer.Option(help="svd and *_svd.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="dare's random drops.")] = None,
    name: Annotated[Optional[str], typer.Option(help="A name for the merged adapter.")] = None,
    evaluate_on: Annotated[Optional[str], typer.Option(
        help="A file id or local JSONL: evaluate the result on it.")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait for the result.")] = True,
    timeout: Annotated[Optional[float], typer.Option(help="Give up waiting after s.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the merge as JSON.")] = False,
) -> None:
    """Merge adapters on the pool into a new adapter of yours (prints the merge)."""
    with _client(ctx) as client:
        m = client.merge(adapters, method, weights=_floats(weights, "--weights"),
                         normalize_weights=False if no_normalize else None, density=density,
                         majority_sign_method=majority_sign_method, target_rank=target_rank,
                         seed=seed, name=name, evaluate_on=evaluate_on, wait=wait,
                         timeout=timeout)
    if as_json:
        print(m.model_dump_json(indent=2))
    else:
        print(m.id)
    _report_merge(m)


@merges_app.command("list")
@friendly
def merges_list(ctx: typer.Context,
                limit: Annotated[int, typer.Option(help="How many (newest first).")] = 20,
                as_json: JsonOption = False) -> None:
    """Your merges, newest first."""
    with _client(ctx) as client:
        page = client.merges.list(limit=limit)
    if as_json:
        print(page.model_dump_json(indent=2))
        return
    table(["id", "status", "method", "inputs", "result"],
          [(m.id, m.status, m.method, ", ".join(m.adapters), m.result_adapter or "")
           for m in page.data], ids=["id", "result"])


@merges_app.command("get")
@friendly
def merges_get(ctx: typer.Context, merge_id: str) -> None:
    """One merge, as JSON."""
    with _client(ctx) as client:
        print(client.merges.get(merge_id).model_dump_json(indent=2))


@adapters_app.command("list")
@friendly
def adapters_list(ctx: typer.Context, shared: Annotated[bool, typer.Option(
        "--shared", help="Include adapters shared with you.")] = False,
        as_json: JsonOption = False) -> None:
    """Your adapters (newest first)."""
    import json

    with _client(ctx) as client:
        items = client.adapters.list(include_shared=shared)
    if as_json:
        print(json.dumps([a.model_dump(mode="json") for a in items], indent=2))
        return
    table(["id", "base model", "owner", "shared with", "from"],
          [(a.id, a.base_model, a.owner or "", ", ".join(a.shared_with),
            a.job_id or a.merge_id or "") for a in items], ids=["id"])


@adapters_app.command("share")
@friendly
def adapters_share(ctx: typer.Context, adapter_id: str, tenant: str) -> None:
    """Let TENANT get, download, merge and evaluate your adapter."""
    with _client(ctx) as client:
        a = client.adapters.share(adapter_id, tenant)
    _err().print(f"{escape(a.id)} shared with: {escape(', '.join(a.shared_with))}")


@adapters_app.command("unshare")
@friendly
def adapters_unshare(ctx: typer.Context, adapter_id: str, tenant: str) -> None:
    """Revoke TENANT's use of your adapter."""
    with _client(ctx) as client:
        a = client.adapters.unshare(adapter_id, tenant)
    _err().print(f"{escape(a.id)} shared with: {escape(', '.join(a.shared_with) or 'nobody')}")


def _report_eval(e: Evaluation) -> None:
    if e.status == "failed":
        _fail(f"evaluation {e.id} failed: {e.error.message if e.error else 'unknown error'}")
    what = f"{e.model} + {e.adapter}" if e.adapter else f"{e.model} (base)"
    if e.loss is None:
        _err().print(f"{e.id} {e.status}: {escape(what)}")
        return
    _out().print(f"{escape(what)} on {e.file}: loss {e.loss:.4f}, perplexity "
                 f"{e.perplexity:.4g} ({e.tokens} tokens, {e.examples} examples)")


@app.command("eval")
@friendly
def eval_(
    ctx: typer.Context,
    file: Annotated[str, typer.Argument(help="A local JSONL (uploaded) or a file-… id.")],
    model: Annotated[Optional[str], typer.Option(help="Base model (default: the adapter's).")
                     ] = None,
    adapter: Annotated[Optional[str], typer.Option(help="Adapter id; omit for the base alone.")
                       ] = None,
    max_seq_len: Annotated[Optional[int], typer.Option()] = None,
    quantization: Annotated[Optional[str], typer.Option(help="nf4, fp4, int8 or none.")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait")] = True,
    timeout: Annotated[Optional[float], typer.Option(help="Give up waiting after s.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the evaluation as JSON.")
                       ] = False,
) -> None:
    """Held-out loss and perplexity of a base model (+ adapter) on FILE, run on the pool."""
    ref = Path(file) if not file.startswith("file-") else file
    with _client(ctx) as client:
        e = client.evaluations.create(ref, model=model, adapter=adapter,
                                      max_seq_len=max_seq_len, quantization=quantization)
        if wait:
            e = client.evaluations.wait(e.id, timeout=timeout)
    if as_json:
        print(e.model_dump_json(indent=2))
        return
    _report_eval(e)


# -- export, import, base download (issue 13) -------------------------------------------------


@app.command("export")
@friendly
def export(
    ctx: typer.Context,
    adapter_id: str,
    dest: Path,
    format: Annotated[str, typer.Option(
        "--format", "-f", help="peft (the adapter, for peft), merged (base + adapter, bf16 "
        "safetensors, for transformers/vLLM) or gguf (a llama.cpp/Ollama adapter + Modelfile)"
    )] = "peft",
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty DEST.")] = False,
) -> None:
    """Export an adapter into DEST in a format other tools load."""
    with _client(ctx) as client:
        path = client.adapters.export(adapter_id, format, dest, overwrite=overwrite)
    print(path)  # one line on stdout: the folder


@adapters_app.command("import")
@friendly
def adapters_import(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="A PEFT folder, or a .tar.gz/.zip of one.")],
    base_model: Annotated[Optional[str], typer.Option(
        "--base-model", help="The registered model it was trained on (default: the one "
        "adapter_config.json names).")] = None,
) -> None:
    """Bring your own adapter: it then merges, evaluates and shares like any other."""
    with _client(ctx) as client:
        a = client.adapters.import_(path, base_model=base_model)
    _err().print(f"Imported as {escape(a.id)} (base {escape(a.base_model)})")
    print(a.id)


@models_app.command("download")
@friendly
def models_download(
    ctx: typer.Context,
    name: str,
    dest: Path,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty DEST.")] = False,
) -> None:
    """Download a base model (dequantised, an HF folder) into DEST, where the admin allows it."""
    with _client(ctx) as client:
        path = client.models.download(name, dest, overwrite=overwrite)
    print(path)  # one line on stdout: the folder
