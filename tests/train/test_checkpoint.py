"""Checkpoint pieces: pickle-free state encoding, atomic folders, optimizer and RNG round trips."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from lorapool.service.train import TrainError
from lorapool.service.train import checkpoint as ckpt


def test_encode_decode_keeps_types(tmp_path):
    obj = {
        "state": {0: {"step": 3, "exp_avg": torch.arange(6.0).reshape(2, 3)},
                  1: {"__bnb_optimizer_quant_state__": {"state1": torch.ones(4, dtype=torch.uint8)}}},
        "betas": (0.9, 0.999),
        "nested": [1, (2, 3), {"x": None}],
        "np": np.arange(5, dtype=np.uint32),
        "inf": math.inf,
    }
    ckpt.save_state(tmp_path, "s", obj)
    assert {p.name for p in tmp_path.iterdir()} == {"s.json", "s.safetensors"}
    json.loads((tmp_path / "s.json").read_text())  # plain JSON, nothing pickled
    back = ckpt.load_state(tmp_path, "s")
    assert set(back["state"]) == {0, 1}  # int keys survive
    torch.testing.assert_close(back["state"][0]["exp_avg"], obj["state"][0]["exp_avg"])
    q = back["state"][1]["__bnb_optimizer_quant_state__"]["state1"]
    assert q.dtype == torch.uint8 and q.tolist() == [1, 1, 1, 1]
    assert back["betas"] == (0.9, 0.999) and back["nested"][1] == (2, 3)
    assert back["np"].dtype == np.uint32 and back["np"].tolist() == [0, 1, 2, 3, 4]
    assert back["inf"] == math.inf


def test_unknown_types_are_refused():
    with pytest.raises(TypeError, match="object"):
        ckpt.encode_state({"x": object()}, {})


def test_atomic_dir_commits_or_leaves_nothing(tmp_path):
    dest = tmp_path / "step-000001"
    with pytest.raises(RuntimeError), ckpt.atomic_dir(dest) as tmp:
        (tmp / "half.json").write_text("{}")
        raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []

    with ckpt.atomic_dir(dest) as tmp:
        (tmp / "a").write_text("1")
    with ckpt.atomic_dir(dest) as tmp:  # replacing an existing folder
        (tmp / "b").write_text("2")
    assert [p.name for p in tmp_path.iterdir()] == ["step-000001"]
    assert [p.name for p in dest.iterdir()] == ["b"]


def _train_steps(opt, params, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


@pytest.mark.parametrize("kind", ["adamw_8bit", "adamw"])
def test_optimizer_state_round_trip(tmp_path, kind):
    """After save/load, one more step moves the parameters exactly as the original would."""
    import bitsandbytes as bnb

    def make():
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(64, 80)), torch.nn.Parameter(torch.randn(7))]
        if kind == "adamw":
            return params, torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.99))
        # min_8bit_size=16: make the 64x80 matrix really use blockwise 8-bit state.
        return params, bnb.optim.AdamW8bit(params, lr=1e-2, betas=(0.9, 0.99), min_8bit_size=16)

    params, opt = make()
    _train_steps(opt, params, 3, seed=1)
    state = opt.state_dict()
    if kind == "adamw_8bit":
        quant = state["state"][0]["__bnb_optimizer_quant_state__"]
        assert quant["state1"].dtype == torch.uint8  # the 8-bit state is what gets saved
    ckpt.save_state(tmp_path, "optimizer", state)

    params2, opt2 = make()
    with torch.no_grad():
        for p, q in zip(params2, params):
            p.copy_(q)
    ckpt.load_optimizer_state(opt2, ckpt.load_state(tmp_path, "optimizer"))
    assert opt2.param_groups[0]["betas"] == (0.9, 0.99)
    _train_steps(opt, params, 1, seed=2)
    _train_steps(opt2, params2, 1, seed=2)
    for p, q in zip(params, params2):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_rng_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    ckpt.save_state(tmp_path, "rng", ckpt.capture_rng())
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    ckpt.restore_rng(ckpt.load_state(tmp_path, "rng"))
    got = (random.random(), float(np.random.rand()), torch.rand(3))
    assert got[:2] == expected[:2]
    torch.testing.assert_close(got[2], expected[2], rtol=0, atol=0)


def test_not_a_checkpoint_names_what_is_missing(tmp_path):
    (tmp_path / "trainer_state.json").write_text("{}")
    with pytest.raises(TrainError, match="adapter_model.safetensors") as err:
        ckpt.load_checkpoint(tmp_path)
    assert err.value.code == "invalid_checkpoint"


def test_prune_keeps_newest(tmp_path):
    for step in (1, 2, 10, 11):
        (tmp_path / ckpt.checkpoint_name(step)).mkdir()
    ckpt.prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000010", "step-000011"]
