"""`lorapool.Client`: the blocking client (httpx.Client), running the plans of `_plans.py`."""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import httpx

from . import _federations as fed_plans
from . import _plans as plans
from ._base import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    Call,
    CloseStream,
    Download,
    Emit,
    OpenStream,
    Plan,
    ReadEvent,
    RetryPolicy,
    Sleep,
    SSEDecoder,
    SSEMessage,
    build_request,
    default_headers,
    make_timeout,
    resolve_api_key,
    resolve_base_url,
    stream_timeout,
    wrap_transport_error,
)
from ._extract import check_download_size
from ._federations import Federations
from ._progress import JobProgress
from .errors import LorapoolError, error_from_response
from .types import (
    Adapter,
    Evaluation,
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
)


class _EventStream:
    """An open text/event-stream response, read one message at a time."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.iter_lines()
        self._decoder = SSEDecoder()

    def next_message(self) -> Optional[SSEMessage]:
        try:
            for line in self._lines:
                msg = self._decoder.feed(line)
                if msg is not None:
                    return msg
        except httpx.TransportError as exc:
            raise wrap_transport_error(exc) from exc
        return None

    def close(self) -> None:
        self.response.close()


class Client:
    """A lorapool server. `base_url`/`api_key` default to LORAPOOL_BASE_URL / LORAPOOL_API_KEY.

    Resources: `files`, `jobs`, `models`, `adapters`, `nodes`; `submit()` creates a job."""

    def __init__(
        self,
        base_url: Optional[str] = None,
        api_key: Optional[str] = None,
        *,
        timeout: Union[float, httpx.Timeout, None] = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        http_client: Optional[httpx.Client] = None,
    ) -> None:
        self.base_url = resolve_base_url(base_url)
        self.api_key = resolve_api_key(api_key)
        self.timeout = make_timeout(timeout)
        self.retry_policy = RetryPolicy(max_retries=max_retries)
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client()
        self._http.base_url = httpx.URL(self.base_url)
        self._http.headers.update(default_headers(self.api_key))
        self._http.timeout = self.timeout
        self.files = Files(self)
        self.jobs = Jobs(self)
        self.models = Models(self)
        self.adapters = Adapters(self)
        self.nodes = Nodes(self)
        self.merges = Merges(self)
        self.evaluations = Evaluations(self)
        self.federations = Federations(self)

    # -- lifecycle --------------------------------------------------------------------------
    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"lorapool.Client({self.base_url!r})"

    # -- the one top-level operation --------------------------------------------------------
    def federate(
        self,
        model: str,
        participants: list[Any],
        *,
        rounds: int,
        local_steps: Optional[int] = None,
        local_epochs: Optional[int] = None,
        method: str = "exact",
        params: Optional[dict[str, Any]] = None,
        min_quorum: Optional[int] = None,
        round_deadline_s: Optional[float] = None,
        init_adapter: Optional[str] = None,
        batch_size: Optional[int] = None,
        micro_batch_size: Optional[int] = None,
        learning_rate: Optional[float] = None,
        lora: Union[dict[str, Any], LoraParams, None] = None,
        quantization: Optional[str] = None,
        max_seq_len: Optional[int] = None,
        seed: Optional[int] = None,
    ) -> Any:
        """Start federated rounds: each participant (a dict with `dataset="NODE:NAME"` — a
        node-local data set — or `training_file`, plus optional `name`, `tenant`, `weight`)
        trains `local_steps`/`local_epochs` per round from the current global adapter; only
        adapters are gathered and aggregated with `method` (any merge method). Returns the
        `Federation`; `federations.wait(id)` follows it."""
        kw = {k: v for k, v in locals().items() if k != "self" and v is not None}
        return self._run(fed_plans.federate(fed_plans.FederateParams.check(**kw)))

    def submit(
        self,
        model: str,
        training_file: Union[str, Path, None] = None,
        *,
        dataset: Union[str, dict[str, str], None] = None,
        validation_file: Union[str, Path, None] = None,
        n_epochs: Union[int, str, None] = None,
        batch_size: Union[int, str, None] = None,
        learning_rate: Optional[float] = None,
        lora: Union[dict[str, Any], LoraParams, None] = None,
        quantization: Optional[str] = None,
        max_seq_len: Optional[int] = None,
        micro_batch_size: Optional[int] = None,
        checkpoint_every: Optional[int] = None,
        suffix: Optional[str] = None,
        seed: Optional[int] = None,
        metadata: Optional[dict[str, str]] = None,
        placement: Union[dict[str, Any], JobPlacement, None] = None,
        idempotency_key: Optional[str] = None,
        extra_body: Optional[dict[str, Any]] = None,
    ) -> FineTuningJob:
        """Create a fine-tuning job. A local `training_file`/`validation_file` path is uploaded
        first (a "file-…" id is used as is); every argument is checked before any upload."""
        params = plans.SubmitParams.check(**{k: v for k, v in locals().items() if k != "self"})
        return self._run(plans.submit(params))

    def merge(
        self,
        adapters: list[str],
        method: str = "exact",
        *,
        weights: Optional[list[float]] = None,
        normalize_weights: Optional[bool] = None,
        density: Optional[float] = None,
        majority_sign_method: Optional[str] = None,
        target_rank: Optional[int] = None,
        seed: Optional[int] = None,
        name: Optional[str] = None,
        suffix: Optional[str] = None,
        evaluate_on: Union[str, Path, None] = None,
        evaluation: Optional[dict[str, Any]] = None,
        idempotency_key: Optional[str] = None,
        wait: bool = True,
        timeout: Optional[float] = None,
        poll_interval: float = 1.0,
    ) -> Merge:
        """Merge adapters (yours or shared with you) on the pool into a new adapter of yours.

        `method`: naive, exact, svd, ties, dare_linear, dare_ties, magnitude_prune or a *_svd
        variant; `weights` default to the adapters' training-sample counts (FedAvg). With
        `wait` (default) returns the finished merge (`result_adapter` is the new adapter's id,
        `status` "failed" with `error` otherwise); JobWaitTimeout after `timeout` s."""
        kw = {k: v for k, v in locals().items()
              if k not in ("self", "wait", "timeout", "poll_interval") and v is not None}
        merge = self._run(plans.create_merge(plans.checked(plans.MergeParams, "merge", **kw)))
        if not wait:
            return merge
        return self._run(plans.wait_task("merge", merge.id, timeout=timeout,
                                              poll_interval=poll_interval))

    # -- running plans ----------------------------------------------------------------------
    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)

    def _send(self, call: Call, *, stream: bool = False) -> httpx.Response:
        """Send with retries; a 2xx response, or the typed error."""
        attempt = 0
        while True:
            with ExitStack() as files:
                request = build_request(self._http, call, files)
                if stream and call.timeout is None:
                    request.extensions["timeout"] = stream_timeout(self.timeout).as_dict()
                try:
                    response = self._http.send(request, stream=stream)
                except httpx.TransportError as exc:
                    delay = self.retry_policy.delay_for_error(call, exc, attempt)
                    if delay is None:
                        raise wrap_transport_error(exc, request) from exc
                    self._sleep(delay)
                    attempt += 1
                    continue
            if response.is_success:
                return response
            delay = self.retry_policy.delay_for_response(call, response, attempt)
            if delay is not None:
                response.close()
                self._sleep(delay)
                attempt += 1
                continue
            if stream:
                response.read()
            raise error_from_response(response)

    def _perform(self, step: Any, streams: list[_EventStream]) -> Any:
        if isinstance(step, Call):
            return step.parse(self._send(step))
        if isinstance(step, Sleep):
            return self._sleep(step.seconds)
        if isinstance(step, OpenStream):
            handle = _EventStream(self._send(step.call, stream=True))
            streams.append(handle)
            return handle
        if isinstance(step, ReadEvent):
            return step.stream.next_message()
        if isinstance(step, CloseStream):
            step.stream.close()
            if step.stream in streams:
                streams.remove(step.stream)
            return None
        if isinstance(step, Download):
            response = self._send(step.call, stream=True)
            size = 0
            try:
                with open(step.dest, "wb") as fh:
                    for chunk in response.iter_bytes():
                        size += len(chunk)
                        check_download_size(size, step.max_bytes)
                        fh.write(chunk)
            except httpx.TransportError as exc:
                raise wrap_transport_error(exc, response.request) from exc
            finally:
                response.close()
            return size
        raise TypeError(f"unknown plan step {step!r}")

    def _iterate(self, plan: Plan) -> Iterator[Any]:
        """Run `plan`, yielding what it emits; returns (StopIteration.value) what it returns."""
        streams: list[_EventStream] = []
        result: Any = None
        error: Optional[BaseException] = None
        try:
            while True:
                try:
                    step = plan.throw(error) if error is not None else plan.send(result)
                except StopIteration as stop:
                    return stop.value
                result, error = None, None
                if isinstance(step, Emit):
                    yield step.value
                    continue
                try:
                    result = self._perform(step, streams)
                except LorapoolError as exc:  # the plan may handle it (reconnects)
                    error = exc
        finally:
            plan.close()
            for s in streams:
                s.close()

    def _run(self, plan: Plan) -> Any:
        it = self._iterate(plan)
        while True:
            try:
                next(it)
            except StopIteration as stop:
                return stop.value


class _Resource:
    def __init__(self, client: Client) -> None:
        self._client = client


class Files(_Resource):
    def upload(self, file: Union[str, Path], *, purpose: str = "fine-tune") -> FileObject:
        """Upload a local JSONL file; the server validates every line."""
        return self._client._run(plans.upload_file(file, purpose))

    def list(self, *, after: Optional[str] = None,
             limit: Optional[int] = None) -> ListResponse[FileObject]:
        return self._client._run(plans.list_files(after, limit))

    def get(self, file_id: str) -> FileObject:
        return self._client._run(plans.get_file(file_id))

    def delete(self, file_id: str) -> FileDeleted:
        return self._client._run(plans.delete_file(file_id))


class Jobs(_Resource):
    def get(self, job_id: str) -> FineTuningJob:
        return self._client._run(plans.get_job(job_id))

    def list(self, *, after: Optional[str] = None,
             limit: Optional[int] = None) -> ListResponse[FineTuningJob]:
        """One page of jobs, newest first; pass `after=page.last_id` for the next."""
        return self._client._run(plans.list_jobs(after, limit))

    def cancel(self, job_id: str) -> FineTuningJob:
        return self._client._run(plans.cancel_job(job_id))

    def checkpoints(self, job_id: str) -> list[JobCheckpoint]:
        return self._client._run(plans.list_checkpoints(job_id))

    def download_checkpoint(self, job_id: str, checkpoint_id: str, dest: Union[str, Path],
                            *, overwrite: bool = False) -> Path:
        """Download and safely extract one checkpoint (a PEFT folder) into `dest`."""
        return self._client._run(plans.download_checkpoint(
            job_id, checkpoint_id, dest, overwrite=overwrite))

    def wait(self, job_id: str, *, progress: bool = False, poll_interval: float = 2.0,
             timeout: Optional[float] = None) -> FineTuningJob:
        """Block until the job is succeeded, failed or cancelled and return it; `progress=True`
        draws a progress bar (steps, loss) on stderr. JobWaitTimeout after `timeout` s."""
        with JobProgress(progress) as bar:
            return self._client._run(plans.wait_job(
                job_id, poll_interval=poll_interval, timeout=timeout,
                on_update=bar.update if progress else None, with_loss=progress))

    def events(self, job_id: str, *, follow: bool = False) -> Iterator[JobEvent]:
        """The job's events, oldest first; `follow=True` keeps reading (SSE) until it ends."""
        return self._client._iterate(
            plans.follow_events(job_id, follow=follow, retry=self._client.retry_policy))


