"""Auth on every route, models, nodes, and adapters (a real PEFT adapter through download)."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from .conftest import error_of


def _v1_routes(app):
    # From the OpenAPI document: every route the app serves, however routers are nested.
    for path, ops in app.openapi()["paths"].items():
        if path.startswith("/v1"):
            for method in ops:
                yield method.upper(), path.replace("{", "").replace("}", "")


def test_every_v1_route_needs_a_valid_bearer_token(env):
    from fastapi.testclient import TestClient

    routes = list(_v1_routes(env.app))
    assert len(routes) >= 15
    with TestClient(env.app) as c:
        for method, path in routes:
            for headers, code in (({}, "missing_api_key"),
                                  ({"Authorization": "Basic abc"}, "invalid_api_key"),
                                  ({"Authorization": "Bearer lp-wrong"}, "invalid_api_key")):
                r = c.request(method, path, headers=headers)
                assert r.status_code == 401, (method, path, headers)
                err = error_of(r)
                assert err["code"] == code and err["type"] == "authentication_error"
                assert r.headers["www-authenticate"] == "Bearer"
        assert c.get("/healthz").json() == {"status": "ok"}


def test_models_list_is_openai_shaped(client, env):
    from lorapool.service.admin import builtin_model_paths

    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert "tiny-llama" in ids
    assert ("smollm2-135m" in ids) == ("smollm2-135m" in builtin_model_paths())
    assert all(m["object"] == "model" and m["owned_by"] == "lorapool" for m in body["data"])
    assert client.get("/v1/models/tiny-llama").json()["id"] == "tiny-llama"
    assert client.get("/v1/models/nope").status_code == 404
    # Clients never see the path.
    assert str(env.store.get_model("tiny-llama").path) not in client.get("/v1/models").text


def test_nodes_come_from_the_executor(client, env):
    from lorapool.types import Node

    env.executor.node_list = [Node(id="n1", name="rtx-3060-desk2", total_memory_bytes=12 << 30,
                                   free_memory_bytes=3 << 30, bf16=True)]
    data = client.get("/v1/nodes").json()["data"]
    assert [(n["name"], n["free_memory_bytes"]) for n in data] == [("rtx-3060-desk2", 3 << 30)]


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory, tiny_model_dir):
    """A real LoRA adapter of the tiny Llama, saved by peft (non-zero B so it changes logits)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter") / "peft"
    model.save_pretrained(out)
    (out / "lorapool.json").write_text(json.dumps({"trainer": "kept", "job_id": "overwritten"}))
    return out


def _register(env, folder, tenant="acme"):
    """What the scheduler does when a job succeeds: store the folder, record the adapter."""
    from lorapool.service.store import JobRecord, new_id

    job = env.store.create_job(JobRecord(id=new_id("ftjob"), tenant=tenant, model="tiny-llama",
                                         spec={"lora": {"r": 2}}))
    return env.store.add_adapter(tenant, "tiny-llama", "ab" * 32, job.id, env.artifacts.put_dir(
        folder), 1234, "cd" * 32, {"eval_loss": 1.5, "initial_eval_loss": 2.0})


def test_adapter_download_is_a_peft_folder_that_loads(env, live, peft_adapter, tiny_model_dir,
                                                      tmp_path):
    import httpx
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rec = _register(env, peft_adapter)
    with httpx.Client(base_url=live.url, headers=env.headers(), timeout=30) as http:
        listed = http.get("/v1/adapters").json()["data"]
        assert [a["id"] for a in listed] == [rec.id]
        got = http.get(f"/v1/adapters/{rec.id}").json()
        assert got["base_model"] == "tiny-llama" and got["metrics"]["eval_loss"] == 1.5
        r = http.get(f"/v1/adapters/{rec.id}/download")
        assert r.status_code == 200 and r.headers["content-type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
        names = sorted(tar.getnames())
        # Exactly what peft saved (top level, no prefix folder) plus lorapool.json.
        expected = sorted(p.name for p in peft_adapter.iterdir())
        assert names == expected and "adapter_model.safetensors" in names
        assert all(m.isfile() for m in tar.getmembers())
        tar.extractall(tmp_path / "dl", filter="data")
    meta = json.loads((tmp_path / "dl" / "lorapool.json").read_text())
    assert meta["base_model_sha256"] == "ab" * 32 and meta["job_id"] == rec.job_id
    assert meta["trainer"] == "kept" and meta["spec"] == {"lora": {"r": 2}}
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = PeftModel.from_pretrained(base, tmp_path / "dl")
    ids = torch.tensor([[4, 20, 21, 22]])
    with torch.no_grad():
        with tuned.disable_adapter():
            plain = tuned(input_ids=ids).logits
        adapted = tuned(input_ids=ids).logits
    assert not torch.allclose(plain, adapted)


def test_another_tenants_adapter_is_404(client, env, peft_adapter):
    rec = _register(env, peft_adapter)
    other = env.headers("globex")
    for path in (f"/v1/adapters/{rec.id}", f"/v1/adapters/{rec.id}/download"):
        r = client.get(path, headers=other)
        assert r.status_code == 404 and rec.id in error_of(r)["message"]
        assert "eval_loss" not in r.text
    assert client.get("/v1/adapters", headers=other).json()["data"] == []
    assert client.get(f"/v1/adapters/{rec.id}").status_code == 200


def test_checkpoint_download(client, env, peft_adapter):
    rec = _register(env, peft_adapter)
    ck = env.store.add_checkpoint(rec.job_id, 6, env.artifacts.put_dir(peft_adapter),
                                  {"train_loss": 0.5})
    r = client.get(f"/v1/fine_tuning/jobs/{rec.job_id}/checkpoints/{ck.id}/download")
    assert r.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
        meta = json.load(tar.extractfile("lorapool.json"))
        assert "adapter_model.safetensors" in tar.getnames()
    assert meta["step"] == 6 and meta["job_id"] == rec.job_id
    r = client.get(f"/v1/fine_tuning/jobs/{rec.job_id}/checkpoints/{ck.id}/download",
                   headers=env.headers("globex"))
    assert r.status_code == 404
