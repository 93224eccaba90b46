"""Every API operation of the client, written once as a plan (see `_base.py`).

`Client` and `AsyncClient` run these generators; everything that is not I/O lives here:
argument checks, request bodies, pagination, polling, SSE reconnects, the download-then-extract
sequence.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Literal, Optional, TypeVar, Union
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ._base import (
    IDEMPOTENCY_HEADER,
    Call,
    CloseStream,
    Download,
    Emit,
    OpenStream,
    Plan,
    ReadEvent,
    RetryPolicy,
    Sleep,
    SSEMessage,
    new_idempotency_key,
)
from ._extract import ExtractLimits, safe_extract
from .errors import (
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    InvalidParameterError,
    JobWaitTimeout,
    LorapoolError,
)
from .types import (
    TASK_TERMINAL_STATUSES,
    TERMINAL_STATUSES,
    Adapter,
    Evaluation,
    Export,
    FileDeleted,
    FileObject,
    FineTuningJob,
    JobCheckpoint,
    JobEvent,
    JobPlacement,
    ListResponse,
    LoraParams,
    Merge,
    Model,
    Node,
    Quantization,
)

M = TypeVar("M", bound=BaseModel)

FILES = "/v1/files"
JOBS = "/v1/fine_tuning/jobs"
PAGE_SIZE = 100
# A followed event stream gives up after this many drops in a row with no new event between.
MAX_STREAM_RECONNECTS = 5
FILE_ID = re.compile(r"^file-[A-Za-z0-9_\-]+$")


# -- parsing ---------------------------------------------------------------------------------


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise APIResponseValidationError(
            f"{response.request.method} {response.request.url.path} answered "
            f"{response.status_code} with a body that is not JSON: {response.text[:200]!r}"
        ) from exc


def _validate(cls: Any, data: Any, response: httpx.Response) -> Any:
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise APIResponseValidationError(
            f"{response.request.method} {response.request.url.path}: unexpected response "
            f"shape for {getattr(cls, '__name__', cls)}: {exc.errors()[0].get('msg')} at "
            f"{'.'.join(str(p) for p in exc.errors()[0].get('loc', ()))}"
        ) from exc


def parse_model(cls: type[M]) -> Callable[[httpx.Response], M]:
    return lambda r: _validate(cls, _json(r), r)


def parse_page(cls: type[M]) -> Callable[[httpx.Response], ListResponse[M]]:
    def parse(r: httpx.Response) -> ListResponse[M]:
        data = _json(r)
        if isinstance(data, list):  # tolerate a bare JSON array
            data = {"object": "list", "data": data}
        return _validate(ListResponse[cls], data, r)  # type: ignore[valid-type]

    return parse


_UNION_MEMBER = re.compile(r"^(int|str|float|bool|none|is-instance\[.*|literal\[.*|function-.*|"
                           r"dict\[.*|list\[.*|tagged-union\[.*|union\[.*)$")


def invalid_parameter(exc: ValidationError, what: str) -> InvalidParameterError:
    """The first error of a pydantic ValidationError as an InvalidParameterError naming the
    field (`what` when the error has no field). Union members show up in `loc` ("int",
    "literal['auto']", "function-after[…]"): they are not field names and are left out."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()) if not _UNION_MEMBER.match(str(p)))
    return InvalidParameterError(loc or what, err.get("msg", "invalid"))


def checked(cls: Any, what: str, **kwargs: Any) -> Any:
    """`cls(**kwargs)`, with the first validation error as an InvalidParameterError."""
    try:
        return cls(**kwargs)
    except ValidationError as exc:
        raise invalid_parameter(exc, what) from exc


def poll_until(fetch: Callable[[], Plan], done: Callable[[Any], bool], *, what: str,
               poll_interval: float, timeout: Optional[float]) -> Plan:
    """Run `fetch()` every `poll_interval` s until `done(result)`; returns that result.
    JobWaitTimeout (carrying the last result) once `timeout` s have passed."""
    if not isinstance(poll_interval, (int, float)) or poll_interval <= 0:
        raise InvalidParameterError("poll_interval", "must be positive")
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        rec = yield from fetch()
        if done(rec):
            return rec
        wait = float(poll_interval)
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise JobWaitTimeout(f"{what} is still {getattr(rec, 'status', '?')} after "
                                     f"{timeout} s", job=rec)
            wait = min(wait, left)
        yield Sleep(wait)


