"""POST /v1/adapters: bring your own PEFT adapter, or a 400 naming the problem and nothing kept.

Adapters are made by peft itself on the tiny base (and on a wider one, for the shape mismatch);
archives are built here with tarfile/zipfile, including the hostile ones. "Nothing left behind"
is checked in the artifact store (objects and tmp) and in the store's adapter list.
"""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from .conftest import error_of


def _peft_folder(base_dir: Path, dest: Path, *, targets=("q_proj", "v_proj"), r: int = 4,
                 seed: int = 0) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                            init_lora_weights=False))
    model.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory, tiny_model_dir) -> Path:
    return _peft_folder(tiny_model_dir, tmp_path_factory.mktemp("byo") / "adapter")


def _tar(members: dict[str, bytes], *, links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buf.getvalue()


def _members(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _post(client, data: bytes, filename: str = "adapter.tar.gz", **form):
    return client.post("/v1/adapters", files={"file": (filename, data)}, data=form or None)


def _assert_nothing_kept(env, before: int) -> None:
    assert len(env.objects()) == before
    assert env.tmp_files() == []
    assert env.store.list_adapters("acme")[0] == []


def test_peft_folder_is_imported_and_downloads_as_peft(client, env, peft_dir):
    # Tarred as a folder; the base is the one adapter_config.json names.
    members = _bad_config(peft_dir, base_model_name_or_path="tiny-llama")
    resp = _post(client, _tar({f"my-adapter/{k}": v for k, v in members.items()}))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["base_model"] == "tiny-llama"
    rec = env.store.get_adapter(body["id"])
    assert rec.tenant == "acme" and rec.base_model_sha256 == env.store.get_model(
        "tiny-llama").sha256
    files = env.artifacts.read_files(rec.artifact_id)
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors", "README.md",
                          "lorapool.json"}
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == "tiny-llama"
    # Another tenant cannot see it; the owner can export it as PEFT.
    assert client.get(f"/v1/adapters/{body['id']}",
                      headers=env.headers("globex")).status_code == 404
    resp = client.get(f"/v1/adapters/{body['id']}/export", params={"format": "peft"})
    assert resp.status_code == 200, resp.text
    with tarfile.open(fileobj=io.BytesIO(resp.content)) as tar:
        names = set(tar.getnames())
        card = tar.extractfile("README.md").read().decode()
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= names
    assert "tiny-llama" in card and str(env.root) not in card
    resp = client.get(f"/v1/adapters/{body['id']}/export", params={"format": "onnx"})
    assert resp.status_code == 400 and error_of(resp)["param"] == "format"
    resp = client.get(f"/v1/adapters/{body['id']}/export", params={"format": "peft"},
                      headers=env.headers("globex"))
    assert resp.status_code == 404


def test_zip_with_explicit_base_is_imported(client, env, peft_dir):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in _members(peft_dir).items():
            zf.writestr(name, data)
    resp = _post(client, buf.getvalue(), "adapter.zip", base_model="tiny-llama")
    assert resp.status_code == 200, resp.text


def _bad_config(peft_dir: Path, **changes) -> dict[str, bytes]:
    m = _members(peft_dir)
    cfg = json.loads(m["adapter_config.json"])
    cfg.update(changes)
    m["adapter_config.json"] = json.dumps(cfg).encode()
    return m


@pytest.mark.parametrize("case, expect, param", [
    ("dotdot", "outside the archive", "file"),
    ("absolute", "absolute path", "file"),
    ("symlink", "is a link", "file"),
    ("pickle", "pickle", "file"),
    ("members", "more than 64 members", "file"),
    ("ratio", "compression ratio", "file"),
    ("no_config", "no adapter_config.json", "file"),
    ("bad_r", "r must be an integer", "adapter_config.json"),
    ("bad_alpha", "lora_alpha must be", "adapter_config.json"),
    ("not_lora", "peft_type must be 'LORA'", "adapter_config.json"),
    ("unknown_base", "no registered model", "base_model"),
    ("not_archive", "not a .tar.gz", "file"),
])
def test_hostile_or_broken_archives_are_refused(client, env, peft_dir, case, expect, param):
    good = _members(peft_dir)
    data = {
        "dotdot": lambda: _tar({**good, "../evil.txt": b"x"}),
        "absolute": lambda: _tar({**good, "/etc/evil": b"x"}),
        "symlink": lambda: _tar(good, links={"adapter_model.safetensors.lnk": "/etc/passwd"}),
        "pickle": lambda: _tar({**good, "adapter_model.bin": b"\x80\x04pickle"}),
        "members": lambda: _tar({**good, **{f"x{i}.txt": b"" for i in range(70)}}),
        "ratio": lambda: _tar({**good, "zeros.txt": b"\0" * (64 * 1024**2)}),
        "no_config": lambda: _tar({"adapter_model.safetensors": good["adapter_model.safetensors"]}),
        "bad_r": lambda: _tar(_bad_config(peft_dir, r=0)),
        "bad_alpha": lambda: _tar(_bad_config(peft_dir, lora_alpha=-1)),
        "not_lora": lambda: _tar(_bad_config(peft_dir, peft_type="IA3")),
        "unknown_base": lambda: _tar(_bad_config(peft_dir, base_model_name_or_path="gpt-17")),
        "not_archive": lambda: b"just some bytes, not an archive",
    }[case]()
    before = len(env.objects())
    resp = _post(client, data)
    assert resp.status_code == 400, resp.text
    err = error_of(resp)
    assert expect in err["message"], err
    assert err["param"] == param
    _assert_nothing_kept(env, before)


def test_adapter_for_another_shape_is_refused(client, env, tmp_path):
    from lorapool.service.train.tiny import make_tiny_llama

    wide = make_tiny_llama(tmp_path / "wide", hidden_size=96, num_attention_heads=4,
                           num_key_value_heads=2)
    folder = _peft_folder(wide, tmp_path / "wide-adapter")
    before = len(env.objects())
    resp = _post(client, _tar(_members(folder)), base_model="tiny-llama")
    assert resp.status_code == 400
    err = error_of(resp)
    assert "trained for another model" in err["message"] and "96" in err["message"], err
    _assert_nothing_kept(env, before)


def test_missing_module_is_refused(client, env, peft_dir):
    m = _members(peft_dir)
    from safetensors.torch import load, save

    state = load(m["adapter_model.safetensors"])
    renamed = {k.replace("q_proj", "qkv_proj"): v for k, v in state.items()}
    m["adapter_model.safetensors"] = save(renamed)
    resp = _post(client, _tar(m), base_model="tiny-llama")
    assert resp.status_code == 400
    err = error_of(resp)
    assert "does not exist in the base model" in err["message"]
    assert err["param"] == "target_modules"


def test_model_get_tells_source_and_hash(client, env):
    body = client.get("/v1/models/tiny-llama").json()
    assert body["source"] == "registered" and body["format"] == "hf"
    assert body["sha256"] == env.store.get_model("tiny-llama").sha256
    assert body["public_id"] == "tiny-llama" and body["downloadable"] is False
    # No pool here: a base download of a registered model is refused by the default policy.
    assert client.get("/v1/models/tiny-llama/download").status_code == 403
