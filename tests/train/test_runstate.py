"""RunState (what a checkpoint saves), the fp16 loss scaler, and TrainSpec.fast."""

from __future__ import annotations

import json
import logging
import sys

import pytest
import torch
from safetensors.torch import save_file

from lorapool.service.train import TrainError, fastpath
from lorapool.service.train import checkpoint as ckpt
from lorapool.service.train.runstate import FORMAT_VERSION, RunState
from lorapool.service.train.scaling import LossScaler, needs_loss_scaling
from lorapool.service.train.spec import FastPlan, FastSpec, TrainSpec

# trainer_state.json exactly as the trainer wrote it before RunState (format 1).
V1_STATE = {"step": 3, "total_steps": 8, "epoch": 0, "index_in_epoch": 24, "micro_batch_size": 4,
            "grad_accum": 2, "n_examples": 32, "seed": 7, "base_model_sha256": "ab" * 32,
            "metrics": {"trained_tokens": 512, "train_loss": 2.5}, "spec": {"batch_size": 8},
            "format_version": 1}


def _fake_checkpoint(folder, state: dict) -> None:
    folder.mkdir()
    save_file({"w": torch.zeros(2)}, str(folder / "adapter_model.safetensors"))
    ckpt.save_state(folder, "optimizer", {"state": {}, "param_groups": []})
    ckpt.save_state(folder, "scheduler", {"last_epoch": 3})
    ckpt.save_state(folder, "rng", ckpt.capture_rng())
    (folder / ckpt.STATE_FILE).write_text(json.dumps(state))


def test_run_state_round_trips_through_a_checkpoint(tmp_path):
    state = RunState(step=5, total_steps=9, epoch=1, index_in_epoch=8, micro_batch_size=2,
                     grad_accum=4, n_examples=16, seed=3, base_model_sha256="cd" * 32,
                     metrics={"train_loss": 1.25, "skipped_steps": 1}, spec={"lora": {"r": 8}},
                     loss_scaler={"scale": 32768.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                  "growth_interval": 2000, "_growth_tracker": 7},
                     skipped_steps=1)
    _fake_checkpoint(tmp_path / "c", state.to_json())
    back = ckpt.load_checkpoint(tmp_path / "c").state
    assert back == state and back.format_version == FORMAT_VERSION


def test_a_format_1_checkpoint_still_reads(tmp_path):
    _fake_checkpoint(tmp_path / "old", V1_STATE)
    st = ckpt.load_checkpoint(tmp_path / "old").state
    assert (st.step, st.epoch, st.index_in_epoch, st.micro_batch_size) == (3, 0, 24, 4)
    assert st.loss_scaler is None and st.skipped_steps == 0 and st.metrics["train_loss"] == 2.5


@pytest.mark.parametrize("change,match", [({"format_version": 99}, "format_version 99"),
                                          ({"mystery": 1}, "mystery")])
def test_unreadable_state_is_a_clear_error(tmp_path, change, match):
    _fake_checkpoint(tmp_path / "bad", {**V1_STATE, **change})
    with pytest.raises(TrainError, match=match) as err:
        ckpt.load_checkpoint(tmp_path / "bad")
    assert err.value.code == "invalid_checkpoint"


def _toy():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_loss_scaler_skips_an_overflowing_step_and_lowers_the_scale():
    assert needs_loss_scaling(torch.float16) and not needs_loss_scaling(torch.bfloat16)
    model, opt = _toy()
    scaler = LossScaler(True, "cpu", init_scale=1024.0)
    x = torch.randn(5, 4)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(model(x).sum()).backward()
    model.weight.grad[0, 0] = float("inf")  # the overflow fp16 would produce
    scaler.unscale_(opt)
    assert scaler.step(opt) is False
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert scaler.scale_value == 512.0

    opt.zero_grad()
    scaled = scaler.scale(model(x).sum())
    assert float(scaled.detach()) == pytest.approx(512.0 * float(model(x).sum().detach()))
    scaled.backward()
    scaler.unscale_(opt)
    grad = model.bias.grad.clone()
    assert torch.allclose(grad, torch.full((3,), 5.0))  # unscaled: d(sum)/d(bias) = batch
    assert scaler.step(opt) is True
    assert not torch.equal(before[1], model.bias.detach())
    assert scaler.state_dict()["scale"] == 512.0


def test_disabled_scaler_is_a_plain_step():
    model, opt = _toy()
    scaler = LossScaler(False, "cpu")
    loss = model(torch.randn(2, 4)).sum()
    assert scaler.scale(loss) is loss
    loss.backward()
    assert scaler.step(opt) is True and scaler.state_dict() is None and scaler.scale_value is None


def test_fast_spec_switches():
    spec = TrainSpec(base_model="/m")
    assert spec.fast == "auto" and spec.fast_spec() == FastSpec()
    off = TrainSpec(base_model="/m", fast="off").fast_spec()
    assert set(off.model_dump().values()) == {"off"}
    one = TrainSpec(base_model="/m", fast={"chunked_loss": "off"})
    assert one.fast_spec().chunked_loss == "off" and one.fast_spec().fused_lora == "auto"
    with pytest.raises(ValueError, match="turbo"):
        TrainSpec(base_model="/m", fast={"turbo": "on"})
    with pytest.raises(ValueError):
        TrainSpec(base_model="/m", fast="on")


def test_fallback_plan_without_the_fast_package(monkeypatch, caplog):
    # The fast package failing to import (what a missing dependency of it does): warned about,
    # then the reference path with the not-built plan.
    import lorapool.service.train as train_pkg

    monkeypatch.delattr(train_pkg, "fast", raising=False)
    monkeypatch.setitem(sys.modules, "lorapool.service.train.fast", None)
    cpu = torch.device("cpu")
    with caplog.at_level(logging.WARNING, logger=fastpath.__name__):
        plan = fastpath.resolve_plan(TrainSpec(base_model="/m", fast={"fused_lora": "on"}), cpu)
    assert "service/train/fast failed to import" in caplog.text
    assert isinstance(plan, FastPlan)
    assert plan.chunked_loss and not (plan.fused_lora or plan.kernels or plan.padding_free
                                      or plan.offload_activations)
    assert plan.reasons["fused_lora"] == fastpath.NOT_BUILT
    text = fastpath.describe(plan)
    assert text.startswith("fast path: fused_lora off (fast path not built)")
    assert "chunked_loss on" in text
    assert not fastpath.resolve_plan(TrainSpec(base_model="/m", fast="off"), cpu).chunked_loss
    assert fastpath.prepare_kwargs(plan, TrainSpec(base_model="/m")) == {}
    off = fastpath.without(plan, {"chunked_loss": "why not"})
    assert not off.chunked_loss and off.reasons["chunked_loss"] == "why not"
    assert json.dumps(off.as_dict())
