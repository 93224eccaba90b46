"""Training and evaluation share the builder and the loss: same adapter, same number; the
resolved fast plan is reported; fp16 compute skips overflowing steps (loss scaling)."""

from __future__ import annotations

import json

import pytest
import torch

from lorapool.service.train import LoraSpec, TrainSpec, evaluate
from lorapool.service.train.loop import Trainer


def _spec(model_dir, **kw) -> TrainSpec:
    base = {"base_model": str(model_dir), "base_model_id": "tiny-llama", "device": "cpu",
            "max_seq_len": 64, "batch_size": 8, "micro_batch_size": 4, "learning_rate": 5e-3,
            "lora": LoraSpec(r=8, alpha=16), "max_steps": 2, "seed": 7}
    base.update(kw)
    return TrainSpec(**base)


@pytest.fixture
def data(tmp_path, toy_data):
    return {"train": toy_data.write_jsonl(tmp_path / "train.jsonl", toy_data.chat_records(16)),
            "val": toy_data.write_jsonl(tmp_path / "val.jsonl", toy_data.chat_records(8, seed=1))}


def test_train_and_evaluate_give_the_same_loss_for_the_same_adapter(tiny_model_dir, data,
                                                                     tmp_path):
    events = []
    spec = _spec(tiny_model_dir)
    trainer = Trainer(spec, data["train"], tmp_path / "out", validation_data=data["val"],
                      on_event=events.append, cache_dir=tmp_path / "cache")
    result = trainer.run()
    assert trainer.built.chunked_loss  # the default on the CPU: chunked loss on
    trained_eval = result.metrics["eval_loss"]
    assert trained_eval != result.metrics["initial_eval_loss"]  # the adapter changed something

    scored = evaluate(spec, result.adapter_dir, data["val"], cache_dir=tmp_path / "cache")
    assert scored["loss"] == pytest.approx(trained_eval, rel=1e-5)
    # The reference (full logits) loss is the same number.
    full = evaluate(_spec(tiny_model_dir, fast={"chunked_loss": "off"}), result.adapter_dir,
                    data["val"], cache_dir=tmp_path / "cache")
    assert full["loss"] == pytest.approx(trained_eval, rel=1e-5)

    status = [e for e in events if e.type == "status" and e.message.startswith("fast path:")]
    assert len(status) == 1 and "chunked_loss on" in status[0].message
    assert status[0].data["fast"]["chunked_loss"] is True
    meta = json.loads((result.adapter_dir / "lorapool.json").read_text())
    assert meta["fast"] == status[0].data["fast"] and meta["fast"]["fused_lora"] is False


@pytest.mark.parametrize("flat", ["off", "on"])
def test_fp16_compute_skips_an_overflowing_step(tiny_model_dir, data, tmp_path, flat):
    # fp16 on the CPU stands in for a pre-Ampere GPU (no such card here): same scaler code.
    # flat "on": the scaler finds the overflow in the packed gradient (fast/flat_params.py).
    spec = _spec(tiny_model_dir, compute_dtype="fp16", quantization="none", max_steps=3,
                 checkpoint_every=2, fast={"flat_optimizer": flat})
    events = []
    trainer = Trainer(spec, data["train"], tmp_path / "out", on_event=events.append,
                      cache_dir=tmp_path / "cache")
    trainer._setup()
    assert trainer.compute_dtype == torch.float16 and trainer.scaler.enabled
    assert all(p.dtype == torch.float32 for p in trainer.params)  # fp32 LoRA master weights
    assert (trainer.flat is not None) == (flat == "on")
    lora_b = next(p for n, p in trainer.model.named_parameters() if "lora_B" in n)
    snapshots = {}

    def overflow_at_step_2(grad):  # what an fp16 overflow leaves in a gradient
        return grad * float("inf") if trainer.step == 1 else grad

    lora_b.register_hook(overflow_at_step_2)
    trainer.events.on_event = lambda e: (events.append(e), e.type == "step" and
                                         snapshots.__setitem__(e.step, lora_b.detach().clone()))
    result = trainer.run()
    assert result.status == "completed" and result.metrics["skipped_steps"] == 1
    warnings = [e for e in events if e.type == "warning"]
    assert len(warnings) == 1 and warnings[0].step == 2 and warnings[0].data["skipped_steps"] == 1
    assert torch.equal(snapshots[1], snapshots[2])  # the skipped step changed nothing
    assert not torch.equal(snapshots[2], snapshots[3])
    state = json.loads((tmp_path / "out" / "checkpoints" / "step-000002" /
                        "trainer_state.json").read_text())
    assert state["skipped_steps"] == 1 and state["loss_scaler"]["scale"] == 2.0**15
