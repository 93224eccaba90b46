"""/v1/chat/completions and /v1/completions: OpenAI's request and response shapes, streamed
(server-sent events, `data: {chunk}` … `data: [DONE]`) or not.

`model` is an adapter id (the caller's own or one shared with it; any other id answers the same
404 as an adapter that does not exist) or a registered base model's name. Generation runs on
the pool (`pool.inference`); every problem the node finds before the first token — a prompt
longer than the context, an adapter it refuses — still becomes a proper 4xx, because the
response starts only once the node said it is ready.

A tenant has at most `LORAPOOL_MAX_CHATS_PER_TENANT` generations in flight (limits.py): one
more answers 429 with Retry-After, so no tenant can keep every inference worker busy. The slot
is given back when the reply ends however it ends: finished, failed, or its client left (a
streamed reply's client leaving also cancels the generation on the node, see
`_ChatStreamResponse`).
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Iterator, Optional, Union

from fastapi import APIRouter, Body, Depends
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from ..store import new_id
from .access import require_tasks, visible_adapter
from .context import AppContext, context, tenant
from .errors import APIError, bad_request

router = APIRouter(prefix="/v1", tags=["chat"])

ADAPTER_ID_PREFIX = "ft-"
DEFAULT_MAX_TOKENS = 256


class _Common(BaseModel):
    # OpenAI clients send fields we do not use (user, metadata, logit_bias …): ignore them.
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    stop: Union[None, str, list[str]] = None
    seed: Optional[int] = None
    stream: Optional[bool] = False
    stream_options: Optional[dict[str, Any]] = None
    n: Optional[int] = None


class ChatRequest(_Common):
    messages: Any  # checked by service.infer, which names the message at fault


class CompletionRequest(_Common):
    prompt: Any


def _params(req: _Common) -> dict[str, Any]:
    from ..infer.errors import InvalidRequest
    from ..infer.params import SamplingParams

    if req.n not in (None, 1):
        raise bad_request("only n=1 is supported", param="n")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None \
        else req.max_tokens
    params = {"max_tokens": DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
              "temperature": 1.0 if req.temperature is None else req.temperature,
              "top_p": 1.0 if req.top_p is None else req.top_p,
              "stop": SamplingParams.stops(req.stop), "seed": req.seed}
    try:
        SamplingParams(**params)
    except InvalidRequest as exc:
        field = "max_completion_tokens" if (exc.param == "max_tokens"
                                            and req.max_completion_tokens is not None) \
            else exc.param
        raise bad_request(exc.message, param=field) from exc
    params["stop"] = list(params["stop"])
    return params


def _resolve(ctx: AppContext, name: str, who: str) -> tuple[Any, Any]:
    """(base model entry, adapter record or None) for the request's `model`."""
    base = ctx.store.get_model(name)
    if base is not None:
        return base, None
    if not name.startswith(ADAPTER_ID_PREFIX):
        raise bad_request(f"model '{name}' is neither a registered base model nor an adapter "
                          "id", param="model")
    adapter = visible_adapter(ctx, name, who, param="model")
    base = ctx.store.get_model(adapter.base_model)
    if base is None:
        raise APIError(409, f"adapter '{name}' belongs to base model '{adapter.base_model}', "
                       "which is no longer registered", param="model", code="model_not_found")
    if adapter.base_model_sha256 and base.sha256 != adapter.base_model_sha256:
        raise APIError(409, f"base model '{base.name}' was registered again with other weights "
                       f"since adapter '{name}' was trained", param="model",
                       code="model_changed")
    return base, adapter


_pool_lock = threading.Lock()


def _pool(ctx: AppContext) -> Any:
    """The app's InferencePool, made on first use; it shares the task loop's model objects."""
    require_tasks(ctx, "chat completions")
    with _pool_lock:
        pool = getattr(ctx, "_inference_pool", None)
        if pool is None:
            from ..pool.inference import InferencePool

            pool = InferencePool(ctx.artifacts, getattr(ctx.tasks, "models", None))
            ctx._inference_pool = pool  # type: ignore[attr-defined]
    return pool


class _ChatSlot:
    """The tenant's in-flight slot for one reply; `release()` gives it back once."""

    def __init__(self, ctx: AppContext, tenant: str) -> None:
        ctx.limits.open_chat(tenant)  # the 429 when the tenant is at its limit
        self._ctx, self._tenant = ctx, tenant
        self._lock = threading.Lock()
        self._held = True

    def release(self) -> None:
        with self._lock:
            held, self._held = self._held, False
        if held:
            self._ctx.limits.close_chat(self._tenant)


async def _begin(ctx: AppContext, req: _Common, who: str,
                 **inputs: Any) -> tuple[Any, _ChatSlot]:
    """The reply's stream (its first message checked) and the slot it holds."""
    slot = _ChatSlot(ctx, who)
    try:
        stream, _ = await run_in_threadpool(_start, ctx, req, who, **inputs)
    except BaseException:
        slot.release()
        raise
    return stream, slot


async def _whole(stream: Any, slot: _ChatSlot) -> tuple[str, dict]:
    try:
        return await run_in_threadpool(_collect, stream)
    finally:
        slot.release()


