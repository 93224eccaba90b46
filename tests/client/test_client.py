"""The sync client against a real uvicorn server (see conftest.py): retries and back-off,
typed errors, timeouts, submit/upload, wait, events (SSE with a dropped connection), safe
adapter extraction."""

from __future__ import annotations

import socket
import time

import pytest

from lorapool import Client
from lorapool.errors import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    InternalServerError,
    InvalidParameterError,
    InvalidRequestError,
    JobWaitTimeout,
    LorapoolError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
    UnsafeArchiveError,
)

JOBS = "/v1/fine_tuning/jobs"


def _record_sleeps(client: Client) -> list[float]:
    sleeps: list[float] = []
    real = client._sleep

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        real(seconds)

    client._sleep = sleep  # type: ignore[method-assign]
    return sleeps


# -- retries ---------------------------------------------------------------------------------


def test_get_retries_5xx_then_succeeds(server, client):
    job = server.state.make_job()
    path = f"{JOBS}/{job['id']}"
    server.state.add("GET", path, 503, 502)
    sleeps = _record_sleeps(client)
    got = client.jobs.get(job["id"])
    assert got.id == job["id"] and got.status == "queued"
    assert server.state.n("GET", path) == 3
    assert len(sleeps) == 2


def test_get_gives_up_after_max_retries_with_growing_backoff(server, client):
    job = server.state.make_job()
    path = f"{JOBS}/{job['id']}"
    server.state.add("GET", path, 503, 503, 503, 503)
    client.retry_policy.initial_delay, client.retry_policy.max_delay = 0.02, 1.0
    sleeps = _record_sleeps(client)
    with pytest.raises(InternalServerError) as exc:
        client.jobs.get(job["id"])
    assert exc.value.status_code == 503 and exc.value.message == "injected 503"
    assert server.state.n("GET", path) == 3  # one try + max_retries=2
    # Exponential with at most 25 % jitter: 0.02·[0.75, 1], then 0.04·[0.75, 1].
    assert 0.015 <= sleeps[0] <= 0.02 and 0.03 <= sleeps[1] <= 0.04


def test_non_idempotent_post_is_not_retried(server, client, train_file):
    server.state.add("POST", "/v1/files", 503)
    with pytest.raises(InternalServerError):
        client.files.upload(train_file)
    assert server.state.n("POST", "/v1/files") == 1
    assert server.state.files == {}


def test_post_with_idempotency_key_is_retried_once_and_made_once(server, client, train_file):
    server.state.add("POST", JOBS, 503)
    job = client.submit("tiny", train_file)
    assert server.state.n("POST", JOBS) == 2
    keys = [r["headers"].get("idempotency-key") for r in server.state.seen
            if r["method"] == "POST" and r["path"] == JOBS]
    assert len(keys) == 2 and keys[0] and keys[0] == keys[1]
    assert list(server.state.jobs) == [job.id]


def test_retry_after_is_honoured(server, client):
    server.state.add("GET", "/v1/models", ("retry-after", 429, 1))
    t0 = time.monotonic()
    models = client.models.list()
    assert time.monotonic() - t0 >= 0.9
    assert [m.id for m in models] == ["tiny", "smollm2-135m"]
    assert server.state.n("GET", "/v1/models") == 2


def test_rate_limit_surfaces_when_retries_are_off(server):
    server.state.add("GET", "/v1/models", ("retry-after", 429, 0))
    with Client(server.base_url, api_key="sk-test-good", max_retries=0) as c:
        with pytest.raises(RateLimitError):
            c.models.list()


def test_connection_refused_is_retried_then_typed():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Nothing listens on the port now.
    c = Client(f"http://127.0.0.1:{port}", api_key="x", max_retries=2)
    c.retry_policy.initial_delay = 0.01
    sleeps = _record_sleeps(c)
    with pytest.raises(APIConnectionError) as exc:
        c.jobs.list()
    assert not isinstance(exc.value, APITimeoutError)
    assert len(sleeps) == 2


def test_timeout_is_typed_and_retried_for_get(server):
    server.state.add("GET", "/v1/models", ("sleep", 1.5), ("sleep", 1.5))
    c = Client(server.base_url, api_key="sk-test-good", timeout=0.3, max_retries=1)
    c.retry_policy.initial_delay = 0.01
    t0 = time.monotonic()
    with pytest.raises(APITimeoutError):
        c.models.list()
    assert time.monotonic() - t0 < 1.4  # did not wait for the slow answers
    assert server.state.n("GET", "/v1/models") == 2


