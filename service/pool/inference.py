"""Chat completions on the pool: one long-lived `InferenceWorker` actor per node, and the head's
`InferencePool` that picks the node, ships the inputs and streams the reply back.

Why an actor and not a task like merges and evaluations (tasks.py): a base takes seconds to
load and most of a node's memory, so it must outlive one request; the worker keeps bases in
`service.infer`'s LRU and swaps adapters on them. It is created lazily, the first time a
request is placed on its node, pinned there, and named `lorapool-infer:<node>`.

The same rules as every job:
- no shared disk: the base and the adapter travel as ObjectRefs (the base through the
  scheduler's shared `ModelObjects`, the adapter's files read from the artifact store) and are
  materialised in the node's own working folder by content id;
- placement: the worker registers with its NodeAgent like a job runner (`register_job`, the
  same reservation ledger the scheduler's node reports come from) and reserves the memory of
  the bases it holds plus decoding headroom, so the scheduler sees that memory as taken. A base
  about to load is reserved *before* it loads (an estimate from its size on disk), corrected to
  its measured size once loaded, and dropped when the LRU evicts it. It takes no CPU slot of
  the node (`slot=False`): an idle loaded base holds memory, not cores, and a one-slot CPU node
  must still train. When the owner reclaims the node, the agent asks it to stop and it unloads
  everything; a reclaimed node refuses new loads (503);
- every failure comes back as data ({"error": {...}}), never as a pickled exception.

The reply streams through a Ray streaming generator (`num_returns="streaming"`): first
{"ready": True, "prompt_tokens"} once the base and adapter are loaded and the prompt checked
(or {"error": ...} if they could not be), then the library's chunks as dicts. The generator is
backpressured (`_generator_backpressure_num_objects=STREAM_BUFFER`): a slow reader stops the
node a few chunks ahead instead of letting it buffer the whole answer. A reader that leaves
cancels the generator (`ray.cancel`), which closes it on the node at its next yield and frees
the base at once; merely dropping the generator would not (Ray then lifts the backpressure and
the node runs on to max_tokens).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Optional

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .agent import NAMESPACE, agent_name, list_agents
from .model_objects import ModelObjects
from .transfer import materialise

log = logging.getLogger("lorapool.pool.inference")

WORKER_PREFIX = "lorapool-infer:"
# Decoding's own memory beyond the weights (KV cache, logits, activations of one request).
HEADROOM_BYTES = 256 * 1024**2
HEADROOM_RATIO = 0.2
# A base on the CPU loads unquantised (fp32 from bf16 weights on disk: about twice its file
# size); on a GPU in 4-bit, less than its file. The estimate reserved while it loads.
CPU_LOAD_FACTOR = 2.0
GPU_LOAD_FACTOR = 1.0
# Chunks the node may run ahead of the head's reader before its generator blocks.
STREAM_BUFFER = 8
REPORT_MAX_AGE_S = 60.0  # how long a node's last report may stand in for a late one


class _NotAccepting(Exception):
    """The NodeAgent refused the reservation (the node was reclaimed meanwhile)."""


def _ray_cancelled() -> bool:
    """Whether `ray.cancel` was called on the actor task running in this thread."""
    if not ray.is_initialized():  # a unit test drives the worker directly (and
        return False  # get_runtime_context() would start a Ray instance)
    try:
        return bool(ray.get_runtime_context().is_canceled())
    except Exception:  # not inside a Ray task
        return False


def _fetch(value: Any) -> bytes:
    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def _error(status: int, code: str, message: str, param: Optional[str] = None) -> dict:
    return {"error": {"status": status, "code": code, "message": message, "param": param}}


class InferenceWorker:
    """See the module docstring. A threaded actor: one request per base at a time (the base's
    lock), requests on other bases in parallel."""

    def __init__(self, node: str, agent: Optional[str], *, max_models: int = 2,
                 max_bytes: Optional[int] = None) -> None:
        from ..infer import InferenceEngine

        self.node = node
        self.agent = agent
        self.work_dir, self.device_kind = self._local_config()
        self.engine = InferenceEngine(max_models=max_models, max_bytes=max_bytes)
        self._lock = threading.Lock()
        # Serialises reservation updates end to end (compute, then tell the agent), so two
        # requests never land their updates out of order.
        self._ledger = threading.Lock()
        self._reserved = 0
        self._loading = 0  # bytes of bases being loaded now (reserved ahead of the load)
        self._active: dict[str, int] = {}  # request id in flight → chunks yielded so far
        self._cancelled: set[str] = set()
        self.cancelled = 0  # replies stopped early because their caller left

    def _local_config(self) -> tuple[Path, str]:
        if self.agent:
            try:
                handle = ray.get_actor(self.agent, namespace=NAMESPACE)
                local = ray.get(handle.local_config.remote(), timeout=30)
                return Path(local["work_dir"]), str(local.get("device_kind") or "cpu")
            except Exception:  # no agent: this machine's temp folder, CPU
                pass
        return Path(tempfile.gettempdir()) / "lorapool-infer", "cpu"

    # -- what the NodeAgent and the head ask ------------------------------------------------
    def pid(self, node: Optional[str] = None) -> int:
        """This worker's process (the NodeAgent asks, naming its node, as it asks runners)."""
        return os.getpid()

    def loaded(self) -> dict[str, Any]:
        with self._lock:
            yielded = dict(self._active)
        return {"bases": self.engine.cache.keys(), "bytes": self.engine.cache.total_bytes,
                "reserved": self._reserved, "loading": self._loading,
                "loads": self.engine.cache.loads, "active": len(yielded),
                "yielded": yielded, "cancelled": self.cancelled}

    def cancel(self, request_id: str) -> None:
        """The caller left (an HTTP client disconnected): stop generating for it. Ray would
        otherwise run the generator to max_tokens, holding the base's lock all along."""
        with self._lock:
            if request_id in self._active:
                self._cancelled.add(request_id)

    def request_stop(self, reason: str = "", node: Optional[str] = None) -> None:
        """The owner reclaimed the node: let every base go and give the memory back."""
        log.info("inference worker on %s unloads: %s", self.node, reason)
        self.engine.cache.clear()
        self._reserve()

    def _want(self) -> int:
        held = self.engine.cache.total_bytes + self._loading
        return int(held * (1 + HEADROOM_RATIO)) + HEADROOM_BYTES if held else 0

    def _reserve(self) -> bool:
        """Tell the NodeAgent how much memory this worker holds or is loading (0: none, and
        unregistered). False when the agent refused (the node was reclaimed)."""
        with self._ledger:
            want = self._want()
            if want == self._reserved or not self.agent:
                self._reserved = want
                return True
            try:
                agent = ray.get_actor(self.agent, namespace=NAMESPACE)
                job_id = f"{WORKER_PREFIX}{self.node}"
                if want:
                    me = ray.get_runtime_context().current_actor
                    ok = ray.get(agent.register_job.remote(job_id, me, want, slot=False),
                                 timeout=30)
                else:
                    ray.get(agent.unregister_job.remote(job_id), timeout=30)
                    ok = True
            except Exception:
                log.exception("could not update the inference reservation on %s", self.node)
                return True  # the agent is unreachable: serve; its next report will tell
            if ok:
                self._reserved = want
            return bool(ok)

    # -- generation -------------------------------------------------------------------------
    def generate(self, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Streaming: {"ready", "prompt_tokens"} or {"error"}, then chunk dicts."""
        from ..infer import InferenceError

        rid = str(request.get("request_id") or uuid.uuid4().hex)
        with self._lock:
            self._active[rid] = 0
        run = None
        try:
            try:
                job = self._prepare(request)
            except InferenceError as exc:
                yield {"error": exc.to_dict()}
                return
            except _NotAccepting as exc:
                yield _error(503, "no_capacity", str(exc))
                return
            except Exception as exc:
                log.exception("inference on %s could not start", self.node)
                yield _error(500, "internal_error",
                             f"could not start: {type(exc).__name__}: {exc}")
                return
            yield {"ready": True, "prompt_tokens": job.prompt_tokens}
            run = self.engine.run(job)
            for chunk in run:
                if rid in self._cancelled or _ray_cancelled():
                    self.cancelled += 1
                    break  # closing engine.run releases the base
                with self._lock:
                    self._active[rid] += 1
                yield chunk.to_dict()
        except GeneratorExit:  # ray.cancel from the head: the generator is closed at a yield
            self.cancelled += 1
            raise
        except Exception as exc:
            log.exception("inference on %s failed", self.node)
            yield _error(500, "internal_error", f"generation failed: {type(exc).__name__}")
        finally:
            if run is not None:
                run.close()  # now, not at garbage collection: it holds the base's lock
            with self._lock:
                self._active.pop(rid, None)
                self._cancelled.discard(rid)

    def _prepare(self, request: dict[str, Any]):
        from ..infer import AdapterSource, SamplingParams, load_for_inference

        cache = self.work_dir / "cache"
        model = request["model"]
        model_dir = materialise(cache / "models", model["key"], model["files"], _fetch)
        folder = model_dir / model["entry"] if model.get("entry") else model_dir
        device = "cpu" if self.device_kind == "cpu" else "auto"
        factor = CPU_LOAD_FACTOR if self.device_kind == "cpu" else GPU_LOAD_FACTOR
        estimate = int(int(request.get("model_bytes") or 0) * factor)
        loading: list[Optional[int]] = [None]  # set once load() ran

        def load():
            # Reserved before the load starts, so a job placed meanwhile sees it taken.
            with self._lock:
                self._loading += estimate
            loading[0] = estimate
            if not self._reserve():
                raise _NotAccepting(f"node {self.node} was reclaimed by its owner and takes "
                                    "no new work")
            return load_for_inference(folder, device=device, cache_dir=cache,
                                      trust_remote_code=bool(request.get("trust_remote_code")))

        adapter = None
        if request.get("adapter"):
            a = request["adapter"]
            adapter = AdapterSource(a["key"], materialise(cache / "adapters", a["key"],
                                                          a["files"], _fetch))
        try:
            return self.engine.prepare(model["key"], load,
                                       params=SamplingParams(**request["params"]),
                                       adapter=adapter, messages=request.get("messages"),
                                       prompt=request.get("prompt"))
        finally:
            if loading[0] is not None:
                with self._lock:
                    self._loading -= loading[0]
                # The measured size now (the LRU may also have evicted a base), or back to
                # what is held when the load failed.
                self._reserve()


RemoteInferenceWorker = ray.remote(num_cpus=0, max_concurrency=4)(InferenceWorker)


class InferenceStream:
    """The head's end of one reply: `first` is the ready/error message, iterating gives the
    chunk dicts. `cancel()` stops the node's generation when the reader leaves early."""

    def __init__(self, gen: Any, node: Optional[str], timeout: float,
                 on_lost: Optional[Any] = None, worker: Any = None,
                 request_id: Optional[str] = None) -> None:
        self._gen = gen
        self._on_lost = on_lost
        self._worker = worker
        self._request_id = request_id
        self._done = False  # the node's generator ended (nothing left to cancel)
        self._cancel_lock = threading.Lock()
        self.node = node
        self._timeout = timeout
        self.first = self._next()
        if self.first is None or "error" in self.first:
            self._done = True

    def _next(self) -> Optional[dict[str, Any]]:
        ready, _ = ray.wait([self._gen], timeout=self._timeout)
        if not ready:
            return _error(504, "timeout", f"the node did not answer in {self._timeout:.0f} s")
        try:
            ref = next(self._gen)
        except StopIteration:
            self._done = True
            return None
        try:
            return ray.get(ref)
        except ray.exceptions.RayError as exc:  # the node or the worker died under it
            self._done = True
            if self._on_lost is not None:
                self._on_lost(self.node)
            return _error(503, "node_lost", f"the inference worker on {self.node or '?'} "
                          f"was lost ({type(exc).__name__})")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            item = self._next()
            if item is None:
                return
            yield item
            if "error" in item or item.get("finish_reason"):
                self._done = True
                return

    def cancel(self) -> None:
        """Stop the node generating this reply (the caller is gone); a no-op once it ended.
        `ray.cancel` closes the generator on the node at its next yield, even while it waits
        for this side to read (backpressure); the worker's own flag is the fallback for a
        worker busy between yields."""
        with self._cancel_lock:
            if self._done:
                return
            self._done = True
        try:
            ray.cancel(self._gen)
        except Exception:  # already finished, or the worker is gone
            pass
        if self._worker is not None and self._request_id is not None:
            try:
                self._worker.cancel.remote(self._request_id)
            except Exception:  # the worker is gone: nothing left to stop
                pass


class InferencePool:
    """Head side: the node for a request (one that holds the base, else the accepting node with
    the most free memory), its worker (started on first use) and the request's inputs."""

    def __init__(self, artifacts: Any, models: Optional[ModelObjects] = None, *,
                 max_models_per_node: int = 2, timeout: float = 600.0,
                 stream_buffer: int = STREAM_BUFFER) -> None:
        self.artifacts = artifacts
        self.stream_buffer = stream_buffer
        self.models = models or ModelObjects(max_models=2)
        self.max_models_per_node = max_models_per_node
        self.timeout = timeout
        self._homes: dict[str, str] = {}  # base sha256 → the node that last loaded it
        self._last_reports: dict[str, tuple[float, dict[str, Any]]] = {}  # node → (when, report)
        self._adapter_refs: OrderedDict[str, dict[str, Any]] = OrderedDict()
        # Held for the pool's life: Ray ends a non-detached actor once no handle is left.
        self._workers: dict[str, Any] = {}
        self._lock = threading.Lock()

    def start(self, model: Any, adapter: Any, *, params: dict[str, Any],
              messages: Optional[list] = None, prompt: Optional[str] = None) -> InferenceStream:
        """Start generating on the pool; `model` is the base's store entry, `adapter` the
        adapter's record or None."""
        node, node_id, need = self._pick_node(model)
        if node is None:
            return _Failed(_error(503, "no_capacity", need))
        worker = self._worker(node, node_id)
        request_id = uuid.uuid4().hex
        request = {"request_id": request_id, "model": self.models.payload(model),
                   "model_bytes": int(getattr(model, "bytes", 0) or 0),
                   "trust_remote_code": bool(getattr(model, "trust_remote_code", False)),
                   "adapter": self._adapter_payload(adapter) if adapter is not None else None,
                   "params": params, "messages": messages, "prompt": prompt}
        gen = worker.generate.options(
            num_returns="streaming",
            _generator_backpressure_num_objects=self.stream_buffer).remote(request)
        with self._lock:
            self._homes[model.sha256] = node
        return InferenceStream(gen, node, self.timeout, on_lost=self.forget, worker=worker,
                               request_id=request_id)

    def _adapter_payload(self, rec: Any) -> dict[str, Any]:
        with self._lock:
            refs = self._adapter_refs.get(rec.artifact_id)
            if refs is None:
                refs = {rel: ray.put(data)
                        for rel, data in self.artifacts.read_files(rec.artifact_id).items()}
                self._adapter_refs[rec.artifact_id] = refs
                while len(self._adapter_refs) > 32:
                    self._adapter_refs.popitem(last=False)
            self._adapter_refs.move_to_end(rec.artifact_id)
        return {"key": rec.artifact_id.replace(":", "-"), "files": refs}

    def _pick_node(self, model: Any) -> tuple[Optional[str], Optional[str], str]:
        """(node name, Ray node id, why none) for a request on `model`."""
        agents = list_agents()
        refs = {name: handle.report.remote() for name, handle in agents.items()}
        ready = ray.wait(list(refs.values()), num_returns=len(refs), timeout=5.0)[0] if refs \
            else []
        reports = {}
        now = time.monotonic()
        for name, ref in refs.items():
            if ref in ready:
                try:
                    reports[name] = ray.get(ref)
                except Exception:
                    continue
                with self._lock:
                    self._last_reports[name] = (now, reports[name])
            else:
                # A busy node answers late: its last report stands in for a while (a node that
                # was reclaimed since refuses the reservation, and the request gets a 503).
                with self._lock:
                    seen = self._last_reports.get(name)
                if seen is not None and now - seen[0] < REPORT_MAX_AGE_S:
                    reports[name] = seen[1]
        accepting = {n: r for n, r in reports.items() if r.get("accepting", True)}
        if not accepting:
            return None, None, "no node of the pool is accepting work right now"
        with self._lock:
            home = self._homes.get(model.sha256)
        if home in accepting:  # the base is (probably) loaded there: no load, no memory
            return home, accepting[home]["node_id"], ""
        # Weights on disk are a floor for what loading needs (a GGUF dequantises to more).
        need = int(getattr(model, "bytes", 0) or 0)
        fits = [(int(r.get("free_memory", 0)), n) for n, r in accepting.items()
                if int(r.get("free_memory", 0)) >= need]
        if not fits:
            return None, None, (f"no accepting node has {need / 1024**2:.0f} MiB free for "
                                f"model '{model.name}'")
        _, name = max(fits)
        return name, accepting[name]["node_id"], ""

    def _worker(self, node: str, node_id: str) -> Any:
        with self._lock:
            handle = self._workers.get(node)
        if handle is not None:
            return handle
        handle = RemoteInferenceWorker.options(
            name=WORKER_PREFIX + node, namespace=NAMESPACE, get_if_exists=True,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
        ).remote(node, agent_name(node), max_models=self.max_models_per_node)
        with self._lock:
            return self._workers.setdefault(node, handle)

    def forget(self, node: Optional[str]) -> None:
        """Drop a worker that died (its node left): the next request starts a new one."""
        with self._lock:
            if node is not None:
                self._workers.pop(node, None)
                self._homes = {k: v for k, v in self._homes.items() if v != node}


class _Failed(InferenceStream):
    """A request that never reached a node: only its error."""

    def __init__(self, error: dict[str, Any]) -> None:
        self.first = error
        self.node = None
        self._done = True

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(())

    def cancel(self) -> None:
        pass
