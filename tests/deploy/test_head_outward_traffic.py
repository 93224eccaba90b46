"""A Ray head started as deploy/README.md starts it reaches nothing outside this machine but
Ray's cloud-metadata probe.

With usage stats off, a head started by `ray start` still posts a "usage stats disabled" notice
to usage-stats.ray.io as it starts (its dashboard process does: ray-project/ray#43538); the
README's head-env block points that at the loopback discard port. The same process also asks the
link-local cloud-metadata address (169.254.169.254, metadata.google.internal) which cloud it
runs on, to fill a report it then does not send; no setting turns that off, so it is the one
outward attempt allowed here, named, so that anything new fails this test.

The head runs from the README's own blocks (on 127.0.0.1, with token auth), every Python
process of it under an audit hook (a sitecustomize on PYTHONPATH) that records each name
lookup and connection. Its processes carry a marker and are ended by it, never `ray stop`.
"""

from __future__ import annotations

import shlex
import subprocess
import time
from pathlib import Path

import pytest

from tests.deploy.recipe import recipe_blocks

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

RAY_METADATA_PROBE = {"169.254.169.254", "metadata.google.internal"}

AUDIT = r'''
import os, sys

def _lorapool_audit(event, args):
    if event not in ("socket.getaddrinfo", "socket.connect"):
        return
    try:
        where = args[1] if event == "socket.connect" else args[0]
        host = str(where[0] if isinstance(where, tuple) else where)
    except Exception:
        return
    if host in ("127.0.0.1", "localhost", "::1") or host.startswith(("/", "\x00")):
        return
    with open(os.path.join(OUT, f"{os.getpid()}.txt"), "a") as f:
        f.write(f"{event} {host} {os.path.basename(sys.argv[0])}\n")

sys.addaudithook(_lorapool_audit)
'''


def _outward(out: Path) -> list[tuple[str, str, str]]:
    lines = [line.split(" ", 2) for f in out.glob("*.txt") for line in f.read_text().splitlines()]
    return [(e, h, who) for e, h, who in lines]


def test_readme_head_contacts_only_the_cloud_metadata_probe(tmp_path: Path) -> None:
    from lorapool.service.server import free_port
    from tests.support.serve_proc import kill_tree, marked_env, marked_processes, new_mark, wait_for

    audit = tmp_path / "audit"
    out = tmp_path / "outward"
    audit.mkdir()
    out.mkdir()
    (audit / "sitecustomize.py").write_text(f"OUT = {str(out)!r}\n{AUDIT}")
    token = tmp_path / "ray_token"
    blocks = recipe_blocks()
    settings = {"HEAD_IP": "127.0.0.1", "RAY_PORT": str(free_port()), "TOKEN_FILE": str(token)}
    script = ("set -e\n" + "".join(f"{k}={shlex.quote(v)}\n" for k, v in settings.items())
              + "\n".join(blocks[n] for n in ("token", "head-env", "loopback-head", "head-ray")))
    mark = new_mark()
    env = marked_env(mark, PYTHONPATH=str(audit))
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS",
                "RAY_USAGE_STATS_REPORT_URL"):
        env.pop(var, None)
    try:
        done = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                              timeout=180)
        assert done.returncode == 0, done.stderr[-3000:]
        # The dashboard process asks for the cloud first, then sends (or would send) its notice.
        wait_for(lambda: {h for _, h, _ in _outward(out)} & RAY_METADATA_PROBE, 90,
                 "Ray's dashboard to start its usage-stats module")
        # Three probes of at most 1 s each, then the notice, in the same thread: waiting for
        # something not to happen, so a fixed time well past that.
        time.sleep(12)
    finally:
        kill_tree(marked_processes(mark))
    hosts = {h for _, h, _ in _outward(out)}
    assert "usage-stats.ray.io" not in hosts, _outward(out)
    assert hosts <= RAY_METADATA_PROBE, f"new outward contacts: {sorted(hosts - RAY_METADATA_PROBE)}"
