"""`lorapool serve` as a user runs it: a child process with its own local Ray head, a token from
`lorapool token create`, the API answering, and a clean exit on SIGTERM and on SIGINT that
leaves no Ray process of its own behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorapool import Client

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorapool.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def _session_processes(pid: int) -> list[str]:
    """Ray processes of the session a process started (its session folder ends in _<pid>)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if f"_{pid}/" in cmdline:
            found.append(f"{proc.name} {cmdline[:200]}")
    return found


def test_free_port_is_outside_the_ports_ray_and_the_kernel_hand_out() -> None:
    """The API's port is chosen before the embedded Ray head starts; from the kernel's
    ephemeral range (or Ray's worker ports) one of Ray's own processes could bind it first,
    which made this module's serve test fail now and then with "address already in use"."""
    import socket

    from lorapool.service.server import QUIET_PORTS, _ephemeral_range, free_port

    eph_lo, eph_hi = _ephemeral_range()
    for _ in range(20):
        port = free_port()
        assert QUIET_PORTS[0] <= port < QUIET_PORTS[1] and not eph_lo <= port <= eph_hi
        assert not 10002 <= port <= 19999  # Ray's default worker ports
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # and it is free


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_answers_then_exits_cleanly(tmp_path: Path, sig: signal.Signals) -> None:
    from lorapool.service.server import free_port

    port = free_port()
    env = {**os.environ, "LORAPOOL_DATA_DIR": str(tmp_path / "data"), "RAY_USAGE_STATS_ENABLED": "0"}
    token = _cli("token", "create", "--tenant", "acme", env=env)
    assert token.returncode == 0, token.stderr
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "lorapool.cli", "serve", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        client = Client(f"http://127.0.0.1:{port}", api_key=token.stdout.strip(), timeout=10)
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                nodes = client.nodes.list()
                break
            except Exception:
                assert time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(0.5)
        assert isinstance(client.models.list(), list)
        assert _session_processes(proc.pid), "no Ray head of its own?"
        # The embedded head is also a node of the pool (this machine).
        deadline = time.time() + 30
        while not nodes and time.time() < deadline:
            time.sleep(0.5)
            nodes = client.nodes.list()
        assert nodes
        proc.send_signal(sig)
        assert proc.wait(60) == 0, (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    deadline = time.time() + 20
    while _session_processes(proc.pid) and time.time() < deadline:
        time.sleep(0.5)
    assert not _session_processes(proc.pid), _session_processes(proc.pid)
    assert "Traceback" not in (tmp_path / "serve.log").read_text()
