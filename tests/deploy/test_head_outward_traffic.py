"""A Ray head started as deploy/README.md starts it reaches nothing outside this machine but
Ray's cloud-metadata probe.

With usage stats off, a head started by `ray start` still posts a "usage stats disabled" notice
to usage-stats.ray.io as it starts (its dashboard process does: ray-project/ray#43538); the
README's head-env block points that at the loopback discard port. The same process also asks the
link-local cloud-metadata address (169.254.169.254, metadata.google.internal) which cloud it
runs on, to fill a report it then does not send; no setting turns that off, so it is the one
outward attempt allowed here, named, so that anything new fails this test.

The head runs from the README's own blocks (on 127.0.0.1, with token auth), every Python
process of it under an audit hook that records each outward name lookup and connection
(tests/support/outward.py). Its processes carry a marker and are ended by it, never `ray stop`.
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

def test_readme_head_contacts_only_the_cloud_metadata_probe(tmp_path: Path) -> None:
    from lorapool.service.server import free_port
    from tests.support.outward import attempts, install
    from tests.support.serve_proc import kill_tree, marked_env, marked_processes, new_mark, wait_for

    audit = tmp_path / "audit"
    out = tmp_path / "outward"
    install(audit, out)
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
        wait_for(lambda: {h for _, h, _ in attempts(out)} & RAY_METADATA_PROBE, 90,
                 "Ray's dashboard to start its usage-stats module")
        # Three probes of at most 1 s each, then the notice, in the same thread: waiting for
        # something not to happen, so a fixed time well past that.
        time.sleep(12)
    finally:
        kill_tree(marked_processes(mark))
    hosts = {h for _, h, _ in attempts(out)}
    assert "usage-stats.ray.io" not in hosts, attempts(out)
    assert hosts <= RAY_METADATA_PROBE, f"new outward contacts: {sorted(hosts - RAY_METADATA_PROBE)}"
