"""Wiring the service together: Ray, the store, the artifact folder, the scheduler and the API.

`Service` is the whole server as one object, used three ways: `lorapool serve` (blocking, until
SIGINT/SIGTERM), `lorapool demo`, and tests (as a context manager, with uvicorn in a thread on
a loopback port). With no Ray address it starts a local Ray head bound to 127.0.0.1 with the
dashboard and Ray's metrics off, and donates this machine as the first node of the pool; `stop()`
ends every process that head started, agents that outlived the raylet included. With a Ray address
it only connects, and ends nothing of that cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger("lorapool.server")


# Ports that neither the kernel hands out for port-0 binds and outgoing connections (its
# ephemeral range, 32768-60999 on Linux by default) nor Ray gives its workers (10002-19999 by
# default). A port picked from the ephemeral range before the embedded Ray head starts could be
# bound by one of Ray's own processes before the API binds it ("address already in use").
QUIET_PORTS = (20000, 32768)


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now that neither the kernel's ephemeral range nor Ray's worker
    ports contain (`QUIET_PORTS`), so the Ray head started next will not take it before the API
    binds it; the kernel's choice where none of those is free."""
    eph_lo, eph_hi = _ephemeral_range()
    pick = random.Random()
    for _ in range(100):
        port = pick.randrange(*QUIET_PORTS)
        if eph_lo <= port <= eph_hi:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class _StopRequested(Exception):
    """SIGTERM arrived (after uvicorn's graceful shutdown)."""


def _stop_requested(signum: int, frame: Any) -> None:
    raise _StopRequested()


def _is_loopback(address: str) -> bool:
    host = address.removeprefix("ray://").rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


