"""`TrainSpec.init_adapter`: a run starts its LoRA modules from an existing adapter folder."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorapool.service.train import LoraSpec, TrainSpec, train
from lorapool.service.train.init_adapter import InitAdapterError
from lorapool.service.train.loop import Trainer


def _spec(model_dir, **kw) -> TrainSpec:
    base = {"base_model": str(model_dir), "base_model_id": "tiny-llama", "device": "cpu",
            "max_seq_len": 64, "batch_size": 8, "micro_batch_size": 8, "learning_rate": 5e-3,
            "lora": LoraSpec(r=4, alpha=8, dropout=0.0), "max_steps": 3, "seed": 3}
    base.update(kw)
    return TrainSpec(**base)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory, toy_data):
    root = tmp_path_factory.mktemp("init")
    data = toy_data.write_jsonl(root / "train.jsonl", toy_data.chat_records(16))
    result = train(_spec(tiny_model_dir), data, root / "run")
    return {"adapter": result.adapter_dir, "data": data, "root": root}


def _lora_state(model) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def test_run_starts_from_the_adapter_and_its_loss(tiny_model_dir, trained):
    t = Trainer(_spec(tiny_model_dir, init_adapter=str(trained["adapter"])), trained["data"],
                trained["root"] / "cont")
    t._setup()
    saved = load_file(str(trained["adapter"] / "adapter_model.safetensors"))
    state = _lora_state(t.model)
    assert saved.keys() == state.keys()
    for k in saved:  # same alpha/r: loaded as is
        torch.testing.assert_close(state[k], saved[k].to(state[k].dtype), msg=k)


def test_other_alpha_is_rescaled_so_the_update_is_the_same(tiny_model_dir, trained, tmp_path):
    # The same update written with scaling 1 (lora_alpha = r), as merges write it.
    folder = tmp_path / "scaling-one"
    shutil.copytree(trained["adapter"], folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    s = cfg["lora_alpha"] / cfg["r"]
    cfg["lora_alpha"] = cfg["r"]
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    w = load_file(str(folder / "adapter_model.safetensors"))
    w = {k: (v * s if ".lora_B." in k else v) for k, v in w.items()}
    save_file(w, str(folder / "adapter_model.safetensors"))
    t = Trainer(_spec(tiny_model_dir, init_adapter=str(folder)), trained["data"], tmp_path / "r")
    t._setup()
    orig = load_file(str(trained["adapter"] / "adapter_model.safetensors"))
    state = _lora_state(t.model)
    for k in orig:
        torch.testing.assert_close(state[k], orig[k].to(state[k].dtype), rtol=1e-5, atol=1e-6)


def test_rank_mismatch_is_refused_by_name(tiny_model_dir, trained, tmp_path):
    spec = _spec(tiny_model_dir, init_adapter=str(trained["adapter"]),
                 lora=LoraSpec(r=2, alpha=4))
    with pytest.raises(InitAdapterError, match="lora.r must match"):
        train(spec, trained["data"], tmp_path / "bad")


def test_missing_or_pickled_adapter_is_refused(tiny_model_dir, trained, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(trained["adapter"] / "adapter_config.json", folder)
    (folder / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(InitAdapterError, match="safetensors only"):
        train(_spec(tiny_model_dir, init_adapter=str(folder)), trained["data"], tmp_path / "x")
