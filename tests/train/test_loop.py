"""The training loop end to end on a tiny random 4-bit Llama: learning, resume, output, faults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorapool.service.train import (
    DataError,
    LoraSpec,
    NonFiniteLossError,
    OutOfMemoryError,
    TrainError,
    TrainSpec,
    train,
)
from lorapool.service.train import loop as loop_mod
from lorapool.service.train.loop import Trainer
from lorapool.service.train.loss import label_count

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU")]),
]


def _spec(model_dir, **kw) -> TrainSpec:
    base = {"base_model": str(model_dir), "base_model_id": "tiny-llama", "device": "cpu",
                "max_seq_len": 64, "batch_size": 8, "micro_batch_size": 4, "learning_rate": 5e-3,
                "warmup_ratio": 0.1, "lora": LoraSpec(r=8, alpha=16), "max_steps": 6, "seed": 7}
    base.update(kw)
    return TrainSpec(**base)


@pytest.fixture
def data(tmp_path, toy_data):
    return {"train": toy_data.write_jsonl(tmp_path / "train.jsonl", toy_data.chat_records(32)),
            "val": toy_data.write_jsonl(tmp_path / "val.jsonl", toy_data.chat_records(8, seed=1))}


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def _assert_same_adapter(a: Path, b: Path, device: str = "cpu") -> None:
    wa, wb = _adapter(a), _adapter(b)
    assert wa.keys() == wb.keys() and wa
    tol = {"rtol": 1e-5, "atol": 1e-6} if device == "cpu" else {"rtol": 2e-2, "atol": 2e-3}
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], **tol, msg=k)


@pytest.mark.parametrize("device", DEVICES)
def test_loss_falls_and_adapter_is_written(tiny_model_dir, data, tmp_path, device):
    events = []
    spec = _spec(tiny_model_dir, device=device, max_steps=24, eval_every=12)
    result = train(spec, data["train"], tmp_path / "out", validation_data=data["val"],
                   on_event=events.append, cache_dir=tmp_path / "cache")
    assert result.status == "completed" and result.step == result.total_steps == 24
    m = result.metrics
    assert m["eval_loss"] < 0.85 * m["initial_eval_loss"], m
    steps = [e for e in events if e.type == "step"]
    assert [e.step for e in steps] == list(range(1, 25))
    assert steps[-1].loss < steps[0].loss
    assert all(e.lr is not None and e.grad_norm is not None and e.tokens_per_s for e in steps)
    assert [e.step for e in events if e.type == "eval"] == [0, 12, 24]
    assert events[-1].type == "done" and events[-1].data["status"] == "completed"
    if device == "cuda":
        assert m["peak_memory_bytes"] > 0 and steps[-1].memory_peak > 0
    else:
        assert m["peak_memory_bytes"] is None and steps[-1].memory_peak is None
    assert m["trained_tokens"] > 0 and m["n_examples"] == 32 and m["micro_batch_size"] == 4

    out = result.adapter_dir
    assert out == tmp_path / "out" / "adapter"
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json",
                                              "adapter_model.safetensors", "lorapool.json"}
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    meta = json.loads((out / "lorapool.json").read_text())
    assert meta["base_model"] == "tiny-llama" and len(meta["base_model_sha256"]) == 64
    assert meta["spec"]["lora"]["r"] == 8 and meta["n_examples"] == 32
    assert meta["metrics"]["eval_loss"] == m["eval_loss"]


@pytest.mark.parametrize("device", DEVICES)
def test_saved_adapter_loads_with_plain_peft_and_gives_same_logits(tiny_model_dir, data,
                                                                    tmp_path, device):
    from peft import PeftModel

    from lorapool.service.train import load_base_model

    spec = _spec(tiny_model_dir, device=device, max_steps=3)
    trainer = Trainer(spec, data["train"], tmp_path / "out", cache_dir=tmp_path / "cache")
    result = trainer.run()
    ids = torch.tensor([[4, 20, 30, 40, 50, 5, 6, 4, 60, 61]], device=trainer.device)
    trainer.model.eval()
    with torch.no_grad():
        trained = trainer.model(input_ids=ids).logits.float()

    base, _ = load_base_model(spec)
    with torch.no_grad():
        plain = base(input_ids=ids).logits.float()
    reloaded = PeftModel.from_pretrained(base, result.adapter_dir)  # plain peft, nothing of ours
    reloaded.eval()
    with torch.no_grad():
        again = reloaded(input_ids=ids).logits.float()
    tol = {"rtol": 1e-5, "atol": 1e-5} if device == "cpu" else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(again, trained, **tol)
    assert (again - plain).abs().max() > 1e-3  # the adapter really changes the output


def test_only_lora_parameters_change(tiny_model_dir, data, tmp_path):
    spec = _spec(tiny_model_dir, max_steps=3)
    trainer = Trainer(spec, data["train"], tmp_path / "out", cache_dir=tmp_path / "cache")
    trainer._setup()  # run() reuses this setup
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.run()
    after = trainer.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    lora_b = {k for k in before if "lora_B" in k}
    assert lora_b and lora_b <= changed  # B starts at zero, so any training moves it
    assert changed and all("lora_" in k for k in changed), changed - lora_b


def test_loss_is_on_assistant_tokens_only(tiny_model_dir, data, tmp_path):
    """The loop's token count per step is exactly the assistant answer ("ok") plus the
    end-of-turn token, for every example in the step."""
    spec = _spec(tiny_model_dir, max_steps=1)
    trainer = Trainer(spec, data["train"], tmp_path / "out", cache_dir=tmp_path / "cache")
    trainer._setup()
    tok = trainer.tokenizer
    per_example = len(tok("ok", add_special_tokens=False)["input_ids"]) + 1  # + <|im_end|>
    rows = trainer._rows(trainer.train_data, list(range(8)))
    for batch in trainer._micro_batches(rows, 4):
        assert label_count(batch["labels"]) == per_example * batch["input_ids"].shape[0]
        labels = batch["labels"]
        for row_ids, row_labels in zip(batch["input_ids"], labels):
            kept = row_ids[row_labels != -100]
            assert tok.decode(kept) == "ok<|im_end|>"
        _, n = trainer._loss_sum(batch)
        assert n == per_example * batch["input_ids"].shape[0]


@pytest.mark.parametrize("device", DEVICES)
def test_resume_at_step_k_equals_uninterrupted_run(tiny_model_dir, data, tmp_path, device):
    # 2 epochs of 4 steps: the stop lands mid-epoch-1 and resume crosses an epoch boundary.
    spec = _spec(tiny_model_dir, device=device, max_steps=8, checkpoint_every=2)
    full = train(spec, data["train"], tmp_path / "full", cache_dir=tmp_path / "cache")

    calls = {"n": 0}

    def stop_after_3_steps() -> bool:  # polled once before each step
        calls["n"] += 1
        return calls["n"] > 3

    events = []
    part = train(spec, data["train"], tmp_path / "part", cache_dir=tmp_path / "cache",
                 should_stop=stop_after_3_steps, on_event=events.append)
    assert part.status == "stopped" and part.step == 3 and part.adapter_dir is None
    assert part.last_checkpoint == tmp_path / "part" / "checkpoints" / "step-000003"
    assert [e.step for e in events if e.type == "checkpoint"] == [2, 3]
    assert all(e.loss is not None and e.path for e in events if e.type == "checkpoint")
    files = {p.name for p in part.last_checkpoint.iterdir()}
    assert {"adapter_model.safetensors", "optimizer.safetensors", "optimizer.json",
            "scheduler.json", "rng.safetensors", "trainer_state.json"} <= files
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in files)
    state = json.loads((part.last_checkpoint / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["index_in_epoch"]) == (3, 0, 24)

    # Resume in a fresh output folder, as another machine would.
    resumed = train(spec, data["train"], tmp_path / "resumed", cache_dir=tmp_path / "cache",
                    resume_from=part.last_checkpoint)
    assert resumed.status == "completed" and resumed.step == 8
    _assert_same_adapter(resumed.adapter_dir, full.adapter_dir, device)
    assert resumed.metrics["trained_tokens"] == full.metrics["trained_tokens"]


def test_resume_refuses_a_mismatched_run(tiny_model_dir, data, tmp_path):
    spec = _spec(tiny_model_dir, max_steps=4)
    part = train(spec, data["train"], tmp_path / "part", cache_dir=tmp_path / "cache",
                 should_stop=lambda: True)
    assert part.status == "stopped" and part.step == 0 and part.last_checkpoint.is_dir()
    other = _spec(tiny_model_dir, max_steps=4, batch_size=4)
    with pytest.raises(TrainError, match="batch_size") as err:
        train(other, data["train"], tmp_path / "x", cache_dir=tmp_path / "cache",
              resume_from=part.last_checkpoint)
    assert err.value.code == "checkpoint_mismatch"


def test_oom_fallback_halves_micro_batch_and_keeps_the_update(tiny_model_dir, data, tmp_path,
                                                                monkeypatch):
    # Dropout off: the failed attempt would otherwise consume random numbers.
    spec = _spec(tiny_model_dir, max_steps=3, lora=LoraSpec(r=8, alpha=16, dropout=0.0))
    reference = train(spec, data["train"], tmp_path / "ref", cache_dir=tmp_path / "cache")

    def oom_at_step_2(step: int, micro_batch_size: int) -> None:
        if step == 2 and micro_batch_size == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loop_mod, "_oom_probe", oom_at_step_2)
    events = []
    result = train(spec, data["train"], tmp_path / "oom", cache_dir=tmp_path / "cache",
                   on_event=events.append)
    warnings = [e for e in events if e.type == "warning"]
    assert len(warnings) == 1 and warnings[0].data == {"micro_batch_size": 2, "grad_accum": 4}
    assert result.status == "completed" and result.metrics["micro_batch_size"] == 2
    assert [e.step for e in events if e.type == "step"] == [1, 2, 3]
    # Same effective batch, loss normalised by the step's tokens: the same adapter.
    _assert_same_adapter(result.adapter_dir, reference.adapter_dir)


def test_oom_at_micro_batch_1_is_a_clear_error(tiny_model_dir, data, tmp_path, monkeypatch):
    def always_oom(step: int, micro_batch_size: int) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(loop_mod, "_oom_probe", always_oom)
    spec = _spec(tiny_model_dir, max_steps=2, batch_size=4, micro_batch_size=2)
    with pytest.raises(OutOfMemoryError, match="micro_batch_size 1") as err:
        train(spec, data["train"], tmp_path / "out", cache_dir=tmp_path / "cache")
    assert err.value.retryable
    assert not (tmp_path / "out" / "adapter").exists()


def test_non_finite_loss_stops_with_a_clear_error(tiny_model_dir, data, tmp_path):
    class Diverging(Trainer):
        # Inject the divergence: a real NaN depends on luck with learning rates.
        def _loss_sum(self, batch):
            loss, n = super()._loss_sum(batch)
            return (loss * float("nan") if self.step >= 2 else loss), n

    spec = _spec(tiny_model_dir, max_steps=4)
    with pytest.raises(NonFiniteLossError, match="step 3") as err:
        Diverging(spec, data["train"], tmp_path / "out", cache_dir=tmp_path / "cache").run()
    assert err.value.code == "non_finite_loss"
    assert not (tmp_path / "out" / "adapter").exists()


def test_bad_data_names_every_line_and_writes_nothing(tiny_model_dir, tmp_path, toy_data):
    lines = [json.dumps(r) for r in toy_data.chat_records(4)]
    lines[1] = '{"messages": [{"role": "user"}]}'
    lines[3] = "not json"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        train(_spec(tiny_model_dir), bad, tmp_path / "out", cache_dir=tmp_path / "cache")
    assert [e.line for e in err.value.errors] == [2, 4]
    assert not (tmp_path / "out").exists()


def test_packing_and_epochs(tiny_model_dir, data, tmp_path):
    spec = _spec(tiny_model_dir, packing=True, max_seq_len=128, max_steps=None, n_epochs=2,
                 batch_size=2, micro_batch_size=1)
    result = train(spec, data["train"], tmp_path / "out", cache_dir=tmp_path / "cache")
    # 32 examples of ~30 tokens pack about 4 to a 128-token row; 2 rows a step, 2 epochs.
    m = result.metrics
    assert result.status == "completed" and m["n_examples"] == 32
    assert 4 <= m["n_rows"] < 16
    assert result.step == result.total_steps == 2 * -(-m["n_rows"] // 2)
    assert m["trained_tokens"] > 0


@pytest.mark.parametrize("quantization,use_dora", [("int8", False), ("none", False),
                                                   ("fp4", True)])
def test_other_quantisations_and_dora_train(tiny_model_dir, data, tmp_path, quantization,
                                            use_dora):
    spec = _spec(tiny_model_dir, quantization=quantization, max_steps=2, batch_size=4,
                 micro_batch_size=2, lora=LoraSpec(r=4, use_dora=use_dora))
    result = train(spec, data["train"], tmp_path / "out", cache_dir=tmp_path / "cache")
    assert result.status == "completed"
    weights = _adapter(result.adapter_dir)
    assert any("lora_magnitude_vector" in k for k in weights) == use_dora
    assert any(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)
