"""`lorapool.AsyncClient`: the asyncio client (httpx.AsyncClient), running the plans of
`_plans.py`; only the I/O of each step is its own.

Both clients are written once, in `_async.py`; `_sync.py` is generated from it by
`scripts/gen_sync.py`, and tests/client/test_generated.py fails when it is out of date.
"""

from __future__ import annotations

import asyncio
from contextlib import ExitStack
from pathlib import Path
from typing import Any, AsyncIterator, Optional, Union

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
from ._federations import AsyncFederations
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
    ListResponse,
    LoraParams,
    Merge,
    Model,
    Node,
)


class _AsyncEventStream:
    """An open text/event-stream response, read one message at a time."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()
        self._decoder = SSEDecoder()

    async def next_message(self) -> Optional[SSEMessage]:
        try:
            async for line in self._lines:
                msg = self._decoder.feed(line)
                if msg is not None:
                    return msg
        except httpx.TransportError as exc:
            raise wrap_transport_error(exc) from exc
        return None

    async def close(self) -> None:
        await self.response.aclose()


class AsyncClient:
    """A lorapool server. `base_url`/`api_key` default to LORAPOOL_BASE_URL / LORAPOOL_API_KEY.

    Resources: `files`, `jobs`, `models`, `adapters`, `nodes`, `merges`, `evaluations`,
    `federations`; `submit()` creates a job. (`AsyncClient`: every call is awaitable.)"""

    def __init__(
        self,
        base_url: Optional[str] = None,
        api_key: Optional[str] = None,
        *,
        timeout: Union[float, httpx.Timeout, None] = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        http_client: Optional[httpx.AsyncClient] = None,
    ) -> None:
        self.base_url = resolve_base_url(base_url)
        self.api_key = resolve_api_key(api_key)
        self.timeout = make_timeout(timeout)
        self.retry_policy = RetryPolicy(max_retries=max_retries)
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient()
        self._http.base_url = httpx.URL(self.base_url)
        self._http.headers.update(default_headers(self.api_key))
        self._http.timeout = self.timeout
        self.files = AsyncFiles(self)
        self.jobs = AsyncJobs(self)
        self.models = AsyncModels(self)
        self.adapters = AsyncAdapters(self)
        self.nodes = AsyncNodes(self)
        self.merges = AsyncMerges(self)
        self.evaluations = AsyncEvaluations(self)
        self.federations = AsyncFederations(self)

    # -- lifecycle --------------------------------------------------------------------------
    async def close(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"lorapool.AsyncClient({self.base_url!r})"

    # -- top-level operations ---------------------------------------------------------------
    async def federate(
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
        return await self._run(fed_plans.federate(fed_plans.FederateParams.check(**kw)))

    @plans.submit_arguments
    async def submit(self, model: str, training_file: Union[str, Path, None] = None,
                     **options: Any) -> FineTuningJob:
        """Create a fine-tuning job. A local `training_file`/`validation_file` path is uploaded
        first (a "file-…" id is used as is); every argument is checked before any upload, and
        a job the server refuses leaves no uploaded file behind."""
        params = plans.SubmitParams.check(model=model, training_file=training_file, **options)
        return await self._run(plans.submit(params))

    async def merge(
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
        merge = await self._run(plans.create_merge(plans.checked(plans.MergeParams, "merge", **kw)))
        if not wait:
            return merge
        return await self._run(plans.wait_task("merge", merge.id, timeout=timeout,
                                              poll_interval=poll_interval))

    # -- running plans ----------------------------------------------------------------------
    async def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            await asyncio.sleep(seconds)

    async def _send(self, call: Call, *, stream: bool = False) -> httpx.Response:
        """Send with retries; a 2xx response, or the typed error."""
        attempt = 0
        while True:
            with ExitStack() as files:
                request = build_request(self._http, call, files)
                if stream and call.timeout is None:
                    request.extensions["timeout"] = stream_timeout(self.timeout).as_dict()
                try:
                    response = await self._http.send(request, stream=stream)
                except httpx.TransportError as exc:
                    delay = self.retry_policy.delay_for_error(call, exc, attempt)
                    if delay is None:
                        raise wrap_transport_error(exc, request) from exc
                    await self._sleep(delay)
                    attempt += 1
                    continue
            if response.is_success:
                return response
            delay = self.retry_policy.delay_for_response(call, response, attempt)
            if delay is not None:
                await response.aclose()
                await self._sleep(delay)
                attempt += 1
                continue
            if stream:
                await response.aread()
            raise error_from_response(response)

    async def _perform(self, step: Any, streams: list[_AsyncEventStream]) -> Any:
        if isinstance(step, Call):
            return step.parse(await self._send(step))
        if isinstance(step, Sleep):
            return await self._sleep(step.seconds)
        if isinstance(step, OpenStream):
            handle = _AsyncEventStream(await self._send(step.call, stream=True))
            streams.append(handle)
            return handle
        if isinstance(step, ReadEvent):
            return await step.stream.next_message()
        if isinstance(step, CloseStream):
            await step.stream.close()
            if step.stream in streams:
                streams.remove(step.stream)
            return None
        if isinstance(step, Download):
            response = await self._send(step.call, stream=True)
            size = 0
            try:
                with open(step.dest, "wb") as fh:
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        check_download_size(size, step.max_bytes)
                        fh.write(chunk)
            except httpx.TransportError as exc:
                raise wrap_transport_error(exc, response.request) from exc
            finally:
                await response.aclose()
            return size
        raise TypeError(f"unknown plan step {step!r}")

    async def _iterate(self, plan: Plan, returned: Optional[list[Any]] = None
                       ) -> AsyncIterator[Any]:
        """Run `plan`, yielding what it emits; the plan's return value is appended to
        `returned` (one shape for both twins: an async generator cannot return a value)."""
        streams: list[_AsyncEventStream] = []
        result: Any = None
        error: Optional[BaseException] = None
        try:
            while True:
                try:
                    step = plan.throw(error) if error is not None else plan.send(result)
                except StopIteration as stop:
                    if returned is not None:
                        returned.append(stop.value)
                    return
                result, error = None, None
                if isinstance(step, Emit):
                    yield step.value
                    continue
                try:
                    result = await self._perform(step, streams)
                except LorapoolError as exc:  # the plan may handle it (reconnects)
                    error = exc
        finally:
            plan.close()
            for s in streams:
                await s.close()

    async def _run(self, plan: Plan) -> Any:
        returned: list[Any] = []
        async for _ in self._iterate(plan, returned):
            pass
        return returned[0]


class _AsyncResource:
    def __init__(self, client: AsyncClient) -> None:
        self._client = client


class AsyncFiles(_AsyncResource):
    async def upload(self, file: Union[str, Path], *, purpose: str = "fine-tune") -> FileObject:
        """Upload a local JSONL file; the server validates every line."""
        return await self._client._run(plans.upload_file(file, purpose))

    async def list(self, *, after: Optional[str] = None,
                   limit: Optional[int] = None) -> ListResponse[FileObject]:
        """One page of your uploaded files, newest first."""
        return await self._client._run(plans.list_files(after, limit))

    async def get(self, file_id: str) -> FileObject:
        return await self._client._run(plans.get_file(file_id))

    async def delete(self, file_id: str) -> FileDeleted:
        return await self._client._run(plans.delete_file(file_id))


class AsyncJobs(_AsyncResource):
    async def get(self, job_id: str) -> FineTuningJob:
        return await self._client._run(plans.get_job(job_id))

    async def list(self, *, after: Optional[str] = None,
                   limit: Optional[int] = None) -> ListResponse[FineTuningJob]:
        """One page of jobs, newest first; pass `after=page.last_id` for the next."""
        return await self._client._run(plans.list_jobs(after, limit))

    async def cancel(self, job_id: str) -> FineTuningJob:
        return await self._client._run(plans.cancel_job(job_id))

    async def checkpoints(self, job_id: str) -> list[JobCheckpoint]:
        return await self._client._run(plans.list_checkpoints(job_id))

    async def download_checkpoint(self, job_id: str, checkpoint_id: str,
                                  dest: Union[str, Path],
                                  *, overwrite: bool = False) -> Path:
        """Download and safely extract one checkpoint (a PEFT folder) into `dest`."""
        return await self._client._run(plans.download_checkpoint(
            job_id, checkpoint_id, dest, overwrite=overwrite))

    async def wait(self, job_id: str, *, progress: bool = False, poll_interval: float = 2.0,
                   timeout: Optional[float] = None) -> FineTuningJob:
        """Until the job is succeeded, failed or cancelled, returning it; `progress=True`
        draws a progress bar (steps, loss) on stderr. JobWaitTimeout after `timeout` s."""
        with JobProgress(progress) as bar:
            return await self._client._run(plans.wait_job(
                job_id, poll_interval=poll_interval, timeout=timeout,
                on_update=bar.update if progress else None, with_loss=progress))

    def events(self, job_id: str, *, follow: bool = False) -> AsyncIterator[JobEvent]:
        """The job's events, oldest first; `follow=True` keeps reading (SSE) until it ends:
        `async for event in client.jobs.events(id, follow=True)`."""
        return self._client._iterate(
            plans.follow_events(job_id, follow=follow, retry=self._client.retry_policy))


class AsyncModels(_AsyncResource):
    async def download(self, model_id: str, dest: Union[str, Path], *, overwrite: bool = False,
                 timeout: Optional[float] = None) -> Path:
        """The base model (dequantised, an HF folder) into `dest`, where the admin allows it."""
        return await self._client._run(plans.download_model(model_id, dest, overwrite=overwrite,
                                                   timeout=timeout))

    async def get(self, model_id: str) -> Model:
        return await self._client._run(plans.get_model(model_id))

    async def list(self) -> list[Model]:
        return await self._client._run(plans.list_models())


class AsyncAdapters(_AsyncResource):
    async def export(self, adapter_id: str, format: str, dest: Union[str, Path], *,
               overwrite: bool = False, timeout: Optional[float] = None) -> Path:
        """The adapter as `format` ("peft", "merged" or "gguf"), extracted into `dest`."""
        return await self._client._run(plans.export_adapter(adapter_id, format, dest, overwrite=overwrite,
                                                     timeout=timeout))

    async def import_(self, path: Union[str, Path], *, base_model: Optional[str] = None) -> Adapter:
        """Upload a PEFT folder (or a .tar.gz/.zip of one) as a new adapter of yours."""
        return await self._client._run(plans.import_adapter(path, base_model))

    async def list(self, *, include_shared: bool = False) -> list[Adapter]:
        """Your adapters (and, with `include_shared`, those shared with you), newest first."""
        return await self._client._run(plans.list_adapters(include_shared))

    async def share(self, adapter_id: str, tenant: str) -> Adapter:
        """Let `tenant` get, download, merge and evaluate your adapter."""
        return await self._client._run(plans.share_adapter(adapter_id, tenant))

    async def unshare(self, adapter_id: str, tenant: str) -> Adapter:
        """Revoke `tenant`'s use of your adapter (a no-op when it had none)."""
        return await self._client._run(plans.unshare_adapter(adapter_id, tenant))

    async def get(self, adapter_id: str) -> Adapter:
        return await self._client._run(plans.get_adapter(adapter_id))

    async def download(self, adapter_id: str, dest: Union[str, Path], *,
                       overwrite: bool = False) -> Path:
        """Download and safely extract the adapter (a PEFT folder) into `dest`; returns it."""
        return await self._client._run(
            plans.download_adapter(adapter_id, dest, overwrite=overwrite))