class Models(_Resource):
    def download(self, model_id: str, dest: Union[str, Path], *, overwrite: bool = False,
                 timeout: Optional[float] = None) -> Path:
        """The base model (dequantised, an HF folder) into `dest`, where the admin allows it."""
        return self._client._run(plans.download_model(model_id, dest, overwrite=overwrite,
                                                   timeout=timeout))

    def get(self, model_id: str) -> Model:
        return self._client._run(plans.get_model(model_id))

    def list(self) -> list[Model]:
        return self._client._run(plans.list_models())


class Adapters(_Resource):
    def export(self, adapter_id: str, format: str, dest: Union[str, Path], *,
               overwrite: bool = False, timeout: Optional[float] = None) -> Path:
        """The adapter as `format` ("peft", "merged" or "gguf"), extracted into `dest`."""
        return self._client._run(plans.export_adapter(adapter_id, format, dest, overwrite=overwrite,
                                                     timeout=timeout))

    def import_(self, path: Union[str, Path], *, base_model: Optional[str] = None) -> Adapter:
        """Upload a PEFT folder (or a .tar.gz/.zip of one) as a new adapter of yours."""
        return self._client._run(plans.import_adapter(path, base_model))

    def list(self, *, include_shared: bool = False) -> list[Adapter]:
        """Your adapters (and, with `include_shared`, those shared with you), newest first."""
        return self._client._run(plans.list_adapters(include_shared))

    def share(self, adapter_id: str, tenant: str) -> Adapter:
        """Let `tenant` get, download, merge and evaluate your adapter."""
        return self._client._run(plans.share_adapter(adapter_id, tenant))

    def unshare(self, adapter_id: str, tenant: str) -> Adapter:
        """Revoke `tenant`'s use of your adapter (a no-op when it had none)."""
        return self._client._run(plans.unshare_adapter(adapter_id, tenant))

    def get(self, adapter_id: str) -> Adapter:
        return self._client._run(plans.get_adapter(adapter_id))

    def download(self, adapter_id: str, dest: Union[str, Path], *,
                 overwrite: bool = False) -> Path:
        """Download and safely extract the adapter (a PEFT folder) into `dest`; returns it."""
        return self._client._run(plans.download_adapter(adapter_id, dest, overwrite=overwrite))


