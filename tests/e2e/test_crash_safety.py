"""Crash safety (issue 12): `lorapool serve` SIGKILLed while an upload streams in and a job
trains, then started again on the same data folder.

Both happen at once, in one kill: a raw multipart upload is left half sent (its bytes already in
the artifact store's `tmp/`), and a tiny-model job has written at least one checkpoint. The
server and every Ray process it started are killed (as a power cut would), then a new server
starts on the same folder. Must hold: `PRAGMA integrity_check` is ok, the half upload is not
listed, its bytes are gone from `tmp/`, and the job resumes from its last checkpoint and succeeds.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
from pathlib import Path

import httpx
import pytest

from lorapool import Client

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

PARTIAL_NAME = "killed-upload.jsonl"
LINE = json.dumps({"text": "x" * 1000}).encode() + b"\n"


def _half_upload(base_url: str, token: str, sent: threading.Event,
                 killed: threading.Event) -> None:
    """POST /v1/files with a body that stops after ~2 MiB until the server is killed."""
    boundary = "crash-test-boundary"

    def body():
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n"
               f"fine-tune\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
               f"filename=\"{PARTIAL_NAME}\"\r\nContent-Type: application/jsonl\r\n\r\n").encode()
        for _ in range(2048):
            yield LINE
        sent.set()
        killed.wait(300)
        yield LINE  # the connection is gone by now

    try:
        httpx.post(f"{base_url}/v1/files", content=body(), timeout=300,
                   headers={"Authorization": f"Bearer {token}",
                            "Content-Type": f"multipart/form-data; boundary={boundary}"})
    except httpx.HTTPError:
        pass  # expected: the server died mid-request


def _chat_lines(n: int) -> str:
    words = ["cat", "sun", "map", "red", "box", "sky", "pen", "cup"]
    return "".join(json.dumps({"messages": [
        {"role": "user", "content": f"{words[i % 8]} {words[(i * 3) % 8]}"},
        {"role": "assistant", "content": "ok"}]}) + "\n" for i in range(n))


def test_sigkill_during_upload_and_job_then_restart(tmp_path: Path, tiny_model_dir: Path) -> None:
    from lorapool.service.server import free_port
    from tests.support.serve_proc import ServeProcess, cli, wait_for

    data = tmp_path / "data"
    first = ServeProcess(data, tmp_path / "serve1.log", free_port())
    added = cli("models", "add", "tiny-llama", str(tiny_model_dir), env=first.env)
    assert added.returncode == 0, added.stderr
    token = first.token()
    train = tmp_path / "train.jsonl"
    train.write_text(_chat_lines(64))
    tmp_dir = data / "artifacts" / "tmp"
    second = None
    sent, killed = threading.Event(), threading.Event()
    uploader = threading.Thread(target=_half_upload, args=(first.base_url, token, sent, killed),
                                daemon=True)
    first.start()
    try:
        client = Client(first.base_url, api_key=token, timeout=30)
        first.wait_ready(client)
        job = client.submit("tiny-llama", train, n_epochs=1, batch_size=2, micro_batch_size=2,
                            learning_rate=1e-3, max_seq_len=64, checkpoint_every=4,
                            lora={"r": 2, "alpha": 4}, seed=1)
        uploader.start()
        assert sent.wait(120), "the upload did not start"
        # Its bytes are on disk in tmp/, the request not finished: the kill lands mid-upload.
        wait_for(lambda: any(p.stat().st_size > 1_000_000 for p in tmp_dir.iterdir()), 60,
                 "the half upload in tmp/", alive=first.check_alive)
        checkpoints = wait_for(lambda: client.jobs.checkpoints(job.id), 300,
                               "a first checkpoint", alive=first.check_alive)
        before = client.jobs.get(job.id)
        assert before.status == "running", before
        last_step_before = max(c.step_number for c in checkpoints)
        half = [p for p in tmp_dir.iterdir() if p.stat().st_size > 1_000_000]

        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(30)
        killed.set()
        first.cleanup()  # what the kill left running (its Ray processes): a power cut
        uploader.join(30)

        db = sqlite3.connect(f"file:{data / 'lorapool.db'}?mode=ro", uri=True)
        try:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            db.close()

        second = ServeProcess(data, tmp_path / "serve2.log", free_port())
        second.start()
        client = Client(second.base_url, api_key=token, timeout=30)
        second.wait_ready(client)

        names = [f.filename for f in client.files.list(limit=100).data]
        assert PARTIAL_NAME not in names and train.name in names, names

        done = client.jobs.wait(job.id, timeout=400)
        assert done.status == "succeeded", (done.error, second.log_tail())
        resumed = [e.data["resume_step"] for e in client.jobs.events(job.id)
                   if e.data and e.data.get("resume_step")]
        # Resumed after the kill, from a checkpoint at least as late as the one seen before
        # (resume_step is the step of the checkpoint it starts from), not from scratch.
        assert resumed and resumed[-1] >= last_step_before, resumed

        db = sqlite3.connect(f"file:{data / 'lorapool.db'}?mode=ro", uri=True)
        try:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            db.close()

        # The restarted store swept tmp/ of the killed writer's partial file.
        leftovers = [p.name for p in half if p.exists()]
        assert not leftovers, leftovers
    finally:
        killed.set()
        first.cleanup()
        if second is not None:
            if second.proc is not None and second.proc.poll() is None:
                second.proc.send_signal(signal.SIGTERM)
                try:
                    second.proc.wait(60)
                except Exception:  # noqa: BLE001 - cleanup() kills it below
                    pass
            second.cleanup()
