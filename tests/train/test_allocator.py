"""allocator.py: expandable segments are asked for on CUDA only, and a user's own allocator
configuration or opt-out is left alone. The allocator itself exists only on a GPU: its setter is
replaced by a recorder here (a CPU build cannot apply the setting)."""

from __future__ import annotations

import pytest
import torch

from lorapool.service.train import allocator


@pytest.fixture
def calls(monkeypatch):
    seen: list[str] = []
    monkeypatch.setattr(allocator, "_set_allocator_settings", seen.append)
    for var in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "LORAPOOL_EXPANDABLE_SEGMENTS"):
        monkeypatch.delenv(var, raising=False)
    return seen


def test_cuda_gets_expandable_segments(calls):
    assert allocator.use_expandable_segments(torch.device("cuda", 0)) == "expandable segments"
    assert calls == ["expandable_segments:True"]


def test_cpu_is_left_alone(calls):
    assert allocator.use_expandable_segments(torch.device("cpu")) == ""
    assert calls == []


@pytest.mark.parametrize("var", ["PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"])
def test_a_users_choice_wins(calls, monkeypatch, var):
    monkeypatch.setenv(var, "expandable_segments:False,max_split_size_mb:128")
    assert var in allocator.use_expandable_segments(torch.device("cuda", 0))
    assert calls == []


def test_opt_out_and_failure_fall_back_to_the_default(calls, monkeypatch):
    monkeypatch.setenv("LORAPOOL_EXPANDABLE_SEGMENTS", "0")
    assert "LORAPOOL_EXPANDABLE_SEGMENTS=0" in allocator.use_expandable_segments(
        torch.device("cuda", 0))
    assert calls == []
    monkeypatch.delenv("LORAPOOL_EXPANDABLE_SEGMENTS")

    def broken(conf: str) -> None:
        raise RuntimeError("no VMM on this platform")

    monkeypatch.setattr(allocator, "_set_allocator_settings", broken)
    assert "unavailable" in allocator.use_expandable_segments(torch.device("cuda", 0))


def test_the_real_setter_exists_in_this_torch():
    assert callable(getattr(torch._C, "_accelerator_setAllocatorSettings", None)) or \
        callable(getattr(torch.cuda.memory, "_set_allocator_settings", None))
