"""`lorapool donate`: an office machine joins the pool while its owner allows it.

It joins the Ray cluster as a worker node (`ray start --address …`) with Ray's token
authentication on — the token comes from a file or the environment, never the command line —
starts this node's NodeAgent with the donor's terms (which GPU, a memory cap, a schedule, idle
rules, node-local data sets), and stays in the foreground. Ctrl-C (or SIGTERM) asks the node's
jobs to checkpoint and stop, waits for them, and leaves the cluster.

Ray binds to the node address the donor names (`--node-ip-address`; by default the address
this machine reaches the head from, 127.0.0.1 for a head on this machine) and to loopback, and
Ray's metrics export is off. Leaving ends the processes this node started and only those:
never `ray stop`, which would end every Ray process of the machine (a head running beside it
included).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

from .agent import NAMESPACE, AgentConfig, start_agent

TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_FILE_ENV = "LORAPOOL_RAY_TOKEN_FILE"


def ray_auth_env(token_file: Optional[str | Path] = None) -> dict[str, str]:
    """The environment that turns Ray's token authentication on, or a clear error."""
    env = {"RAY_AUTH_MODE": "token"}
    if os.environ.get(TOKEN_ENV):
        return env
    path = token_file or os.environ.get(TOKEN_FILE_ENV) or os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not path:
        default = Path.home() / ".ray" / "auth_token"
        if default.exists():
            return env
        raise SystemExit(
            "Ray token authentication is required to join a cluster: put the head's token "
            f"(`ray get-auth-token` on the head) in a file and pass --token-file, or set "
            f"{TOKEN_FILE_ENV} or {TOKEN_ENV}."
        )
    path = Path(path).expanduser()
    if not path.is_file() or not path.read_text().strip():
        raise SystemExit(f"token file {path} is missing or empty")
    env["RAY_AUTH_TOKEN_PATH"] = str(path)
    return env


def _reload_ray_auth() -> None:
    """Make this process's Ray read the auth settings just put in os.environ.

    Ray reads RAY_AUTH_MODE and the token once, when it is first imported (here: before the
    token file was known), so the driver would connect without a token and be refused."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def donate(
    address: str,
    config: AgentConfig,
    *,
    token_file: Optional[str] = None,
    gpus: Optional[str] = None,
    node_ip: Optional[str] = None,
    stop_timeout: float = 60.0,
    console: Any = None,
) -> None:
    """Join the cluster at `address` and donate this machine until interrupted."""
    import ray

    from ..processes import become_subreaper, descendants, end_processes
    from ..server import _is_loopback, _keep_loopback_addresses

    # Ray's metrics export would open a port on every interface of a LAN node (its exporter
    # binds all addresses unless the node address is loopback); lorapool does not read it.
    env = dict(os.environ, **ray_auth_env(token_file), RAY_USAGE_STATS_ENABLED="0",
               RAY_enable_metrics_collection="0")
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    if node_ip is None and _is_loopback(address):
        node_ip = "127.0.0.1"  # a head on this machine: this node needs no outward address
    cmd = [sys.executable, "-m", "lorapool.service.pool.ray_node", "start",
           f"--address={address}", "--disable-usage-stats"]
    if node_ip:
        cmd.append(f"--node-ip-address={node_ip}")
    if config.cpu_only:
        cmd.append("--num-gpus=0")
    # `ray start` returns once the node runs; its processes (raylet, agents, workers) are then
    # re-parented to this process, which finds and ends them when it leaves.
    become_subreaper()
    subprocess.run(cmd, check=True, env=env)
    ours = descendants()
    if _is_loopback(address):
        _keep_loopback_addresses()
    os.environ.update({k: v for k, v in env.items() if k.startswith(("RAY_", "CUDA_"))})
    _reload_ray_auth()
    stop = threading.Event()

    def on_signal() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())

    on_signal()
    try:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
        # ray.init installs Ray's own fatal-signal handler (SIGTERM included): ours again, so
        # that SIGTERM leaves cleanly (jobs checkpointed, exit 0) instead of killing us.
        on_signal()
        agent = start_agent(config, detached=True)
        report = ray.get(agent.report.remote())
        if console is not None:
            dev = report["device"]
            console.print(f"Donating {socket.gethostname()} as [bold]{config.name}[/]: "
                          f"{dev['name']}, {dev['total_memory'] / 1024**3:.1f} GiB "
                          f"({report['free_memory'] / 1024**3:.1f} GiB free). Ctrl-C to leave.")
        while not stop.wait(5.0):
            pass
        if console is not None:
            console.print("Leaving: asking this node's jobs to checkpoint and stop …")
        jobs = ray.get(agent.reclaim.remote("the donor is leaving the pool"))
        deadline = time.time() + stop_timeout
        while jobs and time.time() < deadline:
            time.sleep(1.0)
            jobs = ray.get(agent.report.remote())["jobs"]
        ray.kill(agent, no_restart=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        # This node's processes only (SIGTERM: the raylet leaves the cluster cleanly).
        end_processes({p.pid: p for p in [*ours, *descendants()]}.values(), wait=0.0,
                      grace=10.0)
