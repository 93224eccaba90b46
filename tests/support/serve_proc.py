"""`lorapool` server-side commands run as a user runs them: a child process, found again with all
the processes it started, and the sockets they listen on.

Every process started here carries a marker in its environment (`LORAPOOL_TEST_MARK`). Ray
passes its environment on to what it starts (GCS, raylet, agents, workers), so the marker finds
the whole tree even where a process was re-parented to init when its parent died — which is
exactly the kind of process a test of "nothing left running" must not miss.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import psutil

MARK = "LORAPOOL_TEST_MARK"


def new_mark() -> str:
    return uuid.uuid4().hex


def marked_env(mark: str, **extra: str) -> dict[str, str]:
    """This process's environment plus the marker and `extra`."""
    return {**os.environ, MARK: mark, "RAY_USAGE_STATS_ENABLED": "0", **extra}


def cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorapool.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def marked_processes(mark: str) -> list[psutil.Process]:
    """Every live process whose environment carries `mark` (zombies do not count: they hold no
    socket and are gone once reaped)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(MARK) == mark:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


def process_tree(root: psutil.Process, mark: Optional[str]) -> list[psutil.Process]:
    """`root`, its descendants, and every process carrying `mark` (re-parented ones included)."""
    procs: dict[int, psutil.Process] = {}
    try:
        procs[root.pid] = root
        procs.update({p.pid: p for p in root.children(recursive=True)})
    except psutil.NoSuchProcess:
        pass
    if mark:
        procs.update({p.pid: p for p in marked_processes(mark)})
    return list(procs.values())


@dataclass(frozen=True)
class Listener:
    pid: int
    name: str
    kind: str  # "tcp" or "udp"
    ip: str
    port: int

    @property
    def loopback(self) -> bool:
        try:
            ip = ipaddress.ip_address(self.ip.split("%")[0])
        except ValueError:
            return False
        # An IPv6 socket bound to ::ffff:127.0.0.1 takes IPv4 loopback traffic only.
        mapped = getattr(ip, "ipv4_mapped", None)
        return (mapped or ip).is_loopback

    def __str__(self) -> str:
        return f"{self.kind} {self.ip}:{self.port} ({self.name}, pid {self.pid})"


def listeners(procs: list[psutil.Process]) -> list[Listener]:
    """Every TCP socket in LISTEN and every bound UDP socket of `procs`."""
    out = []
    for proc in procs:
        try:
            name = " ".join(proc.cmdline()[:3])[:120] or proc.name()
            conns = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        for c in conns:
            if c.type == socket.SOCK_STREAM and c.status != psutil.CONN_LISTEN:
                continue
            if c.type == socket.SOCK_DGRAM and c.raddr:
                continue  # a connected UDP socket is a client, not a listener
            kind = "tcp" if c.type == socket.SOCK_STREAM else "udp"
            out.append(Listener(proc.pid, name, kind, c.laddr.ip, c.laddr.port))
    return out


def wait_for(check: Callable[[], Any], timeout: float, what: str,
             alive: Optional[Callable[[], None]] = None, interval: float = 0.5) -> Any:
    """Poll `check` until it returns something truthy (and does not raise)."""
    deadline = time.time() + timeout
    last: Any = None
    while True:
        if alive is not None:
            alive()
        try:
            value = check()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - the thing we wait for may not answer yet
            last = e
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what} (last: {last!r})")
        time.sleep(interval)


def kill_tree(procs: list[psutil.Process], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL whatever is left of `procs` (clean-up after a test)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            try:
                p.send_signal(sig)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        _, alive = psutil.wait_procs(procs, timeout=grace)
        procs = alive
        if not procs:
            return


class ServeProcess:
    """`lorapool serve` in a child process with its own data dir, port and marker."""

    def __init__(self, data_dir: Path, log_path: Path, port: int, *, mark: Optional[str] = None,
                 extra_args: tuple[str, ...] = (), env: Optional[dict[str, str]] = None) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.port = port
        self.mark = mark or new_mark()
        self.env = marked_env(self.mark, LORAPOOL_DATA_DIR=str(data_dir), **(env or {}))
        self.extra_args = extra_args
        self.proc: Optional[subprocess.Popen] = None
        self._log: Any = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def token(self, tenant: str = "acme") -> str:
        done = cli("token", "create", "--tenant", tenant, env=self.env)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def start(self) -> "ServeProcess":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lorapool.cli", "serve", "--port", str(self.port),
             *self.extra_args], env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def check_alive(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, (
            f"lorapool serve exited with {self.proc and self.proc.returncode}:\n{self.log_tail()}")

    def wait_ready(self, client: Any, timeout: float = 150) -> None:
        """Until the API answers and the embedded node has joined the pool."""
        wait_for(lambda: client.nodes.list(), timeout, "the API and a node",
                 alive=self.check_alive)

    def tree(self) -> list[psutil.Process]:
        assert self.proc is not None
        try:
            root = psutil.Process(self.proc.pid)
        except psutil.NoSuchProcess:
            return marked_processes(self.mark)
        return process_tree(root, self.mark)

    def cleanup(self) -> None:
        """Kill whatever is left (after a failed or SIGKILL test)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        kill_tree(marked_processes(self.mark))
        if self._log is not None:
            self._log.close()
            self._log = None
