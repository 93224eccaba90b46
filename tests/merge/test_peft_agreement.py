"""lorapool's merges against peft's own `add_weighted_adapter` on the same adapter folders.

peft is the reference implementation of the task-arithmetic family. Both sides are read back
as ΔW per module through peft (`get_delta_weight`), so the comparison covers the weights, the
scaling, the √(w·s) split, the sign election, the SVD truncation and the written config.

DARE's masks: peft draws them from torch's global generator in model order, after first
consuming random numbers to initialise the new adapter, so its draws cannot be replayed. To
compare the arithmetic exactly, `peft.utils.merge_utils.random_pruning` (which both sides call)
is replaced here by a mask that depends only on the tensor's content — identical tensors get
identical masks on both sides. Unpatched, DARE is compared at density 1 (no drop) and its own
randomness is checked in test_methods.py.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from lorapool.service.merge import merge_adapters


def assert_same_deltas(ours: dict, ref: dict, atol: float = 1e-6) -> None:
    assert ours.keys() == ref.keys() and ours
    for k, expected in ref.items():
        torch.testing.assert_close(ours[k], expected, rtol=1e-5, atol=atol,
                                   msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def same_rank(make_adapter):
    """Three rank-4 adapters with different scalings (alpha 8, rsLoRA alpha 16, alpha 4)."""
    return [make_adapter("p0", r=4, alpha=8, seed=101, n_examples=20),
            make_adapter("p1", r=4, alpha=16, seed=102, n_examples=50, use_rslora=True),
            make_adapter("p2", r=4, alpha=4, seed=103, n_examples=30)]


@pytest.fixture
def content_masks(monkeypatch):
    """Replace DARE's random draw (for both sides) by a mask keyed on the tensor's bytes."""
    from peft.utils import merge_utils

    def random_pruning(tensor, density, rescale):
        digest = hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        mask = torch.bernoulli(torch.full(tensor.shape, density), generator=g).to(tensor.dtype)
        out = tensor * mask
        return out / density if rescale else out

    monkeypatch.setattr(merge_utils, "random_pruning", random_pruning)


@pytest.mark.parametrize("method,sign", [
    ("ties", "total"), ("ties", "frequency"), ("magnitude_prune", "total"),
    ("dare_linear", "total"), ("dare_ties", "total"), ("dare_ties", "frequency"),
])
def test_factor_methods_match_peft(method, sign, same_rank, content_masks, peft_merge,
                                   peft_deltas, tmp_path):
    kwargs = {"majority_sign": sign} if "ties" in method else {}
    res = merge_adapters(same_rank, method, density=0.5, output_dir=tmp_path / "out", **kwargs)
    assert res.weights == pytest.approx([0.2, 0.5, 0.3])
    ref = peft_merge(same_rank, res.weights, method, density=0.5, majority_sign_method=sign)
    assert_same_deltas(peft_deltas(res.output_dir), ref)


def test_ties_with_negative_unnormalised_weights_matches_peft(same_rank, peft_merge,
                                                              peft_deltas, tmp_path):
    w = [1.0, -0.5, 0.8]
    res = merge_adapters(same_rank, "ties", weights=w, normalize_weights=False, density=0.7,
                         output_dir=tmp_path / "out")
    assert res.weights == w
    ref = peft_merge(same_rank, w, "ties", density=0.7)
    assert_same_deltas(peft_deltas(res.output_dir), ref)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_at_density_one_matches_peft_unpatched(method, same_rank, peft_merge, peft_deltas,
                                                    tmp_path):
    res = merge_adapters(same_rank, method, density=1.0, output_dir=tmp_path / "out")
    ref = peft_merge(same_rank, res.weights, method, density=1.0)
    assert_same_deltas(peft_deltas(res.output_dir), ref)


@pytest.mark.parametrize("method", ["ties_svd", "magnitude_prune_svd", "dare_linear_svd",
                                    "dare_ties_svd"])
def test_update_space_methods_match_peft(method, same_rank, content_masks, peft_merge,
                                         peft_deltas, tmp_path):
    res = merge_adapters(same_rank, method, density=0.6, target_rank=6,
                         output_dir=tmp_path / "out")
    ref = peft_merge(same_rank, res.weights, method, density=0.6, svd_rank=6)
    assert_same_deltas(peft_deltas(res.output_dir), ref)
    assert res.rank == 6 and 0 < res.relative_error < 1


def test_exact_matches_peft_cat_and_svd_matches_peft_svd(make_adapter, same_rank, peft_merge,
                                                         peft_deltas, tmp_path):
    # Different ranks: peft's "cat" and "svd" accept them, as ours do.
    adapters = same_rank[:2] + [make_adapter("p3", r=2, alpha=2, seed=104, n_examples=10)]
    exact = merge_adapters(adapters, "exact", output_dir=tmp_path / "exact")
    assert_same_deltas(peft_deltas(exact.output_dir), peft_merge(adapters, exact.weights, "cat"))
    svd = merge_adapters(adapters, "svd", target_rank=3, output_dir=tmp_path / "svd")
    ours = peft_deltas(svd.output_dir)
    # The truth: the rank-3 truncation of the exact ΔW (as peft loads it), in float64. Ours (a
    # float64 SVD of the small core) equals it to float32 rounding of the saved factors.
    truth = {}
    for k, delta in peft_deltas(exact.output_dir).items():
        u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
        truth[k] = ((u[:, :3] * s[:3]) @ vh[:3]).float()
    assert_same_deltas(ours, truth, atol=1e-6)
    # peft takes a float32 SVD of the full ΔW: where the 3rd and 4th singular values nearly
    # meet (3.83 vs 3.81 in one module here) the truncation amplifies its rounding to ~2e-5 of
    # entries ~0.1, hence the looser absolute tolerance against it.
    assert_same_deltas(ours, peft_merge(adapters, svd.weights, "svd", svd_rank=3), atol=5e-5)