# Ray's switch that stops it from rewriting a loopback node address into the machine's outward one
# (ray-project/ray#26293). Read at import, so it is set both in the environment (for the Ray
# processes started from here) and on the already imported constant (for this process).
_LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _keep_loopback_addresses() -> None:
    """Let the driver reach a cluster whose nodes all listen on 127.0.0.1.

    Ray rewrites a loopback address given to `ray.init` into this host's outward IP, where a
    loopback-only cluster (a test cluster, or a head started with `--node-ip-address
    127.0.0.1`) does not listen, and the connection hangs. Ray skips that rewrite when
    `ENABLE_RAY_CLUSTER` is off (its switch for single-machine Windows/macOS clusters), which
    is exactly the case here: every node is on this machine.
    """
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """`values` in os.environ for the block (Ray's processes started in it inherit them)."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def embedded_ray_options(namespace: str) -> dict[str, Any]:
    """`ray.init` options for the embedded head: every Ray process on 127.0.0.1, nothing that
    lorapool does not use (dashboard, metrics export, usage stats)."""
    return dict(
        # "local": always a fresh head of our own, never a stray cluster found running.
        address="local",
        namespace=namespace,
        include_dashboard=False,
        # With ENABLE_RAY_CLUSTER off (see _keep_loopback_addresses) Ray keeps this address
        # instead of replacing it with the outward IP, and since ray-project/ray#59852 its gRPC
        # servers (GCS, raylet, object manager, workers) and agents bind to the node address.
        _node_ip_address="127.0.0.1",
        # No metrics: the dashboard agent then opens no Prometheus export port.
        _system_config={"enable_metrics_collection": False},
        log_to_driver=False,
        # Ray's own notices ("Token authentication is enabled…", "Started a local Ray
        # instance.") are for Ray users, not lorapool's: only its errors reach stderr.
        logging_level=logging.ERROR,
    )


class Service:
    """The running server. `start()` returns once the API answers; `stop()` undoes it."""

    def __init__(
        self,
        settings: Any,
        *,
        local_node: Optional[bool] = None,
        local_node_options: Optional[dict[str, Any]] = None,
        executor_options: Optional[dict[str, Any]] = None,
        ray_init_options: Optional[dict[str, Any]] = None,
    ) -> None:
        self.settings = settings
        # The embedded head trains on this machine too; a head that joins a cluster leaves
        # training to the donors (`lorapool donate`) unless told otherwise.
        self.local_node = (not settings.ray_address) if local_node is None else local_node
        self.local_node_options = local_node_options or {}
        self.executor_options = executor_options or {}
        self.ray_init_options = ray_init_options or {}
        self.store: Any = None
        self.artifacts: Any = None
        self.executor: Any = None
        self.tasks: Any = None  # pool.task_queue.PoolTasks: merges and evaluations
        self.federations: Any = None  # pool.federation.FederationDriver: federated rounds
        self.app: Any = None
        self._server: Any = None
        self._thread: Optional[threading.Thread] = None
        self._started_ray = False
        self._agent: Any = None
        # The processes the embedded head started (GCS, raylet, …): ended on stop() with all
        # their descendants. Empty when joining a cluster: nothing of it is ours to end.
        self._ray_roots: list[Any] = []
        self._subscribers: list[Any] = []  # store subscribers: ETA, experiment trackers

    @property
    def base_url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.port}"

    # -- parts ------------------------------------------------------------------------------
    def _init_ray(self) -> None:
        import ray

        from .pool.agent import NAMESPACE

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if ray.is_initialized():
            return
        if self.settings.ray_address:
            if _is_loopback(self.settings.ray_address):
                _keep_loopback_addresses()
            ray.init(address=self.settings.ray_address, namespace=NAMESPACE,
                     log_to_driver=False, logging_level=logging.ERROR, **self.ray_init_options)
        else:
            import psutil

            opts = embedded_ray_options(NAMESPACE)
            extra = dict(self.ray_init_options)
            opts["_system_config"] = {**opts["_system_config"],
                                      **extra.pop("_system_config", {})}
            opts.update(extra)
            _keep_loopback_addresses()
            before = {p.pid for p in psutil.Process().children()}
            with _environ(**{_LOOPBACK_SWITCH: "0"}):
                ray.init(**opts)
            # What ray.init started: the head's processes, direct children of this one.
            self._ray_roots = [p for p in psutil.Process().children() if p.pid not in before]
        self._started_ray = True

    def _start_local_node(self) -> None:
        from .pool.agent import AgentConfig, start_agent

        opts = dict(self.local_node_options)
        opts.setdefault("name", socket.gethostname() or "local")
        opts.setdefault("work_dir", str(Path(self.settings.data_dir) / "node"))
        # The embedded head is a machine of its own: a job training on its CPU may use it all.
        opts.setdefault("cpu_threads", len(os.sched_getaffinity(0)) if hasattr(
            os, "sched_getaffinity") else (os.cpu_count() or 1))
        self._agent = start_agent(AgentConfig(**opts))

    def build(self) -> None:
        from .api.app import create_app
        from .artifacts import ArtifactStore
        from .pool.federation import FederationDriver
        from .pool.progress import ProgressEstimator
        from .pool.scheduler import RayExecutor
        from .pool.task_queue import PoolTasks
        from .pool.trackers import TrackerHub
        from .store import Store

        Path(self.settings.data_dir).mkdir(parents=True, exist_ok=True)
        self.store = Store(self.settings.database_url)
        self._subscribers = [ProgressEstimator().start(self.store),  # estimated_finish
                             TrackerHub(Path(self.settings.data_dir)).start(self.store)]
        self.artifacts = ArtifactStore(Path(self.settings.artifacts_dir))
        self._init_ray()
        if self.local_node:
            self._start_local_node()
        options: dict[str, Any] = dict(preempt_timeout=self.settings.preempt_timeout,
                                       heartbeat_timeout=self.settings.heartbeat_timeout,
                                       max_attempts=self.settings.max_attempts)
        options.update(self.executor_options)
        self.executor = RayExecutor(self.store, self.artifacts, **options)
        self.executor.start()
        self.federations = FederationDriver(self.store, self.artifacts, self.executor)
        self.federations.start()
        self.tasks = PoolTasks(self.store, self.artifacts, models=self.executor.models)
        self.tasks.start()
        self.app = create_app(self.settings, self.store, self.artifacts, self.executor,
                              tasks=self.tasks)
        # Chats in flight count toward their tenant's fair share of the pool, like its jobs.
        self.executor.tenant_load = self.app.state.ctx.limits.chats.snapshot

    def _uvicorn(self) -> Any:
        import uvicorn

        config = uvicorn.Config(self.app, host=self.settings.host, port=int(self.settings.port),
                                log_level="warning", lifespan="on")
        return uvicorn.Server(config)

    # -- lifecycles -------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> "Service":
        """Start everything, the HTTP server in a background thread (tests, demo)."""
        self.build()
        self._server = self._uvicorn()
        self._thread = threading.Thread(target=self._server.run, name="lorapool-http", daemon=True)
        self._thread.start()
        deadline = time.time() + timeout
        while not self._server.started:
            if time.time() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"the API did not start on {self.base_url}")
            time.sleep(0.05)
        return self

    def serve_forever(self) -> None:
        """Start everything and serve in this thread until SIGINT/SIGTERM, then shut down in
        order (API, scheduler, Ray, store) and return normally (exit status 0)."""
        from .processes import become_subreaper, descendants, end_processes

        # Ray processes orphaned while we run are re-parented to us, so that they are found
        # (and ended) below instead of living on under init.
        become_subreaper()
        self.build()
        self._server = self._uvicorn()
        log.info("lorapool serving on %s (data in %s)", self.base_url, self.settings.data_dir)
        # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again under the
        # handler that was there before it: make that one end the loop instead of the process,
        # so that the rest of the service is stopped too.
        previous = signal.signal(signal.SIGTERM, _stop_requested)
        try:
            self._server.run()
        except (KeyboardInterrupt, _StopRequested):
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
            log.info("lorapool stopping")
            self.stop()
            # Everything this process started is ours (with a joined cluster: nothing of it).
            end_processes(descendants(), wait=2.0)

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(10)
        if self.tasks is not None:
            self.tasks.stop()
        if self.federations is not None:
            self.federations.stop()
        if self.executor is not None:
            self.executor.stop()
        if self._started_ray:
            import ray

            from .processes import descendants, end_processes

            # Taken before the shutdown, while the agents are still the raylet's children.
            ours = descendants(self._ray_roots)
            ray.shutdown()
            self._started_ray = False
            # Ray stops its own processes, but its agents can outlive the raylet: end what is
            # left of the head's processes, and only those.
            end_processes(ours)
            self._ray_roots = []
        for sub in self._subscribers:
            sub.stop()
        if self.store is not None:
            self.store.close()

    def __enter__(self) -> "Service":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def serve(settings: Any, **options: Any) -> None:
    """`lorapool serve`: run the service until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    Service(settings, **options).serve_forever()
