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
- placement: the worker registers with its NodeAgent like a job runner (`register_job`) and
  reserves the memory of the bases it holds plus decoding headroom, so the scheduler sees that
  memory as taken; when the owner reclaims the node, the agent asks it to stop and it unloads
  everything;
- every failure comes back as data ({"error": {...}}), never as a pickled exception.

The reply streams through a Ray streaming generator (`num_returns="streaming"`): first
{"ready": True, "prompt_tokens"} once the base and adapter are loaded and the prompt checked
(or {"error": ...} if they could not be), then the library's chunks as dicts.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
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
        self._reserved = 0
        self._active: set[str] = set()  # request ids generating now
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
    def pid(self) -> int:
        return os.getpid()

    def loaded(self) -> dict[str, Any]:
        return {"bases": self.engine.cache.keys(), "bytes": self.engine.cache.total_bytes,
                "reserved": self._reserved, "loads": self.engine.cache.loads,
                "active": len(self._active), "cancelled": self.cancelled}

    def cancel(self, request_id: str) -> None:
        """The caller left (an HTTP client disconnected): stop generating for it. Ray would
        otherwise run the generator to max_tokens, holding the base's lock all along."""
        with self._lock:
            if request_id in self._active:
                self._cancelled.add(request_id)

    def request_stop(self, reason: str = "") -> None:
        """The owner reclaimed the node: let every base go and give the memory back."""
        log.info("inference worker on %s unloads: %s", self.node, reason)
        self.engine.cache.clear()
        self._reserve()

    def _reserve(self) -> None:
        """Tell the NodeAgent how much memory this worker holds (0: none, unregistered)."""
        held = self.engine.cache.total_bytes
        want = int(held * (1 + HEADROOM_RATIO)) + HEADROOM_BYTES if held else 0
        with self._lock:
            if want == self._reserved or not self.agent:
                return
            self._reserved = want
        try:
            agent = ray.get_actor(self.agent, namespace=NAMESPACE)
            job_id = f"{WORKER_PREFIX}{self.node}"
            if want:
                me = ray.get_runtime_context().current_actor
                ray.get(agent.register_job.remote(job_id, me, want), timeout=30)
            else:
                ray.get(agent.unregister_job.remote(job_id), timeout=30)
        except Exception:
            log.exception("could not update the inference reservation on %s", self.node)

    # -- generation -------------------------------------------------------------------------
    def generate(self, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Streaming: {"ready", "prompt_tokens"} or {"error"}, then chunk dicts."""
        from ..infer import InferenceError

        try:
            engine, job = self.engine, self._prepare(request)
        except InferenceError as exc:
            yield {"error": exc.to_dict()}
            return
        except Exception as exc:
            log.exception("inference on %s could not start", self.node)
            yield _error(500, "internal_error", f"could not start: {type(exc).__name__}: {exc}")
            return
        self._reserve()
        rid = str(request.get("request_id") or id(request))
        with self._lock:
            self._active.add(rid)
        try:
            yield {"ready": True, "prompt_tokens": job.prompt_tokens}
            for chunk in engine.run(job):
                if rid in self._cancelled:
                    self.cancelled += 1
                    break  # closing engine.run releases the base
                yield chunk.to_dict()
        except Exception as exc:
            log.exception("inference on %s failed", self.node)
            yield _error(500, "internal_error", f"generation failed: {type(exc).__name__}")
        finally:
            with self._lock:
                self._active.discard(rid)
                self._cancelled.discard(rid)

    def _prepare(self, request: dict[str, Any]):
        from ..infer import AdapterSource, SamplingParams, load_for_inference

        cache = self.work_dir / "cache"
        model = request["model"]
        model_dir = materialise(cache / "models", model["key"], model["files"], _fetch)
        folder = model_dir / model["entry"] if model.get("entry") else model_dir
        device = "cpu" if self.device_kind == "cpu" else "auto"

        def load():
            return load_for_inference(folder, device=device, cache_dir=cache,
                                      trust_remote_code=bool(request.get("trust_remote_code")))

        adapter = None
        if request.get("adapter"):
            a = request["adapter"]
            adapter = AdapterSource(a["key"], materialise(cache / "adapters", a["key"],
                                                          a["files"], _fetch))
        return self.engine.prepare(model["key"], load, params=SamplingParams(**request["params"]),
                                   adapter=adapter, messages=request.get("messages"),
                                   prompt=request.get("prompt"))


RemoteInferenceWorker = ray.remote(num_cpus=0, max_concurrency=4)(InferenceWorker)


class InferenceStream:
    """The head's end of one reply: `first` is the ready/error message, iterating gives the
    chunk dicts."""

    def __init__(self, gen: Any, node: Optional[str], timeout: float,
                 on_lost: Optional[Any] = None, worker: Any = None,
                 request_id: Optional[str] = None) -> None:
        self._gen = gen
        self._on_lost = on_lost
        self._worker = worker
        self._request_id = request_id
        self.node = node
        self._timeout = timeout
        self.first = self._next()

    def _next(self) -> Optional[dict[str, Any]]:
        ready, _ = ray.wait([self._gen], timeout=self._timeout)
        if not ready:
            return _error(504, "timeout", f"the node did not answer in {self._timeout:.0f} s")
        try:
            ref = next(self._gen)
        except StopIteration:
            return None
        try:
            return ray.get(ref)
        except ray.exceptions.RayError as exc:  # the node or the worker died under it
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
                return

    def cancel(self) -> None:
        """Ask the worker to stop generating this reply (the caller is gone)."""
        if self._worker is not None and self._request_id is not None:
            try:
                self._worker.cancel.remote(self._request_id)
            except Exception:  # the worker is gone: nothing left to stop
                pass


class InferencePool:
    """Head side: the node for a request (one that holds the base, else the accepting node with
    the most free memory), its worker (started on first use) and the request's inputs."""

    def __init__(self, artifacts: Any, models: Optional[ModelObjects] = None, *,
                 max_models_per_node: int = 2, timeout: float = 600.0) -> None:
        self.artifacts = artifacts
        self.models = models or ModelObjects(max_models=2)
        self.max_models_per_node = max_models_per_node
        self.timeout = timeout
        self._homes: dict[str, str] = {}  # base sha256 → the node that last loaded it
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
                   "trust_remote_code": bool(getattr(model, "trust_remote_code", False)),
                   "adapter": self._adapter_payload(adapter) if adapter is not None else None,
                   "params": params, "messages": messages, "prompt": prompt}
        gen = worker.generate.options(num_returns="streaming").remote(request)
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
        for name, ref in refs.items():
            if ref in ready:
                try:
                    reports[name] = ray.get(ref)
                except Exception:
                    continue
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

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(())

    def cancel(self) -> None:
        pass