class _ChatStreamResponse(StreamingResponse):
    """An SSE reply that, however it ends, stops the node if the reply was not read to its
    end (the client left) and gives the tenant's slot back. Not a background task: Starlette
    skips those when the client disconnects (ASGI 2.4 raises ClientDisconnect from send), and
    the body iterator is only closed whenever it is garbage collected."""

    def __init__(self, content: Any, stream: Any, slot: _ChatSlot) -> None:
        super().__init__(content, media_type="text/event-stream", headers=_SSE_HEADERS)
        self._stream, self._slot = stream, slot

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await run_in_threadpool(self._stream.cancel)  # a no-op once it ended
            finally:
                self._slot.release()


def _start(ctx: AppContext, req: _Common, who: str, **inputs: Any) -> tuple[Any, dict]:
    params = _params(req)
    base, adapter = _resolve(ctx, req.model, who)
    stream = _pool(ctx).start(base, adapter, params=params, **inputs)
    first = stream.first or {"error": {"status": 502, "code": "no_answer",
                                       "message": "the node returned nothing"}}
    if "error" in first:
        e = first["error"]
        status = int(e.get("status") or 500)
        param = e.get("param")
        if param == "max_tokens" and req.max_completion_tokens is not None:
            param = "max_completion_tokens"
        raise APIError(status, str(e.get("message")), param=param, code=e.get("code"))
    return stream, first


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _collect(stream: Any) -> tuple[str, dict]:
    parts, last = [], {}
    for item in stream:
        if "error" in item:
            e = item["error"]
            raise APIError(int(e.get("status") or 500), str(e.get("message")),
                           code=e.get("code"))
        parts.append(item.get("text") or "")
        last = item
    return "".join(parts), last


def _stream_events(stream: Any, make_chunk, include_usage: bool,
                   first_chunk: Optional[dict] = None) -> Iterator[str]:
    """SSE lines from the node's chunks; a failure mid-stream is one error event, then end.
    Closed early (the client went away), it asks the node to stop generating."""
    finished = False
    try:
        if first_chunk is not None:
            yield _sse(first_chunk)
        for item in stream:
            if "error" in item:
                yield _sse({"error": {k: v for k, v in item["error"].items() if k != "status"}})
                break
            finish = item.get("finish_reason")
            if item.get("text"):
                yield _sse(make_chunk(text=item["text"], finish=None))
            if finish:
                yield _sse(make_chunk(text=None, finish=finish))
                if include_usage and item.get("usage"):
                    yield _sse(make_chunk(text=None, finish=None, usage=item["usage"]))
        finished = True
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            stream.cancel()


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.post("/chat/completions")
async def chat_completions(req: ChatRequest = Body(...), ctx: AppContext = Depends(context),
                           who: str = Depends(tenant)) -> Any:
    stream, slot = await _begin(ctx, req, who, messages=req.messages)
    ident, created = new_id("chatcmpl"), int(time.time())
    if not req.stream:
        text, last = await _whole(stream, slot)
        return JSONResponse({
            "id": ident, "object": "chat.completion", "created": created, "model": req.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text,
                                                  "refusal": None},
                         "logprobs": None, "finish_reason": last.get("finish_reason")}],
            "usage": last.get("usage")})

    def chunk(text: Optional[str], finish: Optional[str], usage: Optional[dict] = None,
              role: bool = False) -> dict:
        delta: dict[str, Any] = {}
        if role:
            delta = {"role": "assistant", "content": ""}
        elif text is not None:
            delta = {"content": text}
        choices = [] if usage else [{"index": 0, "delta": delta, "logprobs": None,
                                     "finish_reason": finish}]
        out = {"id": ident, "object": "chat.completion.chunk", "created": created,
               "model": req.model, "system_fingerprint": None, "choices": choices}
        if usage:
            out["usage"] = usage
        return out

    include_usage = bool((req.stream_options or {}).get("include_usage"))
    return _ChatStreamResponse(
        _stream_events(stream, chunk, include_usage, chunk(None, None, role=True)),
        stream, slot)


@router.post("/completions")
async def completions(req: CompletionRequest = Body(...), ctx: AppContext = Depends(context),
                      who: str = Depends(tenant)) -> Any:
    prompt = req.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # OpenAI's list form, one prompt
    if not isinstance(prompt, str) or not prompt:
        raise bad_request("prompt must be a non-empty string (one prompt per request)",
                          param="prompt")
    stream, slot = await _begin(ctx, req, who, prompt=prompt)
    ident, created = new_id("cmpl"), int(time.time())
    if not req.stream:
        text, last = await _whole(stream, slot)
        return JSONResponse({
            "id": ident, "object": "text_completion", "created": created, "model": req.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "text": text, "logprobs": None,
                         "finish_reason": last.get("finish_reason")}],
            "usage": last.get("usage")})

    def chunk(text: Optional[str], finish: Optional[str], usage: Optional[dict] = None) -> dict:
        out = {"id": ident, "object": "text_completion", "created": created,
               "model": req.model, "system_fingerprint": None,
               "choices": [] if usage else [{"index": 0, "text": text or "", "logprobs": None,
                                             "finish_reason": finish}]}
        if usage:
            out["usage"] = usage
        return out

    include_usage = bool((req.stream_options or {}).get("include_usage"))
    return _ChatStreamResponse(_stream_events(stream, chunk, include_usage), stream, slot)
