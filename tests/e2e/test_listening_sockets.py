"""Every port where it belongs, nothing left running (issue 12, "must hold").

`lorapool serve` (embedded Ray head) and `lorapool donate` (joining a loopback cluster with Ray's
token authentication) run as child processes, as a user runs them. With psutil, every listening
socket (TCP LISTEN, bound UDP) of each one's whole process tree — Ray's GCS, raylet, agents and
workers included, found by a marker in their environment even when re-parented — must be on
loopback. After SIGTERM the command exits 0 and no process of its tree remains; `donate` leaves
the head it joined running.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lorapool import Client

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def _assert_all_loopback(found: list, must_include_port: int | None = None) -> None:
    assert found, "no listening socket found at all: the tree was not found"
    outward = [str(x) for x in found if not x.loopback]
    assert not outward, "listening beyond loopback:\n" + "\n".join(outward)
    if must_include_port is not None:
        assert must_include_port in {x.port for x in found}, [str(x) for x in found]


def _has_raylet(procs: list) -> bool:
    names = []
    for p in procs:
        try:
            names.append(" ".join(p.cmdline()[:1]))
        except Exception:  # noqa: BLE001 - a process may end while we look
            continue
    return any(n.endswith("/raylet") for n in names)


def test_serve_listens_on_loopback_only_and_leaves_nothing(tmp_path: Path) -> None:
    from lorapool.service.server import free_port
    from tests.support.serve_proc import (
        ServeProcess,
        listeners,
        marked_processes,
        wait_for,
    )

    server = ServeProcess(tmp_path / "data", tmp_path / "serve.log", free_port())
    token = server.token()
    server.start()
    try:
        client = Client(server.base_url, api_key=token, timeout=10)
        server.wait_ready(client)
        tree = server.tree()
        assert _has_raylet(tree), "the embedded head's raylet is not in the tree"
        _assert_all_loopback(listeners(tree), must_include_port=server.port)

        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(90) == 0, server.log_tail()
        wait_for(lambda: not marked_processes(server.mark), 30, "the server's processes to end")
        assert "Traceback" not in server.log_tail(100_000)
    finally:
        leftovers = [f"{p.pid} {p.name()}" for p in marked_processes(server.mark)]
        server.cleanup()
    assert not leftovers, f"still running after SIGTERM: {leftovers}"


@pytest.mark.slow
def test_donate_listens_on_loopback_only_and_leaves_only_its_node(tmp_path: Path) -> None:
    from lorapool.service.server import free_port
    from tests.support.serve_proc import (
        kill_tree,
        listeners,
        marked_env,
        marked_processes,
        new_mark,
        wait_for,
    )

    token = secrets.token_hex(32)
    token_file = tmp_path / "ray_token"
    token_file.write_text(token)
    os.chmod(token_file, 0o600)
    port = free_port()
    head_mark, donor_mark = new_mark(), new_mark()
    # The head as an admin would start it on one machine: loopback (Ray's switch keeps its
    # 127.0.0.1), token auth on.
    head_env = marked_env(head_mark, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
                          RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
                          RAY_enable_metrics_collection="0")
    head_env.pop("RAY_AUTH_TOKEN_PATH", None)
    ray_bin = str(Path(sys.executable).with_name("ray"))
    ray_cmd = [ray_bin] if Path(ray_bin).exists() else [sys.executable, "-m",
                                                        "ray.scripts.scripts"]
    head = subprocess.run([*ray_cmd, "start", "--head", "--node-ip-address=127.0.0.1",
                           f"--port={port}", "--include-dashboard=false",
                           "--disable-usage-stats", "--num-cpus=1"],
                          env=head_env, capture_output=True, text=True, timeout=180)
    donor_log = tmp_path / "donate.log"
    donor = None
    try:
        assert head.returncode == 0, head.stdout[-2000:] + head.stderr[-2000:]
        head_procs = marked_processes(head_mark)
        assert _has_raylet(head_procs)
        donor_env = marked_env(donor_mark)
        for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
            donor_env.pop(var, None)
        with open(donor_log, "wb") as log:
            donor = subprocess.Popen(
                [sys.executable, "-m", "lorapool.cli", "donate", f"--address=127.0.0.1:{port}",
                 f"--token-file={token_file}", "--cpu-only", "--name=donor-under-test",
                 f"--work-dir={tmp_path / 'node'}"],
                env=donor_env, stdout=log, stderr=subprocess.STDOUT)

        def joined() -> bool:
            assert donor.poll() is None, donor_log.read_text()[-3000:]
            return "Donating" in donor_log.read_text()

        wait_for(joined, 150, "the donor to join")
        tree = marked_processes(donor_mark)
        assert _has_raylet(tree), "the donor's raylet is not in its tree"
        _assert_all_loopback(listeners(tree))

        donor.send_signal(signal.SIGTERM)
        assert donor.wait(120) == 0, donor_log.read_text()[-3000:]
        wait_for(lambda: not marked_processes(donor_mark), 30, "the donor's processes to end")
        # Leaving ended this node only: the head it joined still runs.
        assert all(p.is_running() for p in head_procs), "donate ended the head's processes"
    finally:
        if donor is not None and donor.poll() is None:
            donor.kill()
        leftovers = [f"{p.pid} {p.name()}" for p in marked_processes(donor_mark)]
        kill_tree(marked_processes(donor_mark))
        kill_tree(marked_processes(head_mark))
    assert not leftovers, f"still running after SIGTERM: {leftovers}"
