"""Experiment trackers (`integrations`): the URI policy, and real jobs through a real service
logging to W&B (offline) and MLflow (a file store), read back with each tracker's own code."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

GiB = 1 << 30


# -- the tenant's tracker URI policy --------------------------------------------------------------
def test_mlflow_uri_policy(tmp_path, monkeypatch):
    from lorapool.service.pool.trackers import TrackerRefused, resolve_mlflow_uri

    monkeypatch.delenv("LORAPOOL_TRACKER_ALLOW", raising=False)
    data = tmp_path / "data"
    home = (data / "trackers" / "acme").resolve()
    assert resolve_mlflow_uri(None, data, "acme") == (home / "mlruns").as_uri()
    assert resolve_mlflow_uri("runs/x", data, "acme") == (home / "runs" / "x").as_uri()
    assert resolve_mlflow_uri((home / "a").as_uri(), data, "acme") == (home / "a").as_uri()
    for bad in ("/etc/mlruns", f"file://{tmp_path}/elsewhere", str(data / "artifacts"),
                str(data / "trackers" / "globex" / "mlruns"),  # another tenant's folder
                "http://169.254.169.254/", "https://mlflow.example.com", "ftp://x/y"):
        with pytest.raises(TrackerRefused):
            resolve_mlflow_uri(bad, data, "acme")
    # A symlink inside the tenant's folder must not lead out of it.
    home.mkdir(parents=True)
    (home / "link").symlink_to(tmp_path)
    with pytest.raises(TrackerRefused, match="outside"):
        resolve_mlflow_uri("link/mlruns", data, "acme")
    # What the admin allows.
    monkeypatch.setenv("LORAPOOL_TRACKER_ALLOW", f"{tmp_path}/shared, https://mlflow.example.com/")
    assert resolve_mlflow_uri(f"{tmp_path}/shared/runs", data, "acme").startswith("file://")
    assert resolve_mlflow_uri("https://mlflow.example.com/", data, "acme")
    with pytest.raises(TrackerRefused):
        resolve_mlflow_uri("https://mlflow.example.com.evil/", data, "acme")


def test_integrations_request_validation():
    from pydantic import ValidationError

    from lorapool.service.api.job_request import CreateJobRequest, integrations

    req = CreateJobRequest(model="m", training_file="file-1", integrations=[
        {"type": "wandb", "wandb": {"project": "p", "tags": ["a"]}},
        {"type": "mlflow", "mlflow": {"experiment": "e"}}])
    assert integrations(req) == [{"type": "wandb", "wandb": {"project": "p", "tags": ["a"]}},
                                 {"type": "mlflow", "mlflow": {"experiment": "e"}}]
    for bad in ([{"type": "comet"}], [{"type": "wandb", "wandb": {}}],
                [{"type": "wandb", "wandb": {"project": "../x"}}],
                [{"type": "mlflow", "mlflow": {"tracking_uri": "../../etc"}}],
                [{"type": "mlflow", "mlflow": {"tracking_uri": "s3://bucket"}}],
                [{"type": "wandb", "wandb": {"project": "p", "api_key": "k"}}],
                [{"type": "wandb", "wandb": {"project": "p"}}] * 5):
        with pytest.raises(ValidationError):
            CreateJobRequest(model="m", training_file="file-1", integrations=bad)


# -- reading a W&B offline run back ---------------------------------------------------------------
def read_wandb_records(path: Path) -> list:
    """The records of an offline `.wandb` file as wandb's own protobuf `Record`s.

    wandb >= 0.19 no longer ships a Python reader (its Go core writes the file); the file is the
    LevelDB log format wandb documents (a 7-byte ":W&B" header, 32 KiB blocks of chunks with a
    7-byte header: crc32c, length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4), each record a
    serialized `wandb_internal_pb2.Record`."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", raw[:7])
    assert ident == b":W&B" and magic == 0xBEE1, "not a wandb offline run file"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data = raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    return records


