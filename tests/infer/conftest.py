"""A tiny random Llama and two random LoRA adapters for it, built offline once per module."""

from __future__ import annotations

from pathlib import Path

import pytest


def make_random_adapter(model_dir: Path, dest: Path, seed: int, r: int = 4) -> Path:
    """A PEFT folder (safetensors) whose LoRA weights are random, so it changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    # init_lora_weights=False: B is random too (peft's default B=0 would be a no-op adapter).
    cfg = LoraConfig(r=r, lora_alpha=4 * r, target_modules="all-linear",
                     init_lora_weights=False)
    get_peft_model(base, cfg).save_pretrained(dest, safe_serialization=True)
    return dest


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    from lorapool.service.train.tiny import make_tiny_llama

    root = tmp_path_factory.mktemp("infer")
    model_dir = make_tiny_llama(root / "tiny")
    return {"model": model_dir,
            "a": make_random_adapter(model_dir, root / "adapter-a", seed=1),
            "b": make_random_adapter(model_dir, root / "adapter-b", seed=2)}
