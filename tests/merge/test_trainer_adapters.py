"""Adapters written by lorapool's own trainer (4-bit base, real loop) merge, and peft loads the
result: the folder format the trainer writes and the one the merge reads are the same."""

from __future__ import annotations

import json

import torch

from lorapool.service.merge import load_adapter, merge_adapters


def test_merge_adapters_from_the_trainer(tiny_model_dir, toy_data, peft_deltas, tmp_path):
    from lorapool.service.train.loop import train
    from lorapool.service.train.spec import LoraSpec, TrainSpec

    adapters = []
    for seed, n in ((1, 12), (2, 4)):
        data = toy_data.write_jsonl(tmp_path / f"d{seed}.jsonl",
                                    toy_data.chat_records(n, seed=seed, answer=None))
        spec = TrainSpec(base_model=str(tiny_model_dir), base_model_id="tiny",
                         lora=LoraSpec(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
                         max_steps=2, batch_size=2, micro_batch_size=2, max_seq_len=64,
                         learning_rate=1e-2, seed=seed, device="cpu", optimizer="adamw",
                         gradient_checkpointing=False)
        result = train(spec, data, tmp_path / f"run{seed}")
        assert result.status == "completed"
        adapters.append(result.adapter_dir)

    res = merge_adapters(adapters, "exact", output_dir=tmp_path / "merged")
    assert res.weights == [0.75, 0.25]  # the trainer's n_examples: 12 and 4
    d0, d1 = (peft_deltas(a) for a in adapters)
    merged = peft_deltas(res.output_dir)
    assert merged.keys() == d0.keys() and len(merged) == 4
    for k in d0:
        assert d0[k].abs().max() > 0  # training moved B off its zero init
        torch.testing.assert_close(merged[k], 0.75 * d0[k] + 0.25 * d1[k], rtol=1e-5, atol=1e-7)
    meta = json.loads((res.output_dir / "lorapool.json").read_text())
    assert meta["base_model"] == "tiny" and meta["n_examples"] == 16
    assert meta["base_model_sha256"] == load_adapter(adapters[0]).base_model_sha256