def test_timeout_of_non_idempotent_post_is_not_retried(server, train_file):
    server.state.add("POST", "/v1/files", ("sleep", 1.0))
    c = Client(server.base_url, api_key="sk-test-good", timeout=0.3, max_retries=3)
    with pytest.raises(APITimeoutError):
        c.files.upload(train_file)
    assert server.state.n("POST", "/v1/files") == 1


# -- typed errors ----------------------------------------------------------------------------


def test_auth_error(server):
    c = Client(server.base_url, api_key="sk-wrong")
    with pytest.raises(AuthenticationError) as exc:
        c.jobs.list()
    assert exc.value.status_code == 401 and exc.value.code == "invalid_api_key"
    assert "Invalid or missing API key" in str(exc.value)


def test_env_vars_supply_url_and_key(server, monkeypatch):
    monkeypatch.setenv("LORAPOOL_BASE_URL", server.base_url + "/v1")  # OpenAI style is fine
    monkeypatch.setenv("LORAPOOL_API_KEY", "sk-test-good")
    assert Client().models.list()


def test_not_found_and_conflict(server, client):
    with pytest.raises(NotFoundError) as exc:
        client.jobs.get("ftjob-nope")
    assert exc.value.param == "fine_tuning_job_id" and "ftjob-nope" in exc.value.message
    job = server.state.make_job(status="succeeded")
    with pytest.raises(ConflictError) as exc2:
        client.jobs.cancel(job["id"])
    assert "already succeeded" in exc2.value.message
    # A conflict is an answer, not a failure: not retried.
    assert server.state.n("POST", f"{JOBS}/{job['id']}/cancel") == 1


def test_bad_request_names_the_param(server, client, train_file):
    with pytest.raises(BadRequestError) as exc:
        client.submit("tiny", train_file, max_seq_len=32768)
    e = exc.value
    assert isinstance(e, InvalidRequestError) and e.status_code == 400
    assert e.param == "max_seq_len" and "4096" in e.message and e.code == "too_large"
    assert "(param: max_seq_len)" in str(e)


def test_fastapi_validation_error_names_the_param(server, client):
    with pytest.raises(BadRequestError) as exc:
        client.jobs.list(limit=1000)
    assert exc.value.status_code == 422 and exc.value.param == "limit"


def test_payload_too_large(server, client, tmp_path):
    big = tmp_path / "big.jsonl"
    big.write_text('{"text": "' + "x" * 20_000 + '"}\n')
    with pytest.raises(PayloadTooLargeError) as exc:
        client.files.upload(big)
    assert exc.value.param == "file" and "over the limit" in exc.value.message


def test_plain_text_500_is_typed_with_body_as_message(server):
    server.state.add("GET", "/v1/models", ("text", 500))
    with Client(server.base_url, api_key="sk-test-good", max_retries=0) as c:
        with pytest.raises(InternalServerError) as exc:
            c.models.list()
    assert "upstream exploded" in exc.value.message and exc.value.status_code == 500


# -- files, submit ---------------------------------------------------------------------------


def test_files_upload_list_get_delete(server, client, train_file):
    f = client.files.upload(train_file)
    assert f.id.startswith("file-") and f.bytes == train_file.stat().st_size
    assert server.state.uploads[f.id] == train_file.read_bytes()
    assert [x.id for x in client.files.list().data] == [f.id]
    assert client.files.get(f.id).filename == "train.jsonl"
    assert client.files.delete(f.id).deleted
    with pytest.raises(NotFoundError):
        client.files.get(f.id)


def test_submit_uploads_local_paths_first(server, client, train_file, tmp_path):
    valid = tmp_path / "valid.jsonl"
    valid.write_text(train_file.read_text())
    job = client.submit("tiny", train_file, validation_file=str(valid), n_epochs=2,
                        batch_size=4, learning_rate=1e-3, lora={"r": 8, "alpha": 16},
                        max_seq_len=256, seed=7, metadata={"team": "nlp"})
    order = [(r["method"], r["path"]) for r in server.state.seen]
    assert order == [("POST", "/v1/files"), ("POST", "/v1/files"), ("POST", JOBS)]
    body = server.state.jobs[job.id]["request_body"]
    assert body["training_file"] == job.training_file and job.training_file in server.state.files
    assert body["validation_file"] in server.state.files
    assert body["hyperparameters"] == {"n_epochs": 2, "batch_size": 4}
    assert body["lora"]["r"] == 8 and body["lora"]["alpha"] == 16
    assert body["learning_rate"] == 1e-3 and body["seed"] == 7
    assert body["metadata"] == {"team": "nlp"} and body["max_seq_len"] == 256


