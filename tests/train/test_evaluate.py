"""`evaluate`: held-out loss of base (+ adapter) through the trainer's own data pipeline."""

from __future__ import annotations

import math

import pytest
import torch


def _spec(model_dir, **kw):
    from lorapool.service.train import TrainSpec

    return TrainSpec(base_model=str(model_dir), device="cpu", max_seq_len=64, micro_batch_size=4,
                     quantization="none", **kw)


def _adapter(model_dir, dest, *, zero_b: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=zero_b))
    model.save_pretrained(dest)
    return dest


def test_zero_adapter_scores_like_the_base_and_a_random_one_does_not(tiny_model_dir, chat_jsonl,
                                                                      tmp_path):
    from lorapool.service.train import evaluate

    cache = tmp_path / "cache"
    base = evaluate(_spec(tiny_model_dir), None, chat_jsonl, cache_dir=cache)
    assert base["examples"] == 32 and base["tokens"] > 0
    assert math.isclose(base["perplexity"], math.exp(base["loss"]))
    zero = evaluate(_spec(tiny_model_dir), _adapter(tiny_model_dir, tmp_path / "zero", zero_b=True),
                    chat_jsonl, cache_dir=cache)
    assert zero["loss"] == pytest.approx(base["loss"], rel=1e-6)
    assert zero["tokens"] == base["tokens"]
    rnd = evaluate(_spec(tiny_model_dir), _adapter(tiny_model_dir, tmp_path / "rnd", zero_b=False),
                   chat_jsonl, cache_dir=cache)
    assert abs(rnd["loss"] - base["loss"]) > 1e-4


def test_pickled_adapter_is_refused(tiny_model_dir, chat_jsonl, tmp_path):
    from lorapool.service.train import ModelLoadError, evaluate

    folder = _adapter(tiny_model_dir, tmp_path / "a", zero_b=True)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(ModelLoadError, match="pickle"):
        evaluate(_spec(tiny_model_dir), folder, chat_jsonl, cache_dir=tmp_path / "cache")
