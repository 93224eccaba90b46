"""What `/metrics` reports to Prometheus, gathered with prometheus-client.

Three sources, each the cheapest place that knows:

- the database, read when Prometheus scrapes (`StateCollector`): jobs by state and tenant, the
  queue's length and how long its jobs waited, so the numbers survive a restart and match
  what the API lists;
- the executor's node list, also at scrape time: nodes by state, and each node's total, free
  and promised (reserved for placed jobs) GPU memory;
- the store's change feed (`ServiceMetrics.listen`): step events give step time and tokens/s
  as they happen, with no database work per step;
- a middleware (`LatencyMiddleware`): API latency by method, route *template* and status, so
  `/v1/fine_tuning/jobs/{job_id}` is one series however many jobs there are.

Each app has its own registry (tests build many apps in one process).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterable, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ..store.records import EventRecord, JobStatusChange
from ..store.schema import JobRow

# Seconds a job waits in the queue: from an instant placement to an overnight wait.
QUEUE_WAIT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600)
# Seconds per optimizer step: a tiny CPU model to a big model on a small card.
STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServiceMetrics:
    """The app's registry and the metrics that are observed as things happen."""

    def __init__(self, store: Any, nodes: Callable[[], Iterable[Any]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.http_latency = Histogram(
            "lorapool_http_request_duration_seconds", "API latency by route template",
            ["method", "route", "status"], registry=self.registry)
        self.step_seconds = Histogram(
            "lorapool_train_step_seconds", "Wall time between a job's step events, per step",
            buckets=STEP_BUCKETS, registry=self.registry)
        self.steps = Counter("lorapool_train_steps", "Optimizer steps reported by jobs",
                             registry=self.registry)
        self._lock = threading.Lock()
        # job id → (monotonic time, step) of its last step event, and its last tokens/s.
        self._last_step: dict[str, tuple[float, int]] = {}
        self._tokens_per_s: dict[str, float] = {}
        self.registry.register(StateCollector(store, nodes, self._running_throughput))

    def listen(self, topic: str, item: Any) -> None:
        """A store listener (runs on the writer's thread: dictionary work only)."""
        if isinstance(item, JobStatusChange):
            if item.terminal:
                with self._lock:
                    self._last_step.pop(item.job_id, None)
                    self._tokens_per_s.pop(item.job_id, None)
            return
        if not isinstance(item, EventRecord) or item.type != "metrics" or not item.data:
            return
        data = item.data
        step = data.get("step")
        if "train_loss" not in data or not isinstance(step, int):
            return  # a validation event: no step was taken
        now = time.monotonic()
        self.steps.inc()
        with self._lock:
            last = self._last_step.get(item.job_id)
            self._last_step[item.job_id] = (now, step)
            tps = data.get("tokens_per_s")
            if isinstance(tps, (int, float)):
                self._tokens_per_s[item.job_id] = float(tps)
        if last is not None and step > last[1]:
            self.step_seconds.observe((now - last[0]) / (step - last[1]))

    def _running_throughput(self) -> dict[str, float]:
        with self._lock:
            return dict(self._tokens_per_s)


class StateCollector:
    """Read at scrape time: jobs and queue from the database, nodes from the executor."""

    def __init__(self, store: Any, nodes: Callable[[], Iterable[Any]],
                 throughput: Callable[[], dict[str, float]]) -> None:
        self.store = store
        self.nodes = nodes
        self.throughput = throughput

    def describe(self) -> list[Metric]:
        return []  # names are known only when collected; nothing to check at registration

    def collect(self) -> Iterable[Metric]:
        yield from self._jobs()
        yield from self._nodes()
        tps = GaugeMetricFamily("lorapool_job_tokens_per_second",
                                "Training throughput of each running job (last step event)",
                                labels=["job"])
        for job_id, value in sorted(self.throughput().items()):
            tps.add_metric([job_id], value)
        yield tps

    def _jobs(self) -> Iterable[Metric]:
        now = time.time()
        with Session(self.store.engine) as s:
            counts = s.execute(select(JobRow.status, JobRow.tenant, func.count())
                               .group_by(JobRow.status, JobRow.tenant)).all()
            queued_since = list(s.scalars(select(JobRow.created_at)
                                          .where(JobRow.status == "queued")))
            waits = [started - created for created, started in s.execute(
                select(JobRow.created_at, JobRow.started_at)
                .where(JobRow.started_at.is_not(None)))]
        jobs = GaugeMetricFamily("lorapool_jobs", "Fine-tuning jobs by state and tenant",
                                 labels=["state", "tenant"])
        for status, tenant, n in sorted(counts):
            jobs.add_metric([status, tenant], n)
        yield jobs
        yield GaugeMetricFamily("lorapool_queue_length", "Jobs waiting for a node",
                                value=len(queued_since))
        yield GaugeMetricFamily("lorapool_queue_oldest_wait_seconds",
                                "How long the longest-waiting queued job has waited",
                                value=max((now - c for c in queued_since), default=0.0))
        yield _histogram("lorapool_queue_wait_seconds",
                         "Time from submission to start, of every job that started",
                         [max(0.0, float(w)) for w in waits], QUEUE_WAIT_BUCKETS)

    def _nodes(self) -> Iterable[Metric]:
        nodes = list(self.nodes())
        by_state = GaugeMetricFamily("lorapool_nodes", "Nodes in the pool by state",
                                     labels=["state"])
        states: dict[str, int] = {s: 0 for s in ("idle", "training", "reclaimed", "offline")}
        for n in nodes:
            states[n.state] = states.get(n.state, 0) + 1
        for state, count in sorted(states.items()):
            by_state.add_metric([state], count)
        yield by_state
        memory = GaugeMetricFamily(
            "lorapool_node_memory_bytes",
            "GPU memory of each node: total, free (as the device reports it) and promised "
            "(reserved for jobs placed there)", labels=["node", "kind"])
        for n in nodes:
            memory.add_metric([n.name, "total"], n.total_memory_bytes)
            memory.add_metric([n.name, "free"], n.free_memory_bytes)
            memory.add_metric([n.name, "promised"], n.reserved_memory_bytes)
        yield memory
        yield GaugeMetricFamily("lorapool_pool_free_memory_bytes",
                                "Free GPU memory over all nodes not offline",
                                value=sum(n.free_memory_bytes for n in nodes
                                          if n.state != "offline"))
        yield GaugeMetricFamily("lorapool_pool_promised_memory_bytes",
                                "GPU memory promised to placed jobs over all nodes",
                                value=sum(n.reserved_memory_bytes for n in nodes))


def _histogram(name: str, doc: str, values: list[float],
               bounds: tuple[float, ...]) -> HistogramMetricFamily:
    """A histogram family from raw values (cumulative buckets, +Inf last)."""
    buckets = [(_bound(b), sum(1 for v in values if v <= b)) for b in bounds]
    buckets.append(("+Inf", len(values)))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=float(sum(values)))


def _bound(b: float) -> str:
    return str(float(b))


class RouteTemplates:
    """Request path → the template of the route that serves it ("/v1/fine_tuning/jobs/{job_id}").

    The templates are the app's OpenAPI paths (public, full paths including router prefixes)
    plus `extra` ones the schema leaves out; matched in the schema's order, as the router does.
    Built on first use, once every router is included.
    """

    def __init__(self, app: Any, extra: Iterable[str] = ()) -> None:
        self.app = app
        self.extra = list(extra)
        self._compiled: Optional[list[tuple[Any, str]]] = None

    def _build(self) -> list[tuple[Any, str]]:
        from starlette.routing import compile_path

        paths = list(self.app.openapi().get("paths", {})) + self.extra
        return [(compile_path(p)[0], compile_path(p)[1]) for p in paths]

    def __call__(self, path: str) -> str:
        if self._compiled is None:
            self._compiled = self._build()
        for regex, template in self._compiled:
            if regex.match(path):
                return template
        return "(unmatched)"  # never the raw path: unknown URLs must not grow the series


class LatencyMiddleware:
    """Pure ASGI middleware timing each HTTP request; labels by the route's template."""

    def __init__(self, app: Any, metrics: Optional[ServiceMetrics] = None,
                 templates: Optional[Callable[[str], str]] = None) -> None:
        self.app = app
        self.metrics = metrics
        self.templates = templates

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.metrics is None or self.templates is None:
            await self.app(scope, receive, send)
            return
        route = self.templates(scope["path"])
        start = time.perf_counter()
        status = {"code": 500}  # what a request that raised past every handler amounts to

        async def send_wrapper(message: Any) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            # Streams (SSE) count until they end; their latency is their duration.
            self.metrics.http_latency.labels(
                scope.get("method", ""), route, str(status["code"]),
            ).observe(time.perf_counter() - start)