class Nodes(_Resource):
    def list(self) -> list[Node]:
        return self._client._run(plans.list_nodes())


class Merges(_Resource):
    def create(
        self,
        adapters: list[str],
        method: str = "exact",
        *,
        weights: Optional[list[float]] = None,
        normalize_weights: Optional[bool] = None,
        density: Optional[float] = None,
        majority_sign_method: Optional[str] = None,
        target_rank: Optional[int] = None,
        seed: Optional[int] = None,
        name: Optional[str] = None,
        suffix: Optional[str] = None,
        evaluate_on: Union[str, Path, None] = None,
        evaluation: Optional[dict[str, Any]] = None,
        idempotency_key: Optional[str] = None,
    ) -> Merge:
        """Queue a merge (see `Client.merge`, which also waits)."""
        kw = {k: v for k, v in locals().items() if k != "self" and v is not None}
        return self._client._run(plans.create_merge(
            plans.checked(plans.MergeParams, "merge", **kw)))

    def get(self, merge_id: str) -> Merge:
        return self._client._run(plans.get_merge(merge_id))

    def list(self, *, after: Optional[str] = None,
             limit: Optional[int] = None) -> ListResponse[Merge]:
        return self._client._run(plans.list_merges(after, limit))

    def wait(self, merge_id: str, *, poll_interval: float = 1.0,
             timeout: Optional[float] = None) -> Merge:
        """Until the merge succeeded or failed; JobWaitTimeout after `timeout` s."""
        return self._client._run(plans.wait_task("merge", merge_id,
                                                     poll_interval=poll_interval,
                                                     timeout=timeout))


