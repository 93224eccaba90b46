"""Merge methods against their definitions: exact vs naive, svd truncation, weights, metadata.

The merged ΔW is always read back through peft (`PeftModel.from_pretrained` + `get_delta_weight`)
so these tests also prove the written config makes peft's scaling reproduce the merged update.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from lorapool.service.merge import METHODS, merge_adapters
from lorapool.service.merge.adapter_io import LoraModule
from lorapool.service.merge.methods import factor_task_arithmetic


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / y.norm())


def global_rel(d: dict, ref: dict) -> float:
    num = sum(float((d[k] - ref[k]).norm() ** 2) for k in ref)
    return math.sqrt(num / sum(float(ref[k].norm() ** 2) for k in ref))


def weighted_sum(deltas: list[dict], weights: list[float]) -> dict:
    return {k: sum(w * d[k] for w, d in zip(weights, deltas)) for k in deltas[0]}


@pytest.fixture(scope="module")
def mixed(make_adapter):
    """Three adapters with different ranks, alphas, rsLoRA, and a per-module rank_pattern."""
    return [
        make_adapter("m0", r=4, alpha=8, seed=1, n_examples=30),
        make_adapter("m1", r=2, alpha=16, seed=2, n_examples=10, use_rslora=True),
        make_adapter("m2", r=4, alpha=4, seed=3, n_examples=60,
                     rank_pattern={"model.layers.1.mlp.down_proj": 3}),
    ]


def test_exact_reproduces_weighted_sum_of_updates(mixed, peft_deltas, tmp_path):
    res = merge_adapters(mixed, "exact", weights=[0.5, 0.2, 0.3], output_dir=tmp_path / "out")
    inputs = [peft_deltas(p) for p in mixed]
    expected = weighted_sum(inputs, [0.5, 0.2, 0.3])
    merged = peft_deltas(res.output_dir)
    assert merged.keys() == expected.keys() and len(merged) == 6
    for k in expected:
        torch.testing.assert_close(merged[k], expected[k], rtol=1e-5, atol=1e-6)
    # Concatenated ranks: 4 + 2 + 4, except the module where m2 has rank 3.
    assert res.rank == 10 and res.ranks["model.layers.1.mlp.down_proj"] == 9
    assert res.diagnostics["deviation_from_exact"] < 1e-6


def test_naive_is_fedavg_of_factors_and_visibly_inexact(make_adapter, peft_deltas, tmp_path):
    a, b = make_adapter("n0", r=4, alpha=8, seed=11), make_adapter("n1", r=4, alpha=8, seed=12)
    w = [0.25, 0.75]
    naive = merge_adapters([a, b], "naive", weights=w, output_dir=tmp_path / "naive")
    exact = merge_adapters([a, b], "exact", weights=w, output_dir=tmp_path / "exact")
    got_naive, got_exact = peft_deltas(naive.output_dir), peft_deltas(exact.output_dir)
    target = weighted_sum([peft_deltas(a), peft_deltas(b)], w)

    # Same r and alpha: naive keeps the inputs' config (a federated round trains on with it).
    cfg = json.loads((naive.output_dir / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"]) == (4, 8)
    # …and is exactly s · mean(B) · mean(A), read from the input files.
    from safetensors.torch import load_file
    sa, sb = (load_file(str(p / "adapter_model.safetensors")) for p in (a, b))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    mean_a = w[0] * sa[key.format("A")] + w[1] * sb[key.format("A")]
    mean_b = w[0] * sa[key.format("B")] + w[1] * sb[key.format("B")]
    torch.testing.assert_close(got_naive["model.layers.0.self_attn.q_proj"],
                               2.0 * mean_b @ mean_a, rtol=1e-5, atol=1e-6)

    # exact hits Σ w·ΔW; naive misses it by a wide margin on adapters with different A's.
    assert global_rel(got_exact, target) < 1e-5
    miss = global_rel(got_naive, target)
    assert miss > 0.2
    assert naive.diagnostics["deviation_from_exact"] == pytest.approx(miss, rel=1e-3)


def test_naive_folds_differing_scalings_into_b(make_adapter, peft_deltas, tmp_path):
    a = make_adapter("f0", r=4, alpha=8, seed=21)
    b = make_adapter("f1", r=4, alpha=32, seed=22, use_rslora=True)
    res = merge_adapters([a, b], "naive", weights=[1, 1], output_dir=tmp_path / "out")
    cfg = json.loads((res.output_dir / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == cfg["r"] == 4 and not cfg["use_rslora"]  # scaling 1
    from safetensors.torch import load_file
    sa, sb = (load_file(str(p / "adapter_model.safetensors")) for p in (a, b))
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_{}.weight"
    mean_a = (sa[key.format("A")] + sb[key.format("A")]) / 2
    mean_sb = (2.0 * sa[key.format("B")] + 16.0 * sb[key.format("B")]) / 2  # 8/4, 32/sqrt(4)
    torch.testing.assert_close(peft_deltas(res.output_dir)["model.layers.1.mlp.down_proj"],
                               mean_sb @ mean_a, rtol=1e-5, atol=1e-6)


def test_svd_full_rank_equals_exact_and_error_grows_as_rank_shrinks(mixed, peft_deltas,
                                                                    tmp_path):
    exact = peft_deltas(merge_adapters(mixed, "exact", output_dir=tmp_path / "exact").output_dir)
    full = merge_adapters(mixed, "svd", target_rank=10, output_dir=tmp_path / "svd10")
    assert full.relative_error < 1e-6
    assert global_rel(peft_deltas(full.output_dir), exact) < 1e-5

    errors = []
    for k in (8, 6, 4, 2, 1):
        res = merge_adapters(mixed, "svd", target_rank=k, output_dir=tmp_path / f"svd{k}")
        measured = global_rel(peft_deltas(res.output_dir), exact)
        # The reported error is what the merged adapter really leaves, as peft loads it.
        assert res.relative_error == pytest.approx(measured, rel=1e-3)
        assert res.rank == k and set(res.ranks.values()) == {k}
        per_module = res.diagnostics["relative_error_per_module"]
        assert set(per_module) == set(exact) and all(0 <= e < 1 for e in per_module.values())
        errors.append(res.relative_error)
    assert errors == sorted(errors) and len(set(errors)) == len(errors), errors
    assert errors[0] > 1e-3


def test_svd_of_one_adapter_reduces_its_rank(make_adapter, peft_deltas, tmp_path):
    a = make_adapter("one", r=4, alpha=8, seed=5)
    res = merge_adapters([a], "svd", target_rank=2, output_dir=tmp_path / "out")
    assert res.weights == [1.0] and res.rank == 2
    assert 0 < res.relative_error < 1
    assert global_rel(peft_deltas(res.output_dir), peft_deltas(a)) == pytest.approx(
        res.relative_error, rel=1e-3)


def test_default_weights_are_sample_counts_and_metadata_records_the_merge(mixed, peft_deltas,
                                                                         tmp_path):
    res = merge_adapters(mixed, "exact", output_dir=tmp_path / "out")
    assert res.weights == pytest.approx([0.3, 0.1, 0.6])  # n_examples 30, 10, 60
    merged = peft_deltas(res.output_dir)
    expected = weighted_sum([peft_deltas(p) for p in mixed], [0.3, 0.1, 0.6])
    assert global_rel(merged, expected) < 1e-5

    meta = json.loads((res.output_dir / "lorapool.json").read_text())
    assert meta["base_model_sha256"] == "a" * 64 and meta["n_examples"] == 100
    assert meta["merge"]["method"] == "exact"
    assert [i["job_id"] for i in meta["merge"]["inputs"]] == ["job-m0", "job-m1", "job-m2"]
    assert [i["weight"] for i in meta["merge"]["inputs"]] == pytest.approx([0.3, 0.1, 0.6])
    assert all(len(i["adapter_sha256"]) == 64 for i in meta["merge"]["inputs"])
    assert not list(tmp_path.glob(".tmp-*"))  # no temporary folder left behind


def test_unnormalised_weights_are_used_as_given(make_adapter, peft_deltas, tmp_path):
    a, b = make_adapter("u0", seed=31), make_adapter("u1", seed=32)
    res = merge_adapters([a, b], "exact", weights=[1.0, -1.0], normalize_weights=False,
                         output_dir=tmp_path / "out")
    assert res.weights == [1.0, -1.0]
    da, db = peft_deltas(a), peft_deltas(b)
    assert global_rel(peft_deltas(res.output_dir), {k: da[k] - db[k] for k in da}) < 1e-5


def test_embedding_lora_and_saved_embedding_layer_carry_over(make_adapter, peft_deltas,
                                                             tmp_path):
    targets = ("embed_tokens", "q_proj")
    a = make_adapter("e0", seed=41, targets=targets)
    b = make_adapter("e1", r=2, seed=42, targets=targets)
    res = merge_adapters([a, b], "exact", weights=[0.5, 0.5], output_dir=tmp_path / "out")
    expected = weighted_sum([peft_deltas(a), peft_deltas(b)], [0.5, 0.5])
    assert "model.embed_tokens" in expected
    assert global_rel(peft_deltas(res.output_dir), expected) < 1e-5


def test_dare_masks_are_seeded_reproducible_and_keep_density():
    """DARE's drops: same seed → same merge; other seed → other; kept share ≈ density."""
    g = torch.Generator().manual_seed(0)
    state = torch.random.get_rng_state()
    mods = [LoraModule(name="m", A=torch.randn(8, 512, generator=g),
                       B=torch.randn(256, 8, generator=g), scaling=1.0) for _ in range(2)]
    w = [0.5, 0.5]
    A1, B1 = factor_task_arithmetic("dare_linear", mods, w, density=0.3, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    A2, B2 = factor_task_arithmetic("dare_linear", mods, w, density=0.3, seed=7)
    A3, _ = factor_task_arithmetic("dare_linear", mods, w, density=0.3, seed=8)
    assert torch.equal(A1, A2) and torch.equal(B1, B2) and not torch.equal(A1, A3)
    # An entry of the sum is zero only where both adapters dropped it: (1 - 0.3)² = 0.49.
    assert (A1 == 0).float().mean().item() == pytest.approx(0.49, abs=0.03)
    # Rescaling by 1/density keeps the expectation: averaged over seeds → the plain average.
    mean_a = sum(factor_task_arithmetic("dare_linear", mods, w, density=0.3, seed=s)[0]
                 for s in range(200)) / 200
    plain = (mods[0].A + mods[1].A) * math.sqrt(0.5)  # peft puts √w on each factor
    assert rel(mean_a, plain) < 0.15


def test_methods_table_names_every_method():
    assert {"naive", "exact", "svd", "ties", "dare_linear", "dare_ties",
            "magnitude_prune"} <= set(METHODS)
    assert all(isinstance(v, str) and v for v in METHODS.values())
