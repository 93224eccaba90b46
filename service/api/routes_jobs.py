"""/v1/fine_tuning/jobs: create, list, get, cancel, events (list or live SSE), checkpoints.

Create validates everything it can before storing anything: the body's bounds, the model name
(against the registered ones), the files (the caller's own), the resolved TrainSpec, and
whether any node could ever hold the job (`executor.check_fits`). The job is then stored
`queued` and the executor woken; the pool takes it from there. An `Idempotency-Key` makes a
retried create return the first job.

`…/events?stream=true` follows a job live (Server-Sent Events): one catch-up read from the
database, then each event as the store announces it through the event hub (event_hub.py);
a follower that falls too far behind gets an `event: error` ("slow consumer") and the end of
its stream. Open streams per tenant are limited (limits.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator, Callable, Optional

import anyio
from fastapi import APIRouter, Body, Depends, Header, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from lorapool.types import FineTuningJob, JobCheckpoint, JobEvent, ListResponse

from ..store import TERMINAL, EventRecord, JobRecord, NotFound, new_id
from ..store.records import JobStatusChange
from . import convert
from .context import AppContext, context, tenant
from .errors import APIError, bad_request, not_found
from .event_hub import SlowConsumer, Subscription
from .idempotency import checked_idempotency_key
from .job_request import CreateJobRequest, check_integrations, check_workers, integrations, resolve
from .local_data import check_dataset, check_init_adapter, pin_to_dataset_node

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine_tuning"])


def _own_job(ctx: AppContext, job_id: str, owner: str) -> JobRecord:
    rec = ctx.store.get_job(job_id, owner)
    if rec is None:
        raise not_found("fine-tuning job", job_id)
    return rec


def _check_file(ctx: AppContext, owner: str, file_id: Optional[str], param: str) -> Any:
    if file_id is None:
        return None
    rec = ctx.store.get_file(file_id, owner)
    if rec is None:
        raise bad_request(f"Invalid value for '{param}': no file with id '{file_id}' (upload it "
                          "with POST /v1/files first)", param=param, code="file_not_found")
    if rec.purpose != "fine-tune":
        raise bad_request(f"Invalid value for '{param}': file '{file_id}' has purpose "
                          f"'{rec.purpose}', not 'fine-tune'", param=param, code="invalid_value")
    return rec


@router.post("", response_model=FineTuningJob)
def create_job(
    req: CreateJobRequest = Body(...),
    idempotency_key: Optional[str] = Header(None, alias="Idempotency-Key"),
    owner: str = Depends(tenant),
    ctx: AppContext = Depends(context),
) -> Any:
    idempotency_key = checked_idempotency_key(idempotency_key)
    if idempotency_key is not None:
        first = ctx.store.find_job_by_idempotency_key(owner, idempotency_key)
        if first is not None:
            return convert.job(first)

    model = ctx.store.get_model(req.model)
    if model is None:
        names = [m.name for m in ctx.store.list_models()]
        raise bad_request(
            f"Unknown model '{req.model}'. Available models: "
            f"{', '.join(names) if names else '(none registered: lorapool models add NAME PATH)'}",
            param="model", code="model_not_found")
    if (req.training_file is None) == (req.dataset is None):
        what = "Missing" if req.training_file is None else "Both given:"
        raise bad_request(f"{what} 'training_file' (an uploaded file) or 'dataset' (a "
                          "node-local data set, 'NODE:NAME'): give exactly one",
                          param="training_file")
    _check_file(ctx, owner, req.training_file, "training_file")
    _check_file(ctx, owner, req.validation_file, "validation_file")
    dataset = check_dataset(ctx, req.dataset, "dataset", owner) if req.dataset is not None else None
    check_init_adapter(ctx, owner, req.init_adapter, model.sha256)
    spec, hyper = resolve(req, model)
    check_integrations(req, owner, ctx.settings.data_dir)

    placement = req.placement.model_dump(exclude_defaults=True) if req.placement else {}
    placement = pin_to_dataset_node(placement, dataset)
    refusal = ctx.executor.check_fits(spec, placement)
    if refusal:
        raise APIError(400, f"No node of the pool can hold this job: {refusal}",
                       code="insufficient_memory")
    check_workers(placement, ctx.executor, spec)  # issue 10: one worker per fitting node

    record = JobRecord(
        id=new_id("ftjob"),
        tenant=owner,
        model=model.name,
        model_sha256=model.sha256,
        status="queued",
        training_file=req.training_file,
        validation_file=req.validation_file,
        hyperparameters=hyper,
        seed=spec.seed,
        metadata=req.metadata,
        integrations=integrations(req),
        suffix=req.suffix,
        lora=spec.lora.model_dump(mode="json"),
        quantization=spec.quantization,
        max_seq_len=spec.max_seq_len,
        micro_batch_size=spec.micro_batch_size,
        learning_rate=spec.learning_rate,
        checkpoint_every=spec.checkpoint_every,
        spec=spec.model_dump(mode="json", exclude={"base_model"}),
        placement=placement,
        dataset=dataset,
        init_adapter=req.init_adapter,
        idempotency_key=idempotency_key,
    )
    stored = ctx.store.create_job(record, event="Job queued", event_data={
        "model": model.name, "training_file": req.training_file, "dataset": dataset,
        "validation_file": req.validation_file, **hyper})
    if stored.id != record.id:  # a concurrent retry with the same key got there first
        return convert.job(stored)
    # Where it will run, when that is not one card: split over several GPUs of one node.
    note = getattr(ctx.executor, "submit_note", None)
    said = note(spec, placement) if note is not None else None
    if said:
        ctx.store.add_event(stored.id, said, data={"split_planned": True})
    ctx.wake()
    return convert.job(stored)


@router.get("", response_model=ListResponse[FineTuningJob])
def list_jobs(
    request: Request,
    after: Optional[str] = None,
    limit: int = Query(20, ge=1, le=100),
    owner: str = Depends(tenant),
    ctx: AppContext = Depends(context),
) -> Any:
    # OpenAI's filter: metadata[key]=value.
    metadata = {k[len("metadata["):-1]: v for k, v in request.query_params.items()
                if k.startswith("metadata[") and k.endswith("]")}
    try:
        recs, more = ctx.store.list_jobs(owner, after=after, limit=limit, metadata=metadata or None)
    except NotFound as exc:
        raise bad_request(f"'after' names no fine-tuning job of yours: '{after}'",
                          param="after") from exc
    return convert.page([convert.job(r) for r in recs], more)


@router.get("/{job_id}", response_model=FineTuningJob)
def get_job(job_id: str, owner: str = Depends(tenant), ctx: AppContext = Depends(context)) -> Any:
    return convert.job(_own_job(ctx, job_id, owner))


@router.post("/{job_id}/cancel", response_model=FineTuningJob)
def cancel_job(job_id: str, owner: str = Depends(tenant),
               ctx: AppContext = Depends(context)) -> Any:
    """Queued → cancelled at once; running → stop requested (the pool ends it between steps
    and marks it cancelled). A job already finished is returned as it is."""
    rec = _own_job(ctx, job_id, owner)
    # The scheduler may move the job while we look (queued → running, running → queued on a
    # lost node): retry on the state we find until one of our compare-and-sets holds.
    for _ in range(5):
        if rec.terminal:
            break
        if rec.status in ("queued", "validating_files"):
            if ctx.store.transition(job_id, {"queued", "validating_files"}, "cancelled",
                                    event="Job cancelled before it started",
                                    finished_at=int(time.time()), cancel_requested=True):
                ctx.wake()
                break
        elif rec.status == "running":
            if not rec.cancel_requested:
                ctx.store.request_cancel(job_id)
                ctx.store.add_event(job_id, "Cancellation requested; the job stops at its next "
                                    "step and keeps its last checkpoint")
            try:
                ctx.executor.cancel(job_id)
            except Exception as exc:  # the flag is stored; the scheduler honours it
                raise APIError(503, f"Cancellation stored but the pool did not answer: {exc}",
                               code="executor_unavailable") from exc
            rec = ctx.store.get_job(job_id) or rec
            if rec.status != "queued":  # requeued meanwhile: go round and cancel it there
                break
            continue
        rec = ctx.store.get_job(job_id) or rec
    return convert.job(ctx.store.get_job(job_id) or rec)


def _page_events(ctx: AppContext, job_id: str, after: Optional[str], limit: int) -> Any:
    try:
        recs = ctx.store.list_events(job_id, after=after, limit=limit + 1, order="desc")
    except NotFound as exc:
        raise bad_request(f"'after' names no event of this job: '{after}'", param="after") from exc
    return convert.page([convert.event(r) for r in recs[:limit]], len(recs) > limit)


def _sse(event: JobEvent) -> bytes:
    data = json.dumps(event.model_dump(mode="json"), separators=(",", ":"))
    return f"id: {event.id}\nevent: message\ndata: {data}\n\n".encode()


def _sse_error(message: str, code: str) -> bytes:
    body = {"error": {"message": message, "type": "stream_error", "param": None, "code": code}}
    return f"event: error\ndata: {json.dumps(body, separators=(',', ':'))}\n\n".encode()


CATCH_UP_PAGE = 500


async def _catch_up(ctx: AppContext, job_id: str, after: Optional[str],
                    after_seq: int) -> AsyncIterator[tuple[int, list[EventRecord]]]:
    """Pages of stored events after the event `after` (or position `after_seq`), oldest
    first, each with the position it ends at. An unknown `after` replays from the start."""
    while True:
        try:
            seq, recs = await run_in_threadpool(ctx.store.events_for_follower, job_id,
                                                after=after, after_seq=after_seq,
                                                limit=CATCH_UP_PAGE)
        except NotFound:  # an unknown Last-Event-ID: replay from the start
            seq, recs = await run_in_threadpool(ctx.store.events_for_follower, job_id,
                                                limit=CATCH_UP_PAGE)
        after, after_seq = None, (recs[-1].seq if recs else seq)
        yield after_seq, recs
        if len(recs) < CATCH_UP_PAGE:
            return


async def _follow(ctx: AppContext, job_id: str, sub: Subscription,
                  last_id: Optional[str]) -> AsyncIterator[bytes]:
    """Every event after `last_id` (all, without one), oldest first, then each new one as it
    is written; ends once the job is finished and its trailing events are sent.

    The subscription was taken before the one catch-up read from the database, so an event
    written meanwhile is both read and queued: positions (`seq`) drop such duplicates, and
    nothing written after the subscription can be missed. After that the follower only waits
    on its queue: no database work while the job is quiet.
    """
    loop = asyncio.get_running_loop()
    yield b"retry: 2000\n\n"
    job = await run_in_threadpool(ctx.store.get_job, job_id)
    ended = job is None or job.status in TERMINAL
    last_seq = 0
    async for last_seq, recs in _catch_up(ctx, job_id, last_id, 0):
        for r in recs:
            yield _sse(convert.event(r))
    last_sent = last_polled = loop.time()
    # Once the job ended: stop after `sse_linger` quiet seconds (the pool writes its last
    # event — "Training finished", "Job cancelled" — just after the final status).
    deadline = loop.time() + ctx.sse_linger if ended else None
    poll = ctx.sse_fallback_poll
    while True:
        now = loop.time()
        timeout = ctx.sse_keepalive - (now - last_sent)
        if poll:
            timeout = min(timeout, poll - (now - last_polled))
        if deadline is not None:
            timeout = min(timeout, deadline - now)
        try:
            item = await sub.get(max(0.0, timeout))
        except SlowConsumer as exc:
            yield _sse_error(str(exc), "slow_consumer")
            return
        except TimeoutError:
            now = loop.time()
            if deadline is not None and now >= deadline:
                return
            if poll and now - last_polled >= poll:
                # Another process may write this database: look once per `poll` seconds.
                last_polled = now
                async for last_seq, recs in _catch_up(ctx, job_id, None, last_seq):
                    for r in recs:
                        yield _sse(convert.event(r))
                        last_sent = loop.time()
                job = await run_in_threadpool(ctx.store.get_job, job_id)
                if deadline is None and (job is None or job.status in TERMINAL):
                    deadline = loop.time() + ctx.sse_linger
            if loop.time() - last_sent >= ctx.sse_keepalive:
                yield b": keep-alive\n\n"
                last_sent = loop.time()
            continue
        if isinstance(item, EventRecord):
            if item.seq <= last_seq:  # already sent by the catch-up read
                continue
            last_seq = item.seq
            yield _sse(convert.event(item))
            last_sent = loop.time()
            if deadline is not None:
                deadline = last_sent + ctx.sse_linger
        elif isinstance(item, JobStatusChange) and item.terminal and deadline is None:
            deadline = loop.time() + ctx.sse_linger


class _EventStream(StreamingResponse):
    """The SSE response: gives its tenant's stream slot and its subscription back however it
    ends, and cuts off a dropped follower that does not read its last message in time (a
    client that stopped reading would otherwise hold the connection forever)."""

    def __init__(self, content: AsyncIterator[bytes], *, sub: Subscription, grace: float,
                 on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._sub = sub
        self._grace = grace
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def cut_off_when_dropped() -> None:
                    await self._sub.dropped_event.wait()
                    await anyio.sleep(self._grace)
                    tg.cancel_scope.cancel()

                tg.start_soon(cut_off_when_dropped)
                await super().__call__(scope, receive, send)
                tg.cancel_scope.cancel()
        finally:
            self._sub.close()
            self._on_close()


@router.get("/{job_id}/events", response_model=ListResponse[JobEvent])
async def list_events(
    job_id: str,
    after: Optional[str] = None,
    limit: int = Query(20, ge=1, le=100),
    stream: bool = False,
    last_event_id: Optional[str] = Header(None, alias="Last-Event-ID"),
    owner: str = Depends(tenant),
    ctx: AppContext = Depends(context),
) -> Any:
    await run_in_threadpool(_own_job, ctx, job_id, owner)
    if not stream:
        return await run_in_threadpool(_page_events, ctx, job_id, after, limit)
    ctx.limits.open_stream(owner)  # a 429 when the tenant has too many open
    try:
        # Subscribed before the catch-up read (see _follow), here on the event loop.
        sub = ctx.hub.subscribe(f"job:{job_id}")
    except BaseException:
        ctx.limits.close_stream(owner)
        raise
    return _EventStream(_follow(ctx, job_id, sub, last_event_id or after), sub=sub,
                        grace=ctx.sse_drop_grace,
                        on_close=lambda: ctx.limits.close_stream(owner))


@router.get("/{job_id}/checkpoints", response_model=ListResponse[JobCheckpoint])
def list_checkpoints(
    job_id: str,
    after: Optional[str] = None,
    limit: int = Query(10, ge=1, le=100),
    owner: str = Depends(tenant),
    ctx: AppContext = Depends(context),
) -> Any:
    job = _own_job(ctx, job_id, owner)
    recs = sorted(ctx.store.list_checkpoints(job_id), key=lambda c: c.step, reverse=True)
    return convert.slice_page([convert.checkpoint(c, job) for c in recs], after, limit,
                              "checkpoint")


@router.get("/{job_id}/checkpoints/{checkpoint_id}/download")
def download_checkpoint(job_id: str, checkpoint_id: str, owner: str = Depends(tenant),
                        ctx: AppContext = Depends(context)) -> Any:
    from .archive import folder_archive_response

    job = _own_job(ctx, job_id, owner)
    ckpt = ctx.store.get_checkpoint(checkpoint_id)
    if ckpt is None or ckpt.job_id != job.id:
        raise not_found("checkpoint", checkpoint_id)
    meta = {"checkpoint_id": ckpt.id, "job_id": job.id, "step": ckpt.step,
            "base_model": job.model, "base_model_sha256": job.model_sha256,
            "metrics": ckpt.metrics, "spec": job.spec}
    return folder_archive_response(ctx.artifacts, ckpt.artifact_id, meta,
                                   f"{job.id}-step-{ckpt.step}.tar.gz")