class Evaluations(_Resource):
    def create(
        self,
        file: Union[str, Path],
        *,
        model: Optional[str] = None,
        adapter: Optional[str] = None,
        quantization: Optional[str] = None,
        max_seq_len: Optional[int] = None,
        loss_on: Optional[str] = None,
        batch_size: Optional[int] = None,
        idempotency_key: Optional[str] = None,
    ) -> Evaluation:
        """Queue an evaluation of `model` (+ `adapter`; `model` defaults to the adapter's base)
        on `file` (a "file-…" id, or a local JSONL file, uploaded first): held-out loss and
        perplexity, with the adapter's training settings unless overridden."""
        kw = {k: v for k, v in locals().items() if k != "self" and v is not None}
        return self._client._run(plans.create_evaluation(
            plans.checked(plans.EvaluationParams, "evaluation", **kw)))

    def get(self, evaluation_id: str) -> Evaluation:
        return self._client._run(plans.get_evaluation(evaluation_id))

    def list(self, *, after: Optional[str] = None,
             limit: Optional[int] = None) -> ListResponse[Evaluation]:
        return self._client._run(plans.list_evaluations(after, limit))

    def wait(self, evaluation_id: str, *, poll_interval: float = 1.0,
             timeout: Optional[float] = None) -> Evaluation:
        """Until the evaluation succeeded or failed; JobWaitTimeout after `timeout` s."""
        return self._client._run(plans.wait_task("evaluation", evaluation_id,
                                                     poll_interval=poll_interval,
                                                     timeout=timeout))