def _seg(value: str, name: str) -> str:
    """One URL path segment; an id can never turn into another path."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidParameterError(name, "must be a non-empty string")
    return quote(value, safe="")


# -- simple operations -----------------------------------------------------------------------


def get(path: str, cls: type[M], params: Optional[dict[str, Any]] = None) -> Plan:
    return (yield Call("GET", path, params=params, parse=parse_model(cls)))


def page(path: str, cls: type[M], *, after: Optional[str] = None,
         limit: Optional[int] = None) -> Plan:
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise InvalidParameterError("limit", "must be a positive integer")
    return (yield Call("GET", path, params={"after": after, "limit": limit},
                       parse=parse_page(cls)))


def list_all(path: str, cls: type[M], params: Optional[dict[str, Any]] = None) -> Plan:
    """Every item of a listing, following `has_more` pages."""
    items: list[Any] = []
    after: Optional[str] = None
    while True:
        p = yield Call("GET", path, params={**(params or {}), "after": after, "limit": PAGE_SIZE},
                       parse=parse_page(cls))
        items.extend(p.data)
        if not p.has_more or not p.data:
            return items
        after = p.last_id or p.data[-1].id


def get_job(job_id: str) -> Plan:
    return (yield from get(f"{JOBS}/{_seg(job_id, 'job_id')}", FineTuningJob))


def list_jobs(after: Optional[str], limit: Optional[int]) -> Plan:
    return (yield from page(JOBS, FineTuningJob, after=after, limit=limit))


def cancel_job(job_id: str) -> Plan:
    # Cancelling twice has the effect of cancelling once, so the POST may be retried; the key
    # says so to the retry policy and to the server.
    return (yield Call("POST", f"{JOBS}/{_seg(job_id, 'job_id')}/cancel",
                       headers={IDEMPOTENCY_HEADER: new_idempotency_key()},
                       parse=parse_model(FineTuningJob)))


def list_checkpoints(job_id: str) -> Plan:
    return (yield from list_all(f"{JOBS}/{_seg(job_id, 'job_id')}/checkpoints", JobCheckpoint))


def get_model(model_id: str) -> Plan:
    return (yield from get(f"/v1/models/{_seg(model_id, 'model_id')}", Model))


def list_models() -> Plan:
    return (yield from list_all("/v1/models", Model))


def list_nodes() -> Plan:
    return (yield from list_all("/v1/nodes", Node))


def list_adapters(include_shared: bool = False) -> Plan:
    params = {"include_shared": "true"} if include_shared else None
    return (yield from list_all("/v1/adapters", Adapter, params))


def get_adapter(adapter_id: str) -> Plan:
    return (yield from get(f"/v1/adapters/{_seg(adapter_id, 'adapter_id')}", Adapter))


def list_files(after: Optional[str], limit: Optional[int]) -> Plan:
    return (yield from page(FILES, FileObject, after=after, limit=limit))


def get_file(file_id: str) -> Plan:
    return (yield from get(f"{FILES}/{_seg(file_id, 'file_id')}", FileObject))


def delete_file(file_id: str) -> Plan:
    return (yield Call("DELETE", f"{FILES}/{_seg(file_id, 'file_id')}",
                       parse=parse_model(FileDeleted)))


# -- files and submit ------------------------------------------------------------------------


def _local_file(path: Union[str, Path], param: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise InvalidParameterError(param, f"no such file: {p}")
    if not p.is_file():
        raise InvalidParameterError(param, f"not a file: {p}")
    return p


def upload_file(path: Union[str, Path], purpose: str = "fine-tune", *,
                param: str = "file") -> Plan:
    p = _local_file(path, param)
    # Not idempotent (each POST makes a new file), so only connection failures are retried.
    return (yield Call("POST", FILES, data={"purpose": purpose}, files={"file": (p.name, p)},
                       parse=parse_model(FileObject)))


def file_ref(value: Union[str, Path, None], param: str) -> Union[str, Path, None]:
    """A "file-…" id stays a string; anything else is a local path that must exist."""
    if value is None:
        return None
    if isinstance(value, str) and FILE_ID.match(value) and not os.path.exists(value):
        return value
    if not isinstance(value, (str, Path, os.PathLike)):
        raise InvalidParameterError(param, "must be a file id ('file-…') or a local path")
    return _local_file(value, param)


def _opt(description: str, shown_default: Optional[str] = None, **kw: Any) -> Any:
    """A `SubmitParams` field: default None (the server decides), its help text, and the
    server's default as the CLI shows it (`cli_default`)."""
    extra = {"cli_default": shown_default} if shown_default is not None else None
    return Field(None, description=description, json_schema_extra=extra, **kw)