def test_submit_with_file_id_uploads_nothing(server, client, train_file):
    f = client.files.upload(train_file)
    client.submit("tiny", f.id)
    assert server.state.n("POST", "/v1/files") == 1


@pytest.mark.parametrize("kwargs,param", [
    ({"lora": {"r": 0}}, "lora.r"),
    ({"lora": {"rank": 4}}, "lora.rank"),
    ({"n_epochs": 0}, "n_epochs"),
    ({"quantization": "int3"}, "quantization"),
    ({"validation_file": "missing.jsonl"}, "validation_file"),
    ({"learning_rate": -1.0}, "learning_rate"),
])
def test_submit_checks_arguments_before_uploading(server, client, train_file, kwargs, param):
    with pytest.raises(InvalidParameterError) as exc:
        client.submit("tiny", train_file, **kwargs)
    assert exc.value.param == param
    assert server.state.seen == []  # nothing uploaded, nothing created


def test_submit_missing_training_file(server, client, tmp_path):
    with pytest.raises(InvalidParameterError) as exc:
        client.submit("tiny", tmp_path / "nope.jsonl")
    assert exc.value.param == "training_file" and "nope.jsonl" in str(exc.value)


# -- jobs ------------------------------------------------------------------------------------


def test_list_get_cancel_checkpoints(server, client):
    a, b = server.state.make_job(), server.state.make_job(status="running")
    page = client.jobs.list(limit=1)
    assert [j.id for j in page.data] == [b["id"]] and page.has_more
    nxt = client.jobs.list(after=page.last_id)
    assert [j.id for j in nxt.data] == [a["id"]] and not nxt.has_more
    assert client.jobs.cancel(b["id"]).status == "cancelled"
    assert sorted(c.step_number for c in client.jobs.checkpoints(a["id"])) == [2, 4]


def test_wait_returns_at_terminal_status(server, client):
    job = server.state.make_job()
    server.state.scripts[job["id"]] = [
        {"status": "queued"}, {"status": "running", "step": 1}, {"status": "running", "step": 3},
        {"status": "failed", "step": 3, "error": {"code": "oom", "message": "out of memory"}},
        {"status": "running"},  # never reached
    ]
    done = client.jobs.wait(job["id"], poll_interval=0.02)
    assert done.status == "failed" and done.error.code == "oom"
    assert server.state.n("GET", f"{JOBS}/{job['id']}") == 4


def test_wait_progress_bar_shows_steps_and_loss(server, client, capsys):
    job = server.state.make_job()
    server.state.make_event(job["id"], "step 4", type="metrics",
                            data={"step": 4, "train_loss": 0.1234})
    server.state.scripts[job["id"]] = [{"status": "running", "step": 2},
                                       {"status": "succeeded", "step": 4}]
    done = client.jobs.wait(job["id"], poll_interval=0.02, progress=True)
    assert done.status == "succeeded"
    err = capsys.readouterr().err
    assert "4/4" in err and "loss 0.1234" in err and job["id"] in err


def test_latest_loss_prefers_the_later_step_within_one_second():
    from lorapool._plans import latest_loss
    from lorapool.types import JobEvent

    # A page comes newest first; all three were written in the same second.
    page = [JobEvent(id=f"e{s}", created_at=100, message=f"step {s}", type="metrics",
                     data={"step": s, "train_loss": 1.0 / s}) for s in (3, 2, 1)]
    assert latest_loss(page) == pytest.approx(1 / 3)
    assert latest_loss(list(reversed(page))) == pytest.approx(1 / 3)
    assert latest_loss([JobEvent(id="m", created_at=1, message="hi")]) is None


def test_wait_timeout(server, client):
    job = server.state.make_job(status="running")
    t0 = time.monotonic()
    with pytest.raises(JobWaitTimeout) as exc:
        client.jobs.wait(job["id"], poll_interval=0.05, timeout=0.3)
    assert 0.25 <= time.monotonic() - t0 < 2.0
    assert exc.value.job.status == "running" and isinstance(exc.value, LorapoolError)