def wandb_history(path: Path) -> tuple[list[dict], dict]:
    import json

    history, summary = [], {}
    for rec in read_wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                            for i in rec.history.item})
        elif kind == "summary":
            for i in rec.summary.update:
                summary[i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
    return history, summary


# -- real jobs through the service ----------------------------------------------------------------
@pytest.fixture(scope="module")
def service(tmp_path_factory):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from lorapool.service.admin import add_model, create_token
    from lorapool.service.config import Settings
    from lorapool.service.server import Service, free_port
    from lorapool.service.train.tiny import make_tiny_llama

    root = tmp_path_factory.mktemp("trackers")
    model_dir = make_tiny_llama(root / "tiny-llama")
    settings = Settings.from_env(data_dir=root / "data", host="127.0.0.1", port=free_port())
    add_model(settings, "tiny-llama", model_dir)
    token = create_token(settings, "acme")
    svc = Service(settings, local_node_options={"name": "local-cpu", "cpu_only": True,
                                                "cpu_memory": 8 * GiB,
                                                "work_dir": str(root / "node-local")},
                  ray_init_options={"num_cpus": 2})
    svc.start()
    try:
        yield {"svc": svc, "token": token, "root": root, "data": settings.data_dir}
    finally:
        svc.stop()


def _run_job(service, toy_data, integrations):
    from lorapool import Client

    root = service["root"]
    train = toy_data.write_jsonl(root / "train.jsonl", toy_data.chat_records(16))
    valid = toy_data.write_jsonl(root / "valid.jsonl", toy_data.chat_records(4, seed=1))
    client = Client(service["svc"].base_url, api_key=service["token"], timeout=30)
    job = client.submit("tiny-llama", train, validation_file=valid, n_epochs=1, batch_size=4,
                        micro_batch_size=4, learning_rate=1e-3, max_seq_len=64,
                        lora={"r": 4, "alpha": 8},
                        extra_body={"integrations": integrations})
    job = client.jobs.wait(job.id, timeout=300)
    assert job.status == "succeeded", job.error
    # The subscriber works off the writer's thread: let it catch up before reading back.
    for sub in service["svc"]._subscribers:
        assert sub.drain(60)
    return client, job


def test_wandb_offline_run_records_metrics(service, toy_data):
    client, job = _run_job(service, toy_data, [
        {"type": "wandb", "wandb": {"project": "lp-test", "name": "run-1", "tags": ["ci"]}}])
    assert job.integrations[0]["wandb"]["project"] == "lp-test"
    events = [e.message for e in client.jobs.events(job.id)]
    assert not any(m.startswith("tracker ") for m in events), events
    runs = list((service["data"] / "trackers" / "acme" / "wandb" / "wandb").glob(
        "offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    history, summary = wandb_history(runs[0])
    steps = [h for h in history if "train/loss" in h]
    assert [h["_step"] for h in steps] == [1, 2, 3, 4]  # 16 examples / batch 4
    # The schedule may start or end at 0; the rate is logged every step all the same.
    assert all(h["train/learning_rate"] >= 0 and h["train/tokens_per_s"] > 0 for h in steps)
    assert max(h["train/learning_rate"] for h in steps) > 0
    assert any("eval/loss" in h for h in history)
    assert summary["adapter.id"] == job.fine_tuned_model
    assert summary["status"] == "succeeded"
    # W&B's SDK telemetry stays off in the head (it posts to api.forge.coreweave.com a minute
    # into an offline run otherwise: seen under an audit hook, too slow to wait for here).
    import wandb.env

    assert not wandb.env.error_reporting_enabled()


def test_mlflow_file_store_records_metrics_and_a_failing_tracker_fails_nothing(
        service, toy_data):
    from mlflow.tracking import MlflowClient

    blocked = service["data"] / "trackers" / "acme" / "blocked"
    blocked.parent.mkdir(parents=True, exist_ok=True)
    blocked.write_text("a file where MLflow wants a folder")
    client, job = _run_job(service, toy_data, [
        {"type": "mlflow", "mlflow": {"experiment": "lp-exp", "run_name": "run-2"}},
        {"type": "mlflow", "mlflow": {"tracking_uri": "blocked/mlruns"}}])
    failed = [e for e in client.jobs.events(job.id) if e.message.startswith("tracker mlflow failed")]
    assert len(failed) == 1 and failed[0].level == "warn", failed

    ml = MlflowClient(tracking_uri=(service["data"] / "trackers" / "acme" / "mlruns").resolve()
                      .as_uri())
    exp = ml.get_experiment_by_name("lp-exp")
    (run,) = ml.search_runs([exp.experiment_id])
    assert run.info.run_name == "run-2" and run.info.status == "FINISHED"
    loss = ml.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in loss] == [1, 2, 3, 4]
    assert ml.get_metric_history(run.info.run_id, "eval_loss")
    assert len(ml.get_metric_history(run.info.run_id, "train_learning_rate")) == 4
    assert ml.get_metric_history(run.info.run_id, "train_tokens_per_s")
    assert run.data.tags["lorapool.adapter.id"] == job.fine_tuned_model
    assert run.data.params["learning_rate"] == "0.001"


def test_tracker_uri_outside_the_data_dir_is_a_400(service, toy_data):
    import httpx

    r = httpx.post(f"{service['svc'].base_url}/v1/fine_tuning/jobs",
                   headers={"Authorization": f"Bearer {service['token']}"},
                   json={"model": "tiny-llama", "training_file": "file-x", "integrations": [
                       {"type": "mlflow", "mlflow": {"tracking_uri": "/etc/mlruns"}}]})
    assert r.status_code in (400, 404), r.text
    # The file is checked first; with a real file the URI is what is refused.
    from lorapool import Client

    client = Client(service["svc"].base_url, api_key=service["token"], timeout=30)
    f = client.files.upload(toy_data.write_jsonl(service["root"] / "t.jsonl",
                                                 toy_data.chat_records(4)))
    r = httpx.post(f"{service['svc'].base_url}/v1/fine_tuning/jobs",
                   headers={"Authorization": f"Bearer {service['token']}"},
                   json={"model": "tiny-llama", "training_file": f.id, "integrations": [
                       {"type": "mlflow", "mlflow": {"tracking_uri": "/etc/mlruns"}}]})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "integrations[0].mlflow.tracking_uri" and "outside" in err["message"]
    r = httpx.post(f"{service['svc'].base_url}/v1/fine_tuning/jobs",
                   headers={"Authorization": f"Bearer {service['token']}"},
                   json={"model": "tiny-llama", "training_file": f.id, "integrations": [
                       {"type": "wandb", "wandb": {"name": "no project"}}]})
    assert r.status_code == 400 and "integrations" in r.json()["error"]["param"], r.text
    assert not os.path.exists("/etc/mlruns")