class SubmitParams(BaseModel):
    """The arguments of `submit()`, the keys of `lorapool submit --config` and the CLI's
    `submit` options: described here once, checked before anything is uploaded."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="Base model name (see `lorapool models list`).")
    training_file: Optional[Union[str, Path]] = _opt(
        "Local .jsonl (uploaded first) or a file-… id.")
    dataset: Optional[Union[str, dict[str, str]]] = _opt(
        "A node-local data set NODE:NAME instead of a training file (it never leaves its node).")
    validation_file: Optional[Union[str, Path]] = _opt(
        "Held-out .jsonl (or file-… id): validation loss during training.", "none")
    n_epochs: Optional[Union[Literal["auto"], int]] = _opt(
        "Passes over the training data, or auto.", "auto")
    batch_size: Optional[Union[Literal["auto"], int]] = _opt(
        "Examples per optimizer step, or auto.", "auto")
    learning_rate: Optional[float] = _opt("Peak learning rate.", "2e-4", gt=0)
    lora: Optional[LoraParams] = _opt("LoRA settings (r, alpha, dropout, target_modules …).")
    quantization: Optional[Quantization] = _opt("Base weights: nf4, fp4, int8 or none.", "nf4")
    max_seq_len: Optional[int] = _opt("Longest example in tokens (longer are cut).", "model's",
                                      ge=1)
    micro_batch_size: Optional[int] = _opt("Examples per forward pass (memory).", "auto", ge=1)
    checkpoint_every: Optional[int] = _opt("Save a checkpoint every N steps.", "per epoch",
                                           ge=1)
    suffix: Optional[str] = _opt("Up to 64 characters added to the adapter's name.",
                                 max_length=64)
    seed: Optional[int] = _opt("Random seed.", "random")
    metadata: Optional[dict[str, str]] = _opt("Your own KEY=VALUE labels.")
    placement: Optional[JobPlacement] = _opt("Where the job may run (node labels, memory).")
    idempotency_key: Optional[str] = _opt("Makes a retried submit return the same job.")
    extra_body: Optional[dict[str, Any]] = _opt("More JSON fields for the request body.")

    @classmethod
    def check(cls, **kwargs: Any) -> "SubmitParams":
        params = checked(cls, "submit", **kwargs)
        for name in ("n_epochs", "batch_size"):
            value = getattr(params, name)
            if isinstance(value, int) and value < 1:
                raise InvalidParameterError(name, "must be at least 1 (or 'auto')")
        if (params.training_file is None) == (params.dataset is None):
            raise InvalidParameterError("training_file", "give exactly one of training_file "
                                        "or dataset (a node-local data set, 'NODE:NAME')")
        return params

    def body(self) -> dict[str, Any]:
        """The POST /v1/fine_tuning/jobs body, without the file ids (filled in by submit)."""
        hyper = {k: v for k, v in (("n_epochs", self.n_epochs), ("batch_size", self.batch_size))
                 if v is not None}
        body: dict[str, Any] = {"model": self.model}
        if hyper:
            body["hyperparameters"] = hyper
        if self.lora is not None:
            body["lora"] = self.lora.model_dump()
        if self.placement is not None:
            body["placement"] = self.placement.model_dump(exclude_defaults=True)
        for name in ("learning_rate", "quantization", "max_seq_len", "micro_batch_size",
                     "checkpoint_every", "suffix", "seed", "metadata", "dataset"):
            value = getattr(self, name)
            if value is not None:
                body[name] = value
        body.update(self.extra_body or {})
        return body


F = TypeVar("F", bound=Callable[..., Any])


def submit_arguments(fn: F) -> F:
    """Give a client's `submit(self, model, training_file=None, **options)` the signature and
    argument list of `SubmitParams` (for help(), IDEs and `inspect`): the arguments are
    described once, on the model."""
    import inspect

    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    lines = ["", "", "Arguments (`SubmitParams`):"]
    for name, info in SubmitParams.model_fields.items():
        positional = name in ("model", "training_file")
        kind = (inspect.Parameter.POSITIONAL_OR_KEYWORD if positional
                else inspect.Parameter.KEYWORD_ONLY)
        default = inspect.Parameter.empty if info.is_required() else None
        params.append(inspect.Parameter(name, kind, default=default, annotation=info.annotation))
        lines.append(f"    {name}: {info.description or ''}")
    sig = inspect.signature(fn)
    fn.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    fn.__doc__ = (fn.__doc__ or "") + "\n".join(lines)
    return fn


def submit(params: SubmitParams) -> Plan:
    """Upload local data files (after every check passed), then create the job. A job the
    server refuses (unknown model, bad settings …) leaves no uploaded file behind."""
    refs = {"training_file": file_ref(params.training_file, "training_file"),
            "validation_file": file_ref(params.validation_file, "validation_file")}
    body = params.body()
    uploaded: list[str] = []
    try:
        for name, ref in refs.items():
            if isinstance(ref, Path):
                file = yield from upload_file(ref, param=name)
                uploaded.append(file.id)
                body[name] = file.id
            elif ref is not None:
                body[name] = ref
        # The key makes a retried POST safe: the server returns the job it already made.
        key = params.idempotency_key or new_idempotency_key()
        return (yield Call("POST", JOBS, json=body, headers={IDEMPOTENCY_HEADER: key},
                           parse=parse_model(FineTuningJob)))
    except APIStatusError as exc:
        # Refused: the job does not exist, so the files uploaded for it are orphans. (Not on
        # a connection error: the job may have been made, and its retry needs the files.)
        if exc.status_code < 500:
            for file_id in uploaded:
                try:
                    yield from delete_file(file_id)
                except LorapoolError:
                    pass  # best effort; the refusal is what the caller needs to see
        raise


# -- waiting and events ----------------------------------------------------------------------


def latest_loss(events: list[JobEvent]) -> Optional[float]:
    """The newest training loss among metric events (in any order; the later step wins a tie
    of timestamps, and on a full tie the first seen, as pages come newest first)."""
    best: Optional[tuple[tuple[int, int], float]] = None
    for e in events:
        if e.type == "metrics" and e.data:
            loss = e.data.get("train_loss", e.data.get("loss"))
            step = e.data.get("step")
            key = (e.created_at, step if isinstance(step, int) else -1)
            if isinstance(loss, (int, float)) and (best is None or key > best[0]):
                best = (key, float(loss))
    return best[1] if best else None


def wait_job(job_id: str, *, poll_interval: float = 2.0, timeout: Optional[float] = None,
             on_update: Optional[Callable[[FineTuningJob, Optional[float]], None]] = None,
             with_loss: bool = False) -> Plan:
    """Poll until the job is succeeded/failed/cancelled; returns the final job."""

    def fetch() -> Plan:
        job = yield from get_job(job_id)
        if on_update is not None:
            loss = None
            if with_loss:
                recent = yield from page(f"{JOBS}/{_seg(job_id, 'job_id')}/events", JobEvent,
                                         limit=20)
                loss = latest_loss(recent.data)
            on_update(job, loss)
        return job

    return (yield from poll_until(fetch, lambda j: j.status in TERMINAL_STATUSES,
                                  what=f"job {job_id}", poll_interval=poll_interval,
                                  timeout=timeout))


def list_events(job_id: str) -> Plan:
    """All events of a job, oldest first (the server pages newest first)."""
    path = f"{JOBS}/{_seg(job_id, 'job_id')}/events"
    events = yield from list_all(path, JobEvent)
    events.reverse()
    return events


def _event(msg: SSEMessage) -> Optional[JobEvent]:
    if msg.event not in ("message", "event", "fine_tuning.job.event"):
        return None
    try:
        return JobEvent.model_validate_json(msg.data)
    except ValidationError:
        return None  # e.g. a final "[DONE]" marker


def follow_events(job_id: str, *, follow: bool, retry: RetryPolicy) -> Plan:
    """Emit the job's events oldest first; with `follow`, keep reading the SSE stream until the
    job ends, reconnecting after a drop with `Last-Event-ID`, and fill any gap at the end."""
    path = f"{JOBS}/{_seg(job_id, 'job_id')}/events"
    seen: set[str] = set()
    last_id: Optional[str] = None
    for event in (yield from list_events(job_id)):
        seen.add(event.id)
        last_id = event.id
        yield Emit(event)
    if not follow:
        return None
    drops = 0
    while True:
        job = yield from get_job(job_id)
        if job.status in TERMINAL_STATUSES:
            break
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if last_id is not None:
            headers["Last-Event-ID"] = last_id
        stream = None
        try:
            stream = yield OpenStream(Call("GET", path, params={"stream": "true"},
                                           headers=headers))
            while True:
                msg = yield ReadEvent(stream)
                if msg is None:
                    break
                event = _event(msg)
                if event is None or event.id in seen:
                    continue
                seen.add(event.id)
                last_id = event.id
                drops = 0
                yield Emit(event)
            yield CloseStream(stream)
        except APITimeoutError:
            # A quiet job (a long step) is not a dead server; the job GET above will tell.
            if stream is not None:
                yield CloseStream(stream)
        except APIConnectionError:
            if stream is not None:
                yield CloseStream(stream)
            drops += 1
            if drops > MAX_STREAM_RECONNECTS:
                raise
            yield Sleep(retry.backoff(drops - 1))
    # Whatever the stream missed (a drop between events, a server that does not replay).
    for event in (yield from list_events(job_id)):
        if event.id not in seen:
            seen.add(event.id)
            yield Emit(event)
    return None


# -- adapters --------------------------------------------------------------------------------


def download_archive(path: str, dest: Union[str, Path], *, overwrite: bool = False) -> Plan:
    """Stream a tar.gz to a temp file beside `dest`, then extract it safely into `dest`."""
    dest = Path(dest).expanduser()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())) and not overwrite:
        raise FileExistsError(f"destination {dest} exists and is not empty (pass overwrite=True)")
    limits = ExtractLimits.from_env()  # LORAPOOL_MAX_EXTRACT_*, read once for both steps
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tar.gz", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield Download(Call("GET", path,
                            headers={"Accept": "application/gzip, application/octet-stream"}),
                       tmp, max_bytes=limits.max_bytes)
        return safe_extract(tmp, dest, overwrite=overwrite, limits=limits)
    finally:
        tmp.unlink(missing_ok=True)


def download_adapter(adapter_id: str, dest: Union[str, Path], *, overwrite: bool = False) -> Plan:
    path = f"/v1/adapters/{_seg(adapter_id, 'adapter_id')}/download"
    return (yield from download_archive(path, dest, overwrite=overwrite))


# -- exports, imports, bases (issue 13) -------------------------------------------------------

EXPORT_FORMATS = ("peft", "merged", "gguf")


def _prepared_download(path: str, params: dict[str, Any], dest: Union[str, Path], *,
                       overwrite: bool, timeout: Optional[float], poll: float = 1.0) -> Plan:
    """Ask `path?prepare=true` until the pool has built the export (the server holds each ask
    up to `wait` seconds), then stream and safely extract it into `dest`."""
    started = time.monotonic()
    while True:
        state = yield Call("GET", path, params={**params, "prepare": "true", "wait": 30},
                           parse=parse_model(Export))
        if state.status == "succeeded":
            break
        if timeout is not None and time.monotonic() - started > timeout:
            raise TimeoutError(f"{path}: the export was still {state.status} after {timeout} s")
        yield Sleep(poll)
    dl = dict(params)
    query = "&".join(f"{k}={quote(str(v), safe='')}" for k, v in dl.items())
    return (yield from download_archive(f"{path}?{query}" if query else path, dest,
                                        overwrite=overwrite))


def export_adapter(adapter_id: str, fmt: str, dest: Union[str, Path], *,
                   overwrite: bool = False, timeout: Optional[float] = None) -> Plan:
    if fmt not in EXPORT_FORMATS:
        raise InvalidParameterError("format", f"must be one of {', '.join(EXPORT_FORMATS)}")
    path = f"/v1/adapters/{_seg(adapter_id, 'adapter_id')}/export"
    return (yield from _prepared_download(path, {"format": fmt}, dest, overwrite=overwrite,
                                          timeout=timeout))


def download_model(model_id: str, dest: Union[str, Path], *, overwrite: bool = False,
                   timeout: Optional[float] = None) -> Plan:
    path = f"/v1/models/{_seg(model_id, 'model_id')}/download"
    return (yield from _prepared_download(path, {}, dest, overwrite=overwrite, timeout=timeout))


def import_adapter(path: Union[str, Path], base_model: Optional[str] = None) -> Plan:
    """Upload a PEFT folder (packed here as a tar.gz) or an archive of one as a new adapter."""
    import tarfile

    p = Path(path).expanduser()
    if not p.exists():
        raise InvalidParameterError("path", f"{p} does not exist")
    tmp: Optional[Path] = None
    try:
        if p.is_dir():
            fd, name = tempfile.mkstemp(prefix=".lorapool-import-", suffix=".tar.gz")
            os.close(fd)
            tmp = Path(name)
            with tarfile.open(tmp, "w:gz") as tar:
                for f in sorted(p.iterdir()):
                    if f.is_file() and not f.is_symlink():
                        tar.add(f, arcname=f.name, recursive=False)
            upload, filename = tmp, f"{p.name}.tar.gz"
        else:
            upload, filename = p, p.name
        data = {"base_model": base_model} if base_model else None
        return (yield Call("POST", "/v1/adapters", data=data, files={"file": (filename, upload)},
                           parse=parse_model(Adapter)))
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def download_checkpoint(job_id: str, checkpoint_id: str, dest: Union[str, Path], *,
                        overwrite: bool = False) -> Plan:
    path = (f"{JOBS}/{_seg(job_id, 'job_id')}/checkpoints/"
            f"{_seg(checkpoint_id, 'checkpoint_id')}/download")
    return (yield from download_archive(path, dest, overwrite=overwrite))


# -- sharing, merges and evaluations ---------------------------------------------------------

MERGES = "/v1/merges"
EVALUATIONS = "/v1/evaluations"


def share_adapter(adapter_id: str, tenant: str) -> Plan:
    # Sharing twice is sharing once, so a retried POST is safe; the key tells the retry policy.
    return (yield Call("POST", f"/v1/adapters/{_seg(adapter_id, 'adapter_id')}/share",
                       json={"tenant": tenant},
                       headers={IDEMPOTENCY_HEADER: new_idempotency_key()},
                       parse=parse_model(Adapter)))


def unshare_adapter(adapter_id: str, tenant: str) -> Plan:
    return (yield Call("DELETE", f"/v1/adapters/{_seg(adapter_id, 'adapter_id')}/share/"
                       f"{_seg(tenant, 'tenant')}", parse=parse_model(Adapter)))


class EvaluationOptions(BaseModel):
    """How to evaluate (defaults: as the adapter was trained)."""

    model_config = ConfigDict(extra="forbid")

    quantization: Optional[Quantization] = None
    max_seq_len: Optional[int] = Field(None, ge=8)
    loss_on: Optional[Literal["assistant", "all"]] = None
    batch_size: Optional[int] = Field(None, ge=1)

    def body(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class MergeParams(BaseModel):
    """The arguments of `merges.create()` / `merge()`, checked before anything is sent."""

    model_config = ConfigDict(extra="forbid")

    adapters: list[str] = Field(min_length=1)
    method: str = Field("exact", min_length=1)
    weights: Optional[list[float]] = None
    normalize_weights: Optional[bool] = None
    density: Optional[float] = Field(None, gt=0, le=1)
    majority_sign_method: Optional[Literal["total", "frequency"]] = None
    target_rank: Optional[int] = Field(None, ge=1)
    seed: Optional[int] = Field(None, ge=0)
    name: Optional[str] = None
    suffix: Optional[str] = None
    evaluate_on: Optional[Union[str, Path]] = None  # a file id, or a local file to upload
    evaluation: Optional[EvaluationOptions] = None
    idempotency_key: Optional[str] = None

    def body(self) -> dict[str, Any]:
        body = self.model_dump(exclude_none=True, exclude={"idempotency_key", "evaluate_on",
                                                           "evaluation"})
        if self.evaluation is not None:
            body["evaluation"] = self.evaluation.body()
        return body


def create_merge(params: MergeParams) -> Plan:
    """Upload a local `evaluate_on` file if one was given, then create the merge."""
    body = params.body()
    ref = file_ref(params.evaluate_on, "evaluate_on")
    if isinstance(ref, Path):
        body["evaluate_on"] = (yield from upload_file(ref, param="evaluate_on")).id
    elif ref is not None:
        body["evaluate_on"] = ref
    key = params.idempotency_key or new_idempotency_key()
    return (yield Call("POST", MERGES, json=body, headers={IDEMPOTENCY_HEADER: key},
                       parse=parse_model(Merge)))


def get_merge(merge_id: str) -> Plan:
    return (yield from get(f"{MERGES}/{_seg(merge_id, 'merge_id')}", Merge))


def list_merges(after: Optional[str], limit: Optional[int]) -> Plan:
    return (yield from page(MERGES, Merge, after=after, limit=limit))


class EvaluationParams(EvaluationOptions):
    """The arguments of `evaluations.create()`."""

    file: Union[str, Path]  # a file id, or a local file to upload
    model: Optional[str] = None
    adapter: Optional[str] = None
    idempotency_key: Optional[str] = None


def create_evaluation(params: EvaluationParams) -> Plan:
    if params.model is None and params.adapter is None:
        raise InvalidParameterError("model", "give model, adapter or both")
    ref = file_ref(params.file, "file")
    body = params.body()
    body.pop("idempotency_key", None)
    if isinstance(ref, Path):
        body["file"] = (yield from upload_file(ref, param="file")).id
    else:
        body["file"] = ref
    key = params.idempotency_key or new_idempotency_key()
    return (yield Call("POST", EVALUATIONS, json=body, headers={IDEMPOTENCY_HEADER: key},
                       parse=parse_model(Evaluation)))


def get_evaluation(evaluation_id: str) -> Plan:
    return (yield from get(f"{EVALUATIONS}/{_seg(evaluation_id, 'evaluation_id')}",
                           Evaluation))


def list_evaluations(after: Optional[str], limit: Optional[int]) -> Plan:
    return (yield from page(EVALUATIONS, Evaluation, after=after, limit=limit))


def wait_task(kind: Literal["merge", "evaluation"], task_id: str, *,
              poll_interval: float = 1.0, timeout: Optional[float] = None) -> Plan:
    """Poll a merge or evaluation until it succeeded or failed; returns the final record."""
    getter = get_merge if kind == "merge" else get_evaluation
    return (yield from poll_until(lambda: getter(task_id),
                                  lambda rec: rec.status in TASK_TERMINAL_STATUSES,
                                  what=f"{kind} {task_id}", poll_interval=poll_interval,
                                  timeout=timeout))