def test_events_oldest_first_across_pages(server, client):
    job = server.state.make_job()
    for i in range(25):  # the server pages 20 newest-first
        server.state.make_event(job["id"], f"m{i}")
    assert [e.message for e in client.jobs.events(job["id"])] == [f"m{i}" for i in range(25)]


def test_events_follow_reconnects_after_drop_with_last_event_id(server, client):
    job = server.state.make_job(status="running")
    jid = job["id"]
    server.state.make_event(jid, "queued")
    ev = [{"object": "fine_tuning.job.event", "id": f"{jid}-s{i}", "created_at": 3000 + i,
           "message": f"s{i}"} for i in range(5)]
    server.state.streams[jid] = [(ev[:2], "drop"), (ev[2:], "end")]
    got = [e.message for e in client.jobs.events(jid, follow=True)]
    assert got == ["queued", "s0", "s1", "s2", "s3", "s4"]
    streams = [r for r in server.state.seen
               if r["path"] == f"{JOBS}/{jid}/events" and r["query"].get("stream") == "true"]
    assert len(streams) == 2
    assert streams[0]["headers"].get("last-event-id") == f"{jid}-ev-001"
    assert streams[1]["headers"].get("last-event-id") == f"{jid}-s1"


def test_events_follow_fills_gap_missed_by_stream(server, client):
    job = server.state.make_job(status="running")
    jid = job["id"]
    # The stream ends without sending the last event (which is in the store): filled at the end.
    server.state.streams[jid] = [([], "end")]
    server.state.make_event(jid, "first")

    server.state.scripts[jid] = [{"status": "running"}]
    events = client.jobs.events(jid, follow=True)
    assert next(events).message == "first"
    server.state.make_event(jid, "late")  # stored, never streamed
    assert [e.message for e in events] == ["late"]


def test_breaking_out_of_follow_closes_the_stream(server, client):
    job = server.state.make_job(status="running")
    jid = job["id"]
    ev = [{"object": "fine_tuning.job.event", "id": f"{jid}-s{i}", "created_at": 3000 + i,
           "message": f"s{i}"} for i in range(3)]
    server.state.streams[jid] = [(ev, "end")]
    events = client.jobs.events(jid, follow=True)
    first = next(events)
    events.close()  # what a `break` out of a for loop does
    assert first.message == "s0"
    assert client.jobs.get(jid).id == jid  # the connection pool is still usable


# -- nodes, models, adapters -----------------------------------------------------------------


def test_lists_follow_pages(server, client):
    assert [n.name for n in client.nodes.list()] == ["desk-0", "desk-1", "desk-2"]
    assert server.state.n("GET", "/v1/nodes") == 2


def test_download_extracts_adapter(server, client, tmp_path):
    dest = client.adapters.download("ad-good", tmp_path / "out" / "adapter")
    assert dest == tmp_path / "out" / "adapter"
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", "lorapool.json"])
    assert (dest / "adapter_config.json").read_bytes() == b'{"peft_type": "LORA", "r": 4}'
    assert sorted(p.name for p in dest.parent.iterdir()) == ["adapter"]  # no temp leftovers
    with pytest.raises(FileExistsError):
        client.adapters.download("ad-good", dest)
    assert client.adapters.download("ad-good", dest, overwrite=True) == dest


@pytest.mark.parametrize("aid,why", [("ad-evil", ".."), ("ad-abs", "absolute"),
                                     ("ad-link", "links outside"), ("ad-hardlink", "..")])
def test_download_refuses_unsafe_archives(server, client, tmp_path, aid, why):
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(UnsafeArchiveError) as exc:
        client.adapters.download(aid, root / "sub" / "adapter")
    assert why in str(exc.value)
    # Nothing was written: no destination, no temp files, nothing beside or above it.
    assert list(root.rglob("*")) == [root / "sub"]
    assert not (tmp_path / "evil").exists() and not (root / "evil").exists()


def test_download_unknown_adapter(server, client, tmp_path):
    with pytest.raises(NotFoundError):
        client.adapters.download("ad-missing", tmp_path / "a")
    assert not (tmp_path / "a").exists()
    assert list(tmp_path.iterdir()) == []
