"""Merges, sharing and evaluations end to end: real HTTP (uvicorn on loopback), a real local Ray
head running the merge and evaluation tasks, a real SQLite file, the real trainer.

Adapters to merge are made with peft directly on the tiny random Llama (random B, so merges are
not trivially zero) and registered in the service's store as a finished job would; the one
adapter whose loss must drop is trained through the pool like any job. One Service for the
whole module (Ray startup is the expensive part).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

TARGETS = ["q_proj", "v_proj"]


def _peft_adapter(base_dir: Path, dest: Path, *, seed: int, sha: str, n_examples: int,
                  r: int = 4, targets=TARGETS) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                            init_lora_weights=False))
    model.save_pretrained(dest)
    (dest / "lorapool.json").write_text(json.dumps({
        "format": "lorapool-adapter/1", "base_model": "tiny-llama", "base_model_sha256": sha,
        "n_examples": n_examples, "spec": None, "metrics": {}, "job_id": None}))
    return dest


def _register(svc, tenant: str, folder: Path, model: str, sha: str) -> str:
    from lorapool.service.pool.transfer import content_id, read_folder

    files = read_folder(folder)
    rec = svc.store.add_adapter(tenant=tenant, base_model=model, base_model_sha256=sha,
                                job_id=None, artifact_id=svc.artifacts.put_dir(folder),
                                bytes=sum(len(b) for b in files.values()),
                                sha256=content_id(files))
    return rec.id


@pytest.fixture(scope="module")
def env(tmp_path_factory, toy_data):
    from lorapool.service.train.tiny import make_tiny_llama
    from tests.support.local_service import local_service

    root = tmp_path_factory.mktemp("merges")
    other_dir = make_tiny_llama(root / "tiny-other", seed=1)
    with local_service(root, tenants=("acme", "globex", "initech"),
                       extra_models={"tiny-other": other_dir}) as service:
        svc, tokens, model_dir = service.svc, service.tokens, service.model_dir
        sha, other_sha = service.shas["tiny-llama"], service.shas["tiny-other"]
        local = root / "local"
        folders = {
            "a1": _peft_adapter(model_dir, local / "a1", seed=1, sha=sha, n_examples=10),
            "a2": _peft_adapter(model_dir, local / "a2", seed=2, sha=sha, n_examples=30),
            "g1": _peft_adapter(model_dir, local / "g1", seed=3, sha=sha, n_examples=20),
            "q_only": _peft_adapter(model_dir, local / "q_only", seed=4, sha=sha, n_examples=5,
                                    targets=["q_proj"]),
            "other": _peft_adapter(other_dir, local / "other", seed=5, sha=other_sha,
                                   n_examples=5),
        }
        owners = {"a1": "acme", "a2": "acme", "g1": "globex", "q_only": "acme", "other": "acme"}
        ids = {k: _register(svc, owners[k], f, "tiny-other" if k == "other" else "tiny-llama",
                            other_sha if k == "other" else sha) for k, f in folders.items()}
        train = toy_data.write_jsonl(root / "train.jsonl", toy_data.chat_records(32))
        yield {"svc": svc, "tokens": tokens, "root": root, "model_dir": model_dir,
               "folders": folders, "ids": ids, "train": train}


def _client(env, tenant="acme"):
    from lorapool import Client

    return Client(env["svc"].base_url, api_key=env["tokens"][tenant], timeout=30)


@pytest.fixture(scope="module")
def trained_job(env):
    """A real fine-tuning job on the pool, submitted first so it trains while merges run."""
    client = _client(env)
    return client.submit("tiny-llama", env["train"], n_epochs=2, batch_size=8,
                         micro_batch_size=8, learning_rate=1e-2, max_seq_len=64,
                         lora={"r": 4, "alpha": 8}, seed=1).id


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.parametrize("method, extra", [("exact", {}), ("ties", {"density": 0.5}),
                                           ("svd", {"target_rank": 3})])
def test_merge_matches_the_library_and_loads_in_peft(env, trained_job, tmp_path, method, extra):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorapool.service.merge import merge_adapters

    client = _client(env)
    ids, folders = env["ids"], env["folders"]
    merge = client.merge([ids["a1"], ids["a2"]], method, name=f"both-{method}", timeout=120,
                         **extra)
    assert merge.status == "succeeded", merge.error
    assert merge.applied_weights == pytest.approx([0.25, 0.75])  # FedAvg: 10 and 30 examples
    assert (merge.relative_error is not None) == (method == "svd")
    adapter = client.adapters.get(merge.result_adapter)
    assert adapter.merge_id == merge.id and adapter.name == f"both-{method}"
    assert adapter.owner == "acme" and adapter.base_model == "tiny-llama"

    got = client.adapters.download(adapter.id, tmp_path / "got")
    want = merge_adapters([folders["a1"], folders["a2"]], method, output_dir=tmp_path / "want",
                          **extra)
    got_t, want_t = _tensors(got), _tensors(want.output_dir)
    assert got_t.keys() == want_t.keys()
    for key in want_t:
        torch.testing.assert_close(got_t[key], want_t[key], rtol=1e-5, atol=1e-6)
    meta = json.loads((got / "lorapool.json").read_text())
    inputs = meta["merge"]["inputs"]
    assert [i["adapter_id"] for i in inputs] == [ids["a1"], ids["a2"]]
    assert all("path" not in i for i in inputs), "a node's temporary path leaked"
    assert meta["merge"]["method"] == method and meta["merge"]["merge_id"] == merge.id
    assert meta["n_examples"] == 40

    base = AutoModelForCausalLM.from_pretrained(env["model_dir"], dtype=torch.float32)
    PeftModel.from_pretrained(base, got)  # loads as a plain PEFT adapter


def test_refusals_name_the_problem(env):
    from lorapool.errors import BadRequestError, NotFoundError

    client, ids = _client(env), env["ids"]
    with pytest.raises(NotFoundError) as info:
        client.merge([ids["a1"], ids["g1"]])
    assert info.value.status_code == 404 and "globex" not in str(info.value)
    with pytest.raises(NotFoundError):
        client.merge([ids["a1"], "ft-adapter-doesnotexist"])
    cases = [
        (dict(adapters=[ids["a1"], ids["other"]]), "adapters", "different base models"),
        (dict(adapters=[ids["a1"], ids["q_only"]]), "adapters", "incompatible target modules"),
        (dict(adapters=[ids["a1"], ids["a2"]], method="ties"), "density", "density"),
        (dict(adapters=[ids["a1"], ids["a2"]], method="mean"), "method", "unknown merge method"),
        (dict(adapters=[ids["a1"], ids["a2"]], weights=[1.0]), "weights", "2 adapters"),
        (dict(adapters=[ids["a1"], ids["a1"]]), "adapters", "more than once"),
    ]
    for kwargs, param, words in cases:
        with pytest.raises(BadRequestError) as info:
            client.merges.create(**kwargs)
        assert info.value.param == param, (kwargs, str(info.value))
        assert words in str(info.value), str(info.value)
        if param == "adapters" and "different base" in words:
            assert "tiny-other" in str(info.value)  # names the other model
    assert all(m.status != "queued" for m in client.merges.list(limit=100).data)
    # Evaluations are tenant-scoped the same way.
    with pytest.raises(NotFoundError):
        _client(env, "globex").evaluations.create(env["train"], adapter=ids["a1"])


def test_sharing_grants_and_revocation_takes_back(env, tmp_path):
    from lorapool.errors import NotFoundError, PermissionDeniedError

    acme, globex, initech = _client(env), _client(env, "globex"), _client(env, "initech")
    ids, g1 = env["ids"], env["ids"]["g1"]
    shared = globex.adapters.share(g1, "acme")
    assert shared.shared_with == ["acme"]
    assert acme.adapters.get(g1).shared_with == []  # recipients do not see each other
    assert g1 in [a.id for a in acme.adapters.list(include_shared=True)]
    assert g1 not in [a.id for a in acme.adapters.list()]
    with pytest.raises(PermissionDeniedError):
        acme.adapters.share(g1, "initech")
    with pytest.raises(NotFoundError):
        initech.adapters.get(g1)

    merge = acme.merge([ids["a1"], g1], "exact", weights=[1, 1], timeout=120)
    assert merge.status == "succeeded", merge.error
    assert acme.adapters.get(merge.result_adapter).owner == "acme"
    with pytest.raises(NotFoundError):  # the result is acme's, not globex's
        globex.adapters.get(merge.result_adapter)

    globex.adapters.unshare(g1, "acme")
    with pytest.raises(NotFoundError):
        acme.adapters.get(g1)
    with pytest.raises(NotFoundError):
        acme.merge([ids["a1"], g1])
    with pytest.raises(NotFoundError):
        acme.adapters.download(g1, tmp_path / "x")


def test_evaluation_trained_adapter_beats_the_base(env, trained_job):
    from lorapool.errors import BadRequestError

    client = _client(env)
    job = client.jobs.wait(trained_job, timeout=180, poll_interval=0.5)
    assert job.status == "succeeded", job.error
    file_id = client.files.upload(env["train"]).id
    base = client.evaluations.create(file_id, model="tiny-llama", max_seq_len=64)
    tuned = client.evaluations.create(file_id, adapter=job.fine_tuned_model)
    assert tuned.model == "tiny-llama" and tuned.params["max_seq_len"] == 64  # as trained
    base = client.evaluations.wait(base.id, timeout=120, poll_interval=0.5)
    tuned = client.evaluations.wait(tuned.id, timeout=120, poll_interval=0.5)
    assert base.status == tuned.status == "succeeded", (base.error, tuned.error)
    assert tuned.loss < base.loss, (tuned.loss, base.loss)
    assert math.isclose(tuned.perplexity, math.exp(tuned.loss), rel_tol=1e-9)
    assert base.tokens == tuned.tokens > 0 and base.examples == 32

    with pytest.raises(BadRequestError) as info:
        client.evaluations.create(file_id, model="tiny-other", adapter=job.fine_tuned_model)
    assert info.value.param == "adapter"

    # A merge can evaluate its result: svd of the one trained adapter, at rank 2.
    merge = client.merge([job.fine_tuned_model], "svd", target_rank=2, evaluate_on=file_id,
                         timeout=120)
    assert merge.status == "succeeded" and merge.evaluation_id, merge.error
    ev = client.evaluations.wait(merge.evaluation_id, timeout=120, poll_interval=0.5)
    assert ev.status == "succeeded" and ev.adapter == merge.result_adapter
    assert ev.merge_id == merge.id and ev.loss is not None


def test_async_client_and_cli(env, monkeypatch):
    from typer.testing import CliRunner

    from lorapool import AsyncClient
    from lorapool.cli import app

    ids = env["ids"]

    async def flow():
        async with AsyncClient(env["svc"].base_url, api_key=env["tokens"]["acme"]) as client:
            merge = await client.merge([ids["a1"], ids["a2"]], "naive", timeout=120)
            listed = await client.merges.list(limit=100)
            return merge, listed

    merge, listed = asyncio.run(flow())
    assert merge.status == "succeeded" and merge.id in [m.id for m in listed.data]

    monkeypatch.setenv("LORAPOOL_BASE_URL", env["svc"].base_url)
    monkeypatch.setenv("LORAPOOL_API_KEY", env["tokens"]["acme"])
    runner = CliRunner()
    out = runner.invoke(app, ["merge", ids["a1"], ids["a2"], "--method", "exact",
                              "--weights", "1,3", "--json"])
    assert out.exit_code == 0, out.output
    merged = json.loads(out.stdout)
    assert merged["status"] == "succeeded" and merged["applied_weights"] == [0.25, 0.75]
    out = runner.invoke(app, ["adapters", "share", ids["a1"], "initech"])
    assert out.exit_code == 0, out.output
    assert "initech" in _client(env).adapters.get(ids["a1"]).shared_with
    out = runner.invoke(app, ["adapters", "unshare", ids["a1"], "initech"])
    assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["merge", ids["a1"], ids["other"]])
    assert out.exit_code == 1 and "different base models" in out.output
    started = time.time()
    out = runner.invoke(app, ["eval", str(env["train"]), "--model", "tiny-llama",
                              "--max-seq-len", "64"])
    assert out.exit_code == 0, out.output
    assert "perplexity" in out.output and time.time() - started < 120
