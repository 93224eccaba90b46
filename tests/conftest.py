"""Shared fixtures: a tiny random Llama saved once per session, and toy training data.

Nothing here downloads: the model comes from `make_tiny_llama` and the data is made up.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

# Belt and braces: no test may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Property and load tests send hundreds of requests a second on one token; the per-token rate
# limit (20/s by default) would answer them 429 before any validator ran. tests/api/test_limits.py
# builds its limits explicitly and tests them there.
os.environ.setdefault("LORAPOOL_RATE_LIMIT", "off")


def chat_records(n: int, *, seed: int = 0, answer: str | None = "ok") -> list[dict]:
    """`n` chat examples: a random short question, and `answer` (fixed, so the task is
    learnable) or, with answer=None, a random one."""
    rng = random.Random(seed)
    words = ["cat", "sun", "map", "red", "box", "sky", "pen", "cup"]
    out = []
    for _ in range(n):
        q = " ".join(rng.choice(words) for _ in range(rng.randint(1, 3)))
        a = answer if answer is not None else " ".join(rng.choice(words) for _ in range(2))
        out.append({"messages": [{"role": "user", "content": q},
                                 {"role": "assistant", "content": a}]})
    return out


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


class ToyData:
    """The helpers above as a fixture: with --import-mode=importlib a test module cannot
    `import conftest`."""

    chat_records = staticmethod(chat_records)
    write_jsonl = staticmethod(write_jsonl)


@pytest.fixture(scope="session")
def toy_data() -> type[ToyData]:
    return ToyData


def assert_same_adapter(a: str | Path, b: str | Path, *, rtol: float = 1e-5,
                        atol: float = 1e-6) -> None:
    """The adapter folders `a` and `b` hold the same tensor names and, to tolerance, values."""
    import torch
    from safetensors.torch import load_file

    wa = load_file(str(Path(a) / "adapter_model.safetensors"))
    wb = load_file(str(Path(b) / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=rtol, atol=atol, msg=k)


@pytest.fixture(scope="session")
def same_adapter():
    """`assert_same_adapter` as a fixture (test modules cannot import conftest)."""
    return assert_same_adapter


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide random Llama with a char tokenizer and ChatML template (read-only:
    tests that change it must copy it)."""
    from lorapool.service.train.tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture
def chat_jsonl(tmp_path) -> Path:
    """32 learnable chat examples (the assistant always answers "ok") as a JSONL file."""
    return write_jsonl(tmp_path / "train.jsonl", chat_records(32))
