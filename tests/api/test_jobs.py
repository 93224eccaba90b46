"""POST/GET /v1/fine_tuning/jobs, cancel, events and checkpoints, against the real store."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from .conftest import chat_lines, error_of, upload


@pytest.fixture
def file_id(client):
    return upload(client, chat_lines(16)).json()["id"]


def _create(client, file_id, **body):
    return client.post("/v1/fine_tuning/jobs",
                       json={"model": "tiny-llama", "training_file": file_id, **body})


def test_create_resolves_the_spec_queues_and_wakes(client, env, file_id):
    r = _create(client, file_id, hyperparameters={"n_epochs": 2, "batch_size": 4,
                                                  "learning_rate_multiplier": 5},
                lora={"r": 4, "alpha": 8}, max_seq_len=64, checkpoint_every=3, seed=7,
                suffix="v1", metadata={"team": "nlp"})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["object"] == "fine_tuning.job" and job["id"].startswith("ftjob-")
    assert (job["status"], job["model"], job["training_file"]) == ("queued", "tiny-llama",
                                                                   file_id)
    assert job["hyperparameters"] == {"n_epochs": 2, "batch_size": 4,
                                      "learning_rate_multiplier": 5.0}
    assert job["lora"]["r"] == 4 and job["metadata"] == {"team": "nlp"}
    assert job["organization_id"] == "acme" and job["suffix"] == "v1" and job["seed"] == 7
    spec = env.executor.checked[-1]
    assert (spec.n_epochs, spec.batch_size, spec.max_seq_len, spec.seed) == (2, 4, 64, 7)
    assert spec.learning_rate == pytest.approx(1e-3)  # 2e-4 × 5
    assert spec.base_model == str(tiny_path(env)) and not spec.trust_remote_code
    assert env.executor.wakes == 1
    stored = env.store.get_job(job["id"])
    assert "base_model" not in stored.spec and stored.spec["lora"]["r"] == 4
    assert stored.model_sha256 == env.store.get_model("tiny-llama").sha256
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    assert [e["message"] for e in events] == ["Job queued"]


def tiny_path(env):
    return env.store.get_model("tiny-llama").path


def test_auto_hyperparameters_get_defaults(client, env, file_id):
    job = _create(client, file_id).json()
    assert job["hyperparameters"] == {"n_epochs": 3, "batch_size": 8,
                                      "learning_rate_multiplier": 1.0}
    spec = env.executor.checked[-1]
    assert spec.learning_rate == pytest.approx(2e-4) and 8 % spec.micro_batch_size == 0


def test_unknown_model_lists_the_available_names(client, env, file_id):
    r = _create(client, file_id, model="gpt-9")
    assert r.status_code == 400
    err = error_of(r)
    assert err["param"] == "model" and "gpt-9" in err["message"]
    assert "tiny-llama" in err["message"]
    assert env.store.list_jobs("acme")[0] == []


@pytest.mark.parametrize("param", ["training_file", "validation_file"])
def test_unknown_or_foreign_file_is_refused_naming_the_param(client, env, file_id, param):
    foreign = upload(client, chat_lines(4), headers=env.headers("globex")).json()["id"]
    for bad in ("file-doesnotexist", foreign):
        body = {"training_file": file_id, param: bad}
        r = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", **body})
        assert r.status_code == 400, r.text
        err = error_of(r)
        assert err["param"] == param and bad in err["message"]
    assert env.store.list_jobs("acme")[0] == []


@pytest.mark.parametrize(("body", "param"), [
    ({"hyperparameters": {"n_epochs": -1}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"n_epochs": 10_000}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"batch_size": 0}}, "hyperparameters.batch_size"),
    ({"hyperparameters": {"batch_size": 100_000}}, "hyperparameters.batch_size"),
    ({"hyperparameters": {"learning_rate_multiplier": -0.5}},
     "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"learning_rate_multiplier": 1e9}},
     "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"n_epochs": "many"}}, "hyperparameters.n_epochs"),
    ({"learning_rate": 0}, "learning_rate"),
    ({"learning_rate": 5.0}, "learning_rate"),
    ({"max_seq_len": 4}, "max_seq_len"),
    ({"max_seq_len": 10_000_000}, "max_seq_len"),
    ({"micro_batch_size": -2}, "micro_batch_size"),
    ({"hyperparameters": {"batch_size": 6}, "micro_batch_size": 4}, "micro_batch_size"),
    ({"hyperparameters": {"batch_size": 2}, "micro_batch_size": 4}, "micro_batch_size"),
    ({"lora": {"r": 0}}, "lora.r"),
    ({"lora": {"r": 8, "dropout": 1.5}}, "lora.dropout"),
    ({"lora": {"rank": 8}}, "lora.rank"),
    ({"checkpoint_every": 0}, "checkpoint_every"),
    ({"quantization": "int3"}, "quantization"),
    ({"seed": -1}, "seed"),
    ({"suffix": "no spaces allowed"}, "suffix"),
    ({"frobnicate": True}, "frobnicate"),
    ({"hyperparameters": {"learning_rate_multiplier": 2}, "learning_rate": 1e-4},
     "learning_rate"),
    ({"placement": {"min_memory_gib": -1}}, "placement.min_memory_gib"),
    ({"placement": {"priority": 1000}}, "placement.priority"),
    ({"placement": {"nodes": "desk1"}}, "placement.nodes"),
    ({"max_seq_len": 64, "placement": {"min_seq_len": 128}}, "placement.min_seq_len"),
])
def test_absurd_parameters_are_400_naming_the_param(client, env, file_id, body, param):
    r = _create(client, file_id, **body)
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["param"] == param, err
    assert param.split(".")[-1] in err["message"], err
    assert env.store.list_jobs("acme")[0] == [] and env.executor.wakes == 0


def test_missing_fields_and_bad_json(client, env):
    r = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama"})
    assert r.status_code == 400
    assert error_of(r)["param"] == "training_file" and "Missing" in error_of(r)["message"]
    r = client.post("/v1/fine_tuning/jobs", content=b"{nope",
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in error_of(r)["message"]


def test_a_job_no_node_can_hold_is_refused_with_the_reason(client, env, file_id):
    env.executor.refusal = "needs 9.1 GiB; largest free node has 7.6 GiB (rtx-3070-desk12)"
    r = _create(client, file_id)
    assert r.status_code == 400
    err = error_of(r)
    assert err["code"] == "insufficient_memory" and "rtx-3070-desk12" in err["message"]
    assert env.store.list_jobs("acme")[0] == []


def test_placement_constraints_reach_the_executor_and_come_back(client, env, file_id):
    placement = {"node": "rtx-4090-desk3", "labels": {"dept": "legal"}, "min_memory_gib": 8,
                 "require_bf16": True, "priority": 5, "min_seq_len": 64}
    r = _create(client, file_id, max_seq_len=128, placement=placement)
    assert r.status_code == 200, r.text
    assert env.executor.placements[-1] == placement
    assert r.json()["placement"] == {**placement, "allow_autofit": True, "workers": 1,
                                     "min_workers": None}
    stored = env.store.get_job(r.json()["id"])
    assert stored.placement == placement
    # A job without constraints says so.
    r = _create(client, file_id)
    assert r.json()["placement"] is None and env.executor.placements[-1] == {}


def test_idempotency_key_returns_the_first_job(client, env, file_id):
    key = {"Idempotency-Key": "retry-me-1"}
    first = client.post("/v1/fine_tuning/jobs",
                        json={"model": "tiny-llama", "training_file": file_id},
                        headers=key).json()
    again = client.post("/v1/fine_tuning/jobs",
                        json={"model": "tiny-llama", "training_file": file_id},
                        headers=key).json()
    assert again["id"] == first["id"]
    assert len(env.store.list_jobs("acme")[0]) == 1 and env.executor.wakes == 1
    other = client.post("/v1/fine_tuning/jobs",
                        json={"model": "tiny-llama", "training_file": file_id},
                        headers={"Idempotency-Key": "retry-me-2"}).json()
    assert other["id"] != first["id"]


def test_concurrent_retries_with_one_key_make_one_job(env, live, file_id):
    results: list[str] = []

    def post() -> None:
        r = httpx.post(f"{live.url}/v1/fine_tuning/jobs",
                       json={"model": "tiny-llama", "training_file": file_id},
                       headers={**env.headers(), "Idempotency-Key": "same"}, timeout=30)
        results.append(r.json()["id"])

    threads = [threading.Thread(target=post) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6 and len(set(results)) == 1
    assert len(env.store.list_jobs("acme")[0]) == 1


def test_list_jobs_paginates_newest_first(client, env, file_id):
    ids = [_create(client, file_id).json()["id"] for _ in range(5)]
    seen, after = [], None
    while True:
        params = {"limit": 2, **({"after": after} if after else {})}
        page = client.get("/v1/fine_tuning/jobs", params=params).json()
        seen += [j["id"] for j in page["data"]]
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert seen == ids[::-1]
    r = client.get("/v1/fine_tuning/jobs", params={"limit": 0})
    assert r.status_code == 400 and error_of(r)["param"] == "limit"
    r = client.get("/v1/fine_tuning/jobs", params={"after": "ftjob-nope"})
    assert r.status_code == 400 and error_of(r)["param"] == "after"


def test_metadata_filter(client, env, file_id):
    a = _create(client, file_id, metadata={"team": "a"}).json()["id"]
    _create(client, file_id, metadata={"team": "b"})
    got = client.get("/v1/fine_tuning/jobs", params={"metadata[team]": "a"}).json()["data"]
    assert [j["id"] for j in got] == [a]


def test_another_tenants_job_is_404_everywhere(client, env, file_id):
    job = _create(client, file_id).json()
    env.store.add_checkpoint(job["id"], 1, env.artifacts.put_bytes(b"x"), {})
    other = env.headers("globex")
    for method, suffix in (("get", ""), ("post", "/cancel"), ("get", "/events"),
                           ("get", "/checkpoints"), ("get", "/events?stream=true")):
        r = getattr(client, method)(f"/v1/fine_tuning/jobs/{job['id']}{suffix}", headers=other)
        assert r.status_code == 404, suffix
        assert job["id"] in error_of(r)["message"] and "Job queued" not in r.text
    assert client.get("/v1/fine_tuning/jobs", headers=other).json()["data"] == []
    assert env.store.get_job(job["id"]).status == "queued" and env.executor.cancelled == []


def test_cancel_queued_job_is_immediate(client, env, file_id):
    job = _create(client, file_id).json()
    r = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert r.json()["finished_at"] is not None
    # Cancelling again is harmless and changes nothing.
    assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").json()["status"] == \
        "cancelled"


def test_cancel_running_job_asks_the_executor(client, env, file_id):
    job = _create(client, file_id).json()
    assert env.store.transition(job["id"], {"queued"}, "running", node_id="n1")
    r = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "running"
    assert env.executor.cancelled == [job["id"]]
    assert env.store.get_job(job["id"]).cancel_requested
    # The pool ends it; the API then reports it.
    env.store.transition(job["id"], {"running"}, "cancelled", finished_at=int(time.time()))
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] == "cancelled"


def test_failed_job_shows_its_error_and_succeeded_its_model(client, env, file_id):
    a, b = (_create(client, file_id).json()["id"] for _ in range(2))
    env.store.transition(a, {"queued"}, "failed", error_code="invalid_training_file",
                         error_message="line 3: bad", finished_at=1)
    env.store.transition(b, {"queued"}, "succeeded", fine_tuned_model="ft-adapter-x",
                         trained_tokens=123, measured_peak_memory=5, predicted_memory=9,
                         finished_at=2)
    ja = client.get(f"/v1/fine_tuning/jobs/{a}").json()
    assert ja["status"] == "failed"
    assert ja["error"]["code"] == "invalid_training_file" and ja["error"]["message"] == \
        "line 3: bad"
    jb = client.get(f"/v1/fine_tuning/jobs/{b}").json()
    assert (jb["fine_tuned_model"], jb["trained_tokens"]) == ("ft-adapter-x", 123)
    assert jb["memory"]["predicted_bytes"] == 9 and jb["memory"]["measured_peak_bytes"] == 5


def test_events_page_newest_first(client, env, file_id):
    job_id = _create(client, file_id).json()["id"]
    for i in range(5):
        env.store.add_event(job_id, f"Step {i}", type="metrics", data={"step": i, "loss": 1.0})
    page = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 4}).json()
    assert [e["message"] for e in page["data"]] == ["Step 4", "Step 3", "Step 2", "Step 1"]
    assert page["has_more"]
    rest = client.get(f"/v1/fine_tuning/jobs/{job_id}/events",
                      params={"limit": 4, "after": page["data"][-1]["id"]}).json()
    assert [e["message"] for e in rest["data"]] == ["Step 0", "Job queued"]
    assert not rest["has_more"] and rest["data"][0]["data"] == {"step": 0, "loss": 1.0}


def test_checkpoints_list(client, env, file_id):
    job_id = _create(client, file_id).json()["id"]
    for step in (2, 4):
        env.store.add_checkpoint(job_id, step, env.artifacts.put_bytes(str(step).encode()),
                                 {"train_loss": 1.0 / step, "note": "text is dropped"})
    data = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    assert [c["step_number"] for c in data] == [4, 2]
    assert data[0]["metrics"] == {"train_loss": 0.25}
    assert data[0]["fine_tuning_job_id"] == job_id
    assert data[0]["object"] == "fine_tuning.job.checkpoint"


def test_event_stream_sends_each_event_then_ends_with_the_job(env, live, file_id):
    with httpx.Client(base_url=live.url, headers=env.headers(), timeout=30) as http:
        job_id = http.post("/v1/fine_tuning/jobs",
                           json={"model": "tiny-llama", "training_file": file_id}).json()["id"]
        env.store.transition(job_id, {"queued"}, "running")

        def pool() -> None:  # what the scheduler does, from another thread
            for i in range(3):
                time.sleep(0.3)
                env.store.add_event(job_id, f"Step {i}", type="metrics", data={"step": i})
            env.store.add_event(job_id, "Training finished")
            env.store.transition(job_id, {"running"}, "succeeded", finished_at=1)

        t = threading.Thread(target=pool)
        t.start()
        got, ids = [], []
        started = time.time()
        with http.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events",
                         params={"stream": "true"}) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    got.append(json.loads(line[6:])["message"])
                elif line.startswith("id: "):
                    ids.append(line[4:])
        t.join()
        assert got == ["Job queued", "Step 0", "Step 1", "Step 2", "Training finished"]
        assert time.time() - started < 20  # it ended by itself when the job did

        # Resuming with Last-Event-ID replays only what came after.
        with http.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events",
                         params={"stream": "true"},
                         headers={"Last-Event-ID": ids[2]}) as resp:
            rest = [json.loads(line[6:])["message"] for line in resp.iter_lines()
                    if line.startswith("data: ")]
        assert rest == ["Step 2", "Training finished"]
