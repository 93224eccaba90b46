"""Export, import and base download end to end: real HTTP (uvicorn on loopback), a real local
Ray head running the export and merge tasks on a node with its own folder, a real SQLite file,
the real client.

An adapter made by peft itself is imported, merged with a lorapool adapter, and the merge is
exported as `merged` (checked against peft's logits), `gguf` (read back with GGUFReader) and
`peft`; the base is downloaded and loads with plain transformers; `lorapool.load` gives the
same model as peft; a tenant without a share gets 404.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(420)]

GiB = 1024**3


def _peft_adapter(base_dir: Path, dest: Path, *, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    model.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from lorapool.service.admin import add_model, create_token
    from lorapool.service.config import Settings
    from lorapool.service.pool.transfer import content_id, read_folder
    from lorapool.service.server import Service, free_port
    from lorapool.service.train.tiny import make_tiny_llama

    root = tmp_path_factory.mktemp("export")
    model_dir = make_tiny_llama(root / "tiny-llama")
    settings = Settings.from_env(data_dir=root / "data", host="127.0.0.1", port=free_port())
    sha = add_model(settings, "tiny-llama", model_dir).sha256
    tokens = {t: create_token(settings, t) for t in ("acme", "globex")}
    old = os.environ.get("LORAPOOL_ALLOW_MODEL_DOWNLOAD")
    os.environ["LORAPOOL_ALLOW_MODEL_DOWNLOAD"] = "all"  # a registered model: admin opts in
    svc = Service(settings,
                  local_node_options={"name": "local-cpu", "cpu_only": True,
                                      "cpu_memory": 8 * GiB, "work_dir": str(root / "node")},
                  ray_init_options={"num_cpus": 2})
    svc.start()
    try:
        # A lorapool adapter, registered as a finished job would.
        own = _peft_adapter(model_dir, root / "own", seed=1)
        (own / "lorapool.json").write_text(json.dumps({
            "format": "lorapool-adapter/1", "base_model": "tiny-llama",
            "base_model_sha256": sha, "n_examples": 10, "spec": None, "metrics": {}}))
        files = read_folder(own)
        rec = svc.store.add_adapter(tenant="acme", base_model="tiny-llama",
                                    base_model_sha256=sha, job_id=None,
                                    artifact_id=svc.artifacts.put_dir(own),
                                    bytes=sum(len(b) for b in files.values()),
                                    sha256=content_id(files))
        foreign = _peft_adapter(model_dir, root / "foreign", seed=2)  # "trained elsewhere"
        yield {"svc": svc, "tokens": tokens, "root": root, "model_dir": model_dir,
               "own": rec.id, "foreign": foreign}
    finally:
        svc.stop()
        if old is None:
            os.environ.pop("LORAPOOL_ALLOW_MODEL_DOWNLOAD", None)
        else:
            os.environ["LORAPOOL_ALLOW_MODEL_DOWNLOAD"] = old


def _client(env, tenant="acme"):
    from lorapool import Client

    return Client(env["svc"].base_url, api_key=env["tokens"][tenant], timeout=60)


def test_import_merge_export_download(env, tmp_path):
    import gguf
    import httpx
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import lorapool
    from lorapool.errors import NotFoundError

    client = _client(env)
    imported = client.adapters.import_(env["foreign"], base_model="tiny-llama")
    assert imported.base_model == "tiny-llama"
    merge = client.merge([env["own"], imported.id], "exact", weights=[0.5, 0.5], timeout=180)
    assert merge.status == "succeeded", merge.error

    # merged: plain transformers, same logits as base + adapter in peft.
    merged_dir = client.adapters.export(merge.result_adapter, "merged", tmp_path / "merged",
                                        timeout=240)
    peft_dir = client.adapters.export(merge.result_adapter, "peft", tmp_path / "peft")
    ids = torch.tensor([[1, 5, 9, 12, 3, 7]])
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert merged.dtype == torch.bfloat16
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(env["model_dir"], dtype=torch.float32),
        peft_dir).eval()
    with torch.no_grad():
        want = reference(ids).logits
        got = merged.float()(ids).logits
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)

    # peft: the card and every file name no server path; lorapool.load with the base folder.
    root = str(env["root"])
    for folder in (peft_dir, merged_dir):
        for f in folder.rglob("*"):
            assert root not in f.read_text(errors="ignore"), f
    loaded = lorapool.load(peft_dir, base=env["model_dir"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want)

    # gguf: llama.cpp's names and an Ollama Modelfile.
    gguf_dir = client.adapters.export(merge.result_adapter, "gguf", tmp_path / "gguf",
                                      timeout=240)
    reader = gguf.GGUFReader(str(gguf_dir / "adapter.gguf"))
    names = {t.name for t in reader.tensors}
    assert "blk.0.attn_q.weight.lora_a" in names and "blk.1.attn_v.weight.lora_b" in names
    assert "ADAPTER ./adapter.gguf" in (gguf_dir / "Modelfile").read_text()

    # The base: source and hash, then the folder itself.
    model = client.models.get("tiny-llama")
    assert model.source == "registered" and model.sha256 and model.downloadable
    base_dir = client.models.download("tiny-llama", tmp_path / "base", timeout=240)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    assert sum(p.numel() for p in base.parameters()) > 0

    # Access: another tenant sees nothing; a wrong format names the parameter.
    with pytest.raises(NotFoundError):
        _client(env, "globex").adapters.export(merge.result_adapter, "peft", tmp_path / "x")
    resp = httpx.get(f"{env['svc'].base_url}/v1/adapters/{merge.result_adapter}/export",
                     params={"format": "onnx"},
                     headers={"Authorization": f"Bearer {env['tokens']['acme']}"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "format"
