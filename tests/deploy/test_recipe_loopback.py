"""deploy/README.md's multi-machine recipe, followed on one machine (its section 4).

The README's own bash blocks run, in order, through bash: the settings block is replaced by
this test's values (same variable names, checked), everything on 127.0.0.1. A Ray head with
token authentication (`ray start --head`), `lorapool serve --ray-address` and `lorapool donate
--token-file` run as child processes; a tiny job submitted over HTTP must train on the donor.
Every process carries a marker in its environment, so that exactly these are ended afterwards
(never `ray stop`, which would end other sessions' Ray on this shared machine).
"""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lorapool import Client
from tests.deploy.recipe import assignments, recipe_blocks

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(480)]


def _bin_dir(tmp_path: Path) -> Path:
    """`lorapool` and `ray` as the README calls them, from this interpreter."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, module in (("lorapool", "lorapool.cli"), ("ray", "ray.scripts.scripts")):
        script = bin_dir / name
        script.write_text(f"#!/bin/sh\nexec {sys.executable} -m {module} \"$@\"\n")
        script.chmod(0o755)
    return bin_dir


def test_recipe_on_loopback(tmp_path: Path, tiny_model_dir: Path, chat_jsonl: Path) -> None:
    from lorapool.service.server import free_port
    from tests.support.serve_proc import (
        kill_tree,
        marked_env,
        marked_processes,
        new_mark,
        wait_for,
    )

    blocks = recipe_blocks()
    settings = {
        "HEAD_IP": "127.0.0.1", "RAY_PORT": str(free_port()), "API_PORT": str(free_port()),
        "DATA_DIR": str(tmp_path / "head-data"), "TOKEN_FILE": str(tmp_path / "etc/ray_token"),
        "DONOR_TOKEN_FILE": str(tmp_path / "donor/ray_token"), "MODEL_NAME": "tiny-llama",
        "MODEL_PATH": str(tiny_model_dir), "NODE_NAME": "recipe-donor",
        "DONOR_OPTIONS": f"--cpu-only --work-dir {tmp_path / 'donor/node'}",
    }
    assert set(settings) == set(assignments(blocks["settings"])), "README settings changed"
    prelude = "set -e\n" + "".join(f"{k}={shlex.quote(v)}\n" for k, v in settings.items())
    path = f"{_bin_dir(tmp_path)}:/usr/bin:/bin"
    head_mark, serve_mark, donor_mark = new_mark(), new_mark(), new_mark()

    def env(mark: str) -> dict[str, str]:
        e = marked_env(mark, PATH=path)
        for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS",
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "LORAPOOL_DATA_DIR",
                    "LORAPOOL_API_KEY", "LORAPOOL_RAY_TOKEN_FILE"):
            e.pop(var, None)
        return e

    def script(*names: str, exec_last: bool = False) -> str:
        parts = [blocks[n] for n in names]
        if exec_last:
            parts[-1] = "exec " + parts[-1].lstrip()
        return prelude + "\n".join(parts)

    def run(mark: str, *names: str) -> subprocess.CompletedProcess:
        done = subprocess.run(["bash", "-c", script(*names)], env=env(mark),
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, f"{names}: {done.stdout[-2000:]}{done.stderr[-3000:]}"
        return done

    head_side = ("head-env", "loopback-head")
    serve = donor = None
    logs = {n: open(tmp_path / f"{n}.log", "wb") for n in ("serve", "donor")}

    def tail(name: str) -> str:
        return (tmp_path / f"{name}.log").read_text(errors="replace")[-3000:]

    try:
        run(head_mark, "token")
        assert (Path(settings["TOKEN_FILE"]).stat().st_mode & 0o077) == 0, "token file readable"
        run(head_mark, *head_side, "head-ray")
        serve = subprocess.Popen(["bash", "-c", script(*head_side, "head-serve", exec_last=True)],
                                 env=env(serve_mark), stdout=logs["serve"],
                                 stderr=subprocess.STDOUT)
        base_url = f"http://127.0.0.1:{settings['API_PORT']}"

        def serve_alive() -> None:
            assert serve.poll() is None, tail("serve")

        import httpx

        wait_for(lambda: httpx.get(f"{base_url}/healthz", timeout=5).status_code == 200, 150,
                 "the API", alive=serve_alive)
        tenants = subprocess.run(
            ["bash", "-c", script("tenants") + '\nprintf "\\n%s" "$LORAPOOL_API_KEY"'],
            env=env(head_mark), capture_output=True, text=True, timeout=180)
        assert tenants.returncode == 0, tenants.stderr[-3000:]
        api_key = tenants.stdout.strip().splitlines()[-1]

        donor = subprocess.Popen(["bash", "-c", script("donor-token", "donor", exec_last=True)],
                                 env=env(donor_mark), stdout=logs["donor"],
                                 stderr=subprocess.STDOUT)
        assert (Path(settings["DONOR_TOKEN_FILE"]).exists() or donor.poll() is None)
        client = Client(base_url, api_key=api_key, timeout=30)

        def donor_joined() -> bool:
            assert donor.poll() is None, tail("donor")
            serve_alive()
            return any(n.name == settings["NODE_NAME"] for n in client.nodes.list())

        wait_for(donor_joined, 180, "the donor in the pool")
        # Only the donor trains: the head joined the cluster and runs no node agent.
        assert [n.name for n in client.nodes.list()] == [settings["NODE_NAME"]]

        job = client.submit(settings["MODEL_NAME"], chat_jsonl, n_epochs=1, batch_size=4,
                            max_seq_len=64, lora={"r": 4, "alpha": 8}, seed=1)
        job = client.jobs.wait(job.id, timeout=300)
        assert job.status == "succeeded", (job.error, tail("serve"), tail("donor"))
        assert job.node_id == settings["NODE_NAME"]
        assert job.fine_tuned_model

        # Leave as an admin would: the donor (Ctrl-C/SIGTERM), then the API, then the head.
        donor.send_signal(signal.SIGTERM)
        assert donor.wait(150) == 0, tail("donor")
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(90) == 0, tail("serve")
        for mark in (donor_mark, serve_mark):
            wait_for(lambda m=mark: not marked_processes(m), 30, "the processes to end")
        assert "Traceback" not in tail("serve") + tail("donor")
    finally:
        for proc in (donor, serve):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(30)
        leftovers = {m: [f"{p.pid} {p.name()}" for p in marked_processes(m)]
                     for m in (donor_mark, serve_mark)}
        # The head's Ray processes: this test's `ray stop`, for its own head only.
        for mark in (donor_mark, serve_mark, head_mark):
            kill_tree(marked_processes(mark))
        for f in logs.values():
            f.close()
    assert not any(leftovers.values()), f"still running after SIGTERM: {leftovers}"
    assert not marked_processes(head_mark), "the head's Ray processes survived"
