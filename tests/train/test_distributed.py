"""The trainer's data-parallel mode with no Ray: 2 gloo processes (torch.multiprocessing spawn)
must end with the adapter of 1 process, for equal and unequal row shares, different micro-batches
per rank, and a resume across world sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lorapool.service.train import LoraSpec, TrainSpec, train
from lorapool.service.train.distributed import launch_local, split_counts

pytestmark = pytest.mark.timeout(600)


def _spec(model_dir: Path, **kw) -> TrainSpec:
    # dropout 0: LoRA dropout draws different masks per rank, equal only in distribution.
    base = {"base_model": str(model_dir), "base_model_id": "tiny-llama", "device": "cpu",
            "max_seq_len": 64, "batch_size": 8, "micro_batch_size": 2, "learning_rate": 5e-3,
            "warmup_ratio": 0.1, "lora": LoraSpec(r=8, alpha=16, dropout=0.0), "max_steps": 5,
            "seed": 7, "optimizer": "adamw"}
    base.update(kw)
    return TrainSpec(**base)


TOL = {"rtol": 1e-4, "atol": 1e-5}  # gloo sums in another order than one process


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir, toy_data):
    root = tmp_path_factory.mktemp("dist")
    # 36 rows, batch 8: the last step of the epoch is short (4 rows), so uneven splits and a
    # rank with no rows at all are exercised too.
    data = toy_data.write_jsonl(root / "train.jsonl", toy_data.chat_records(36, answer=None))
    spec = _spec(tiny_model_dir, max_steps=None, n_epochs=1)
    ref = train(spec, data, root / "one", cache_dir=root / "cache-one")
    assert ref.status == "completed" and ref.total_steps == 5
    return root, data, spec, ref.adapter_dir


@given(st.integers(0, 200), st.lists(st.integers(0, 9), min_size=1, max_size=6))
def test_split_counts_add_up_and_follow_weights(n, weights):
    if sum(weights) == 0:
        with pytest.raises(ValueError):
            split_counts(n, weights)
        return
    counts = split_counts(n, weights)
    assert sum(counts) == n and all(c >= 0 for c in counts)
    for c, w in zip(counts, weights):
        assert abs(c - n * w / sum(weights)) < 1.0  # largest remainder: within one row


def test_two_processes_equal_one(setup, same_adapter):
    root, data, spec, ref = setup
    out = root / "two"
    launch_local(2, spec=spec, data=data, output_dir=out, cache_dir=root / "cache-two")
    same_adapter(out / "adapter", ref, **TOL)
    meta = (out / "adapter" / "lorapool.json").read_text()
    assert '"world_size": 2' in meta


def test_two_processes_with_packed_tensors_equal_one(setup, same_adapter):
    """flat_optimizer on (fast/flat_params.py) in both ranks: the all-reduce writes into the
    packed gradient's views, and the run ends as the one-process run without packing."""
    root, data, spec, ref = setup
    out = root / "two-flat"
    flat_spec = TrainSpec.model_validate({**spec.model_dump(), "fast": {"flat_optimizer": "on"}})
    launch_local(2, spec=flat_spec, data=data, output_dir=out, cache_dir=root / "cache-flat")
    same_adapter(out / "adapter", ref, **TOL)
    meta = (out / "adapter" / "lorapool.json").read_text()
    assert '"flat_optimizer": true' in meta


def test_unequal_shares_and_micro_batches_then_resume_on_one(setup, same_adapter):
    """Rank 0 takes 3/4 of each step's rows with micro-batch 3 (a fast card), rank 1 a quarter
    with micro-batch 1; it checkpoints at step 2, and a single process finishes from there."""
    root, data, spec, ref = setup
    out = root / "uneven"
    stop_spec = spec.model_copy(update={"checkpoint_every": 2, "max_steps": None})
    launch_local(2, rows_per_rank=[3.0, 1.0], micro_batch_sizes=[3, 1], spec=stop_spec,
                 data=data, output_dir=out, cache_dir=root / "cache-uneven")
    same_adapter(out / "adapter", ref, **TOL)
    ckpt = out / "checkpoints" / "step-000002"
    assert ckpt.is_dir()
    resumed = train(stop_spec, data, root / "resumed", resume_from=ckpt,
                    cache_dir=root / "cache-resumed")
    assert resumed.status == "completed"
    same_adapter(resumed.adapter_dir, ref, **TOL)
