"""Fixtures for the merge tests: real peft LoRA adapters on the tiny random Llama.

Adapters are made with peft directly (`init_lora_weights=False` so B is random, not zero: a
freshly initialised LoRA has B = 0 and every merge of such adapters would be trivially 0), saved
with `save_pretrained` and given the `lorapool.json` lorapool's trainer writes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

TINY_SHA = "a" * 64  # the tiny base's stand-in hash (what the trainer would record)
TARGETS = ("q_proj", "v_proj", "down_proj")
PREFIX = "base_model.model."


def load_base(base_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)


def write_metadata(folder: Path, *, sha: str = TINY_SHA, n_examples: Any = 10,
                   job_id: str | None = None) -> None:
    meta = {"format": "lorapool-adapter/1", "base_model": "tiny-llama", "base_model_sha256": sha,
            "n_examples": n_examples, "spec": {}, "metrics": {}, "job_id": job_id}
    (folder / "lorapool.json").write_text(json.dumps(meta))


def delta_weights(model, adapter: str) -> dict[str, torch.Tensor]:
    """peft's own ΔW (`get_delta_weight`, its scaling included) of `adapter`, per module."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and (adapter in module.lora_A
                                              or adapter in module.lora_embedding_A):
            out[name.removeprefix(PREFIX)] = module.get_delta_weight(adapter).detach().clone()
    return out


@pytest.fixture(scope="session")
def make_adapter(tiny_model_dir, tmp_path_factory) -> Callable[..., Path]:
    """make_adapter(name, r=4, alpha=8, seed=0, n_examples=10, sha=TINY_SHA, **lora_kwargs)
    → an adapter folder (cached by arguments for the session)."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("adapters")
    cache: dict[tuple, Path] = {}

    def make(name: str, *, r: int = 4, alpha: float = 8, seed: int = 0, n_examples: Any = 10,
             sha: str = TINY_SHA, targets=TARGETS, **lora_kwargs) -> Path:
        key = (name, r, alpha, seed, str(n_examples), sha, tuple(targets),
               tuple(sorted((k, str(v)) for k, v in lora_kwargs.items())))
        if key in cache:
            return cache[key]
        dest = root / name
        assert not dest.exists(), f"adapter name {name} reused with other arguments"
        torch.manual_seed(seed)
        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                         init_lora_weights=False, **lora_kwargs)
        model = get_peft_model(load_base(tiny_model_dir), cfg)
        model.save_pretrained(dest)
        write_metadata(dest, sha=sha, n_examples=n_examples, job_id=f"job-{name}")
        cache[key] = dest
        return dest

    return make


@pytest.fixture(scope="session")
def peft_deltas(tiny_model_dir) -> Callable[[Path], dict[str, torch.Tensor]]:
    """ΔW per module of an adapter folder as peft loads it (proves the config's scaling)."""
    from peft import PeftModel

    def deltas(folder: Path) -> dict[str, torch.Tensor]:
        model = PeftModel.from_pretrained(load_base(tiny_model_dir), folder)
        return delta_weights(model, "default")

    return deltas


@pytest.fixture(scope="session")
def peft_merge(tiny_model_dir) -> Callable[..., dict[str, torch.Tensor]]:
    """peft's reference: `add_weighted_adapter` on the same folders → ΔW per module."""
    from peft import PeftModel

    def merge(folders: list[Path], weights: list[float], combination_type: str,
              **kwargs) -> dict[str, torch.Tensor]:
        model = PeftModel.from_pretrained(load_base(tiny_model_dir), folders[0],
                                          adapter_name="in0")
        for i, folder in enumerate(folders[1:], start=1):
            model.load_adapter(folder, adapter_name=f"in{i}")
        names = [f"in{i}" for i in range(len(folders))]
        model.add_weighted_adapter(names, weights, "merged", combination_type=combination_type,
                                   **kwargs)
        return delta_weights(model, "merged")

    return merge
