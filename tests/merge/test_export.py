"""Exports of an adapter: clean PEFT folder, merged model, GGUF adapter (pure library, no Ray).

The merged model is checked against peft itself (base + adapter, unmerged) on the same input;
the GGUF file is read back with `gguf.GGUFReader` and compared tensor by tensor with the
adapter's factors, llama.cpp's q/k row layout undone independently of the exporter.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from .conftest import load_base

EXPORT_TARGETS = ("q_proj", "k_proj", "v_proj", "down_proj")


def _files_text(folder: Path) -> str:
    return "\n".join(f"{p.relative_to(folder)}\n{p.read_text(errors='ignore')}"
                     for p in sorted(folder.rglob("*")) if p.is_file())


@pytest.fixture
def adapter(make_adapter, tmp_path) -> Path:
    folder = make_adapter("export", targets=EXPORT_TARGETS, seed=5)
    # What a trained adapter carries: the server's paths in its config and spec.
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"].startswith("/")  # peft recorded the tiny model path
    meta = json.loads((folder / "lorapool.json").read_text())
    meta.update(spec={"base_model": "/srv/lorapool/models/tiny", "n_epochs": 3,
                      "learning_rate": 2e-4, "output_dir": "/srv/lorapool/runs/job-1"},
                metrics={"train_loss": 1.25, "log": "/srv/lorapool/runs/job-1/log"},
                n_examples=123)
    (folder / "lorapool.json").write_text(json.dumps(meta))
    return folder


def test_peft_export_names_public_base_and_no_server_path(adapter, tiny_model_dir, tmp_path):
    from lorapool.service.merge.export import export_peft, public_id

    assert public_id("smollm2-135m", builtin=True) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert public_id("my-model") == "my-model"
    out = export_peft(adapter, tmp_path / "peft", adapter_id="adapter-1",
                      base_id="HuggingFaceTB/SmolLM2-135M-Instruct", base_sha256="ab" * 32,
                      version="0.1.0")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = (out / "README.md").read_text()
    for fact in ("HuggingFaceTB/SmolLM2-135M-Instruct", "ab" * 32, "123", "n_epochs: 3",
                 "train_loss: 1.25", "lorapool 0.1.0", "r: 4"):
        assert fact in card, fact
    text = _files_text(out)
    assert "/srv/" not in text and str(adapter.parent) not in text and "/tmp" not in text
    meta = json.loads((out / "lorapool.json").read_text())
    assert meta["spec"] == {"n_epochs": 3, "learning_rate": 2e-4}
    assert meta["base_model_public_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    # Still a PEFT folder peft loads (onto the tiny base) unchanged.
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(tiny_model_dir), out)
    assert "default" in model.peft_config


def test_merged_export_matches_peft_logits(adapter, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorapool.service.merge.export import export_merged

    out = export_merged(adapter, tiny_model_dir, tmp_path / "merged", base_id="tiny-llama")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    assert str(tiny_model_dir) not in _files_text(out)
    merged = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no peft
    assert merged.dtype == torch.bfloat16
    reference = PeftModel.from_pretrained(load_base(tiny_model_dir), adapter).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("hello merged world", return_tensors="pt").input_ids
    with torch.no_grad():
        want = reference(ids).logits
        got = merged.float()(ids).logits
        base = load_base(tiny_model_dir)(ids).logits
    assert (want - base).abs().max() > 1e-3  # the adapter changes the output at all
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)


def _unpermute(b: np.ndarray, n_head: int) -> np.ndarray:
    # Inverse of llama.cpp's per-head q/k layout: split halves back to interleaved.
    out = b.shape[0]
    return b.reshape(n_head, out // n_head // 2, 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


@pytest.mark.parametrize("rslora", [False, True])
def test_gguf_export_reads_back_as_the_adapter(make_adapter, tiny_model_dir, tmp_path, rslora):
    import gguf

    from lorapool.service.merge.adapter_io import load_adapter
    from lorapool.service.merge.export_gguf import export_gguf

    folder = make_adapter(f"gguf-{rslora}", targets=EXPORT_TARGETS, seed=7, r=4, alpha=16,
                          use_rslora=rslora)
    base_cfg = json.loads((tiny_model_dir / "config.json").read_text())
    out = export_gguf(folder, base_cfg, tmp_path / "gguf", base_gguf="tiny.gguf",
                      adapter_id="a1")
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./tiny.gguf" in modelfile and "ADAPTER ./adapter.gguf" in modelfile

    reader = gguf.GGUFReader(str(out / "adapter.gguf"))
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["general.architecture"].contents() == "llama"
    alpha = reader.fields["adapter.lora.alpha"].contents()
    assert alpha == 16
    tensors = {t.name: t for t in reader.tensors}
    expected = {f"blk.{i}.{n}.weight.lora_{ab}" for i in range(2)
                for n in ("attn_q", "attn_k", "attn_v", "ffn_down") for ab in "ab"}
    assert set(tensors) == expected

    adapter = load_adapter(folder)
    llama_names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v",
                   "down_proj": "ffn_down"}
    heads = {"q_proj": base_cfg["num_attention_heads"], "k_proj": base_cfg["num_key_value_heads"]}
    for name, mod in adapter.modules.items():
        layer = name.split(".")[2]
        short = name.rsplit(".", 1)[1]
        key = f"blk.{layer}.{llama_names[short]}.weight"
        a = np.asarray(tensors[key + ".lora_a"].data)
        b = np.asarray(tensors[key + ".lora_b"].data)
        # GGUF dims are innermost first: llama.cpp sees a:[in, r], b:[r, out].
        assert list(tensors[key + ".lora_a"].shape) == [mod.A.shape[1], mod.rank]
        assert list(tensors[key + ".lora_b"].shape) == [mod.rank, mod.B.shape[0]]
        np.testing.assert_array_equal(a, mod.A.numpy())
        if short in heads:
            b = _unpermute(b, heads[short])
        # llama.cpp's scale is alpha / r: scale·B_gguf must be peft's scaling·B.
        np.testing.assert_allclose(b * (alpha / mod.rank), mod.B.numpy() * mod.scaling,
                                   rtol=1e-6, atol=1e-7)
