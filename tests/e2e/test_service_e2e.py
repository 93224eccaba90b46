"""End to end on one machine: real HTTP (uvicorn on loopback), a real local Ray head, a real
SQLite file, the real trainer on a tiny random Llama — through `lorapool.Client` and through the
official `openai` SDK.
"""

from __future__ import annotations

import json
import time

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


def _chat_lines(n: int, seed: int = 0) -> str:
    import random

    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        lines.append(json.dumps({"messages": [
            {"role": "user", "content": f"{a}+{b}?"},
            {"role": "assistant", "content": f"{a + b}"},
        ]}))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from tests.support.local_service import local_service

    with local_service(tmp_path_factory.mktemp("e2e")) as local:
        (local.root / "train.jsonl").write_text(_chat_lines(32))
        (local.root / "valid.jsonl").write_text(_chat_lines(8, seed=1))
        yield {"svc": local.svc, "tokens": local.tokens, "root": local.root,
               "model_dir": local.model_dir, "settings": local.settings}


def _client(service, tenant="acme"):
    from lorapool import Client

    return Client(service["svc"].base_url, api_key=service["tokens"][tenant], timeout=30)


def test_client_flow_upload_submit_events_download(service, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    client = _client(service)
    job = client.submit(
        "tiny-llama", service["root"] / "train.jsonl",
        validation_file=service["root"] / "valid.jsonl",
        n_epochs=1, batch_size=4, micro_batch_size=2, learning_rate=1e-3,
        max_seq_len=64, lora={"r": 4, "alpha": 8}, checkpoint_every=4, seed=3,
    )
    assert job.status in ("validating_files", "queued", "running")
    job = client.jobs.wait(job.id, timeout=600)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model and job.node_id == "local-cpu"

    events = list(client.jobs.events(job.id))
    messages = [e.message for e in events]
    assert any("placed on local-cpu" in m for m in messages), messages
    steps = [e.data["step"] for e in events if e.type == "metrics" and e.data and "train_loss" in e.data]
    assert steps == sorted(steps) and steps[-1] == 8  # 32 examples / batch 4
    checkpoints = client.jobs.checkpoints(job.id)
    # Every checkpoint_every steps; the last step ends in the adapter itself.
    assert sorted(c.step_number for c in checkpoints) == [4]

    adapter = client.adapters.get(job.fine_tuned_model)
    assert adapter.base_model == "tiny-llama" and adapter.job_id == job.id
    folder = client.adapters.download(adapter.id, tmp_path / "adapter")
    assert (folder / "adapter_model.safetensors").exists()
    assert not list(folder.rglob("*.bin"))
    meta = json.loads((folder / "lorapool.json").read_text())
    assert meta["base_model_sha256"]

    base = AutoModelForCausalLM.from_pretrained(service["model_dir"])
    tuned = PeftModel.from_pretrained(base, folder)
    ids = torch.tensor([[4, 20, 21, 22]])
    with torch.no_grad():
        with tuned.disable_adapter():
            plain = tuned(input_ids=ids).logits
        adapted = tuned(input_ids=ids).logits
    assert not torch.allclose(plain, adapted), "the adapter changed nothing"


def test_openai_sdk_flow(service):
    import openai

    oa = openai.OpenAI(base_url=service["svc"].base_url + "/v1",
                       api_key=service["tokens"]["acme"], max_retries=0)
    with open(service["root"] / "train.jsonl", "rb") as fh:
        f = oa.files.create(file=fh, purpose="fine-tune")
    assert f.id.startswith("file-")
    job = oa.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id,
                                     hyperparameters={"n_epochs": 1, "batch_size": 8},
                                     extra_body={"max_seq_len": 64, "lora": {"r": 2, "alpha": 4}})
    deadline = time.time() + 600
    while True:
        job = oa.fine_tuning.jobs.retrieve(job.id)
        if job.status in ("succeeded", "failed", "cancelled") or time.time() > deadline:
            break
        time.sleep(1)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model
    events = oa.fine_tuning.jobs.list_events(job.id, limit=100)
    assert any("Training finished" in e.message for e in events.data)
    listed = oa.fine_tuning.jobs.list(limit=50)
    assert job.id in [j.id for j in listed.data]


def test_other_tenant_sees_nothing(service):
    from lorapool.errors import NotFoundError

    acme, globex = _client(service, "acme"), _client(service, "globex")
    jobs = acme.jobs.list().data
    assert jobs, "the flows above made jobs"
    with pytest.raises(NotFoundError):
        globex.jobs.get(jobs[0].id)
    assert globex.jobs.list().data == []


def test_cancel_running_job_keeps_its_checkpoint(service):
    client = _client(service)
    (service["root"] / "long.jsonl").write_text(_chat_lines(400, seed=5))
    job = client.submit("tiny-llama", service["root"] / "long.jsonl", n_epochs=3, batch_size=2,
                        micro_batch_size=2, max_seq_len=64, checkpoint_every=2,
                        lora={"r": 2, "alpha": 4})
    deadline = time.time() + 300
    while time.time() < deadline:
        job = client.jobs.get(job.id)
        if job.status == "running" and (job.step or 0) >= 3:
            break
        time.sleep(0.5)
    assert job.status == "running", job
    client.jobs.cancel(job.id)
    job = client.jobs.wait(job.id, timeout=300)
    assert job.status == "cancelled"
    assert job.step is None or job.step < job.total_steps
    assert client.jobs.checkpoints(job.id), "a cancelled job keeps its last checkpoint"