class AsyncNodes(_AsyncResource):
    async def list(self) -> list[Node]:
        return await self._client._run(plans.list_nodes())


class AsyncMerges(_AsyncResource):
    async def create(
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
        """Queue a merge (see `AsyncClient.merge`, which also waits)."""
        kw = {k: v for k, v in locals().items() if k != "self" and v is not None}
        return await self._client._run(plans.create_merge(
            plans.checked(plans.MergeParams, "merge", **kw)))

    async def get(self, merge_id: str) -> Merge:
        return await self._client._run(plans.get_merge(merge_id))

    async def list(self, *, after: Optional[str] = None,
             limit: Optional[int] = None) -> ListResponse[Merge]:
        return await self._client._run(plans.list_merges(after, limit))

    async def wait(self, merge_id: str, *, poll_interval: float = 1.0,
             timeout: Optional[float] = None) -> Merge:
        """Until the merge succeeded or failed; JobWaitTimeout after `timeout` s."""
        return await self._client._run(plans.wait_task("merge", merge_id,
                                                     poll_interval=poll_interval,
                                                     timeout=timeout))


class AsyncEvaluations(_AsyncResource):
    async def create(
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
        return await self._client._run(plans.create_evaluation(
            plans.checked(plans.EvaluationParams, "evaluation", **kw)))

    async def get(self, evaluation_id: str) -> Evaluation:
        return await self._client._run(plans.get_evaluation(evaluation_id))

    async def list(self, *, after: Optional[str] = None,
             limit: Optional[int] = None) -> ListResponse[Evaluation]:
        return await self._client._run(plans.list_evaluations(after, limit))

    async def wait(self, evaluation_id: str, *, poll_interval: float = 1.0,
             timeout: Optional[float] = None) -> Evaluation:
        """Until the evaluation succeeded or failed; JobWaitTimeout after `timeout` s."""
        return await self._client._run(plans.wait_task("evaluation", evaluation_id,
                                                     poll_interval=poll_interval,
                                                     timeout=timeout))
