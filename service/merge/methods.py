"""The arithmetic of each merge method, for one module at a time (pure tensors, no files).

Every function takes the same module of each input adapter (`LoraModule`: A (r, in), B (out, r),
peft scaling s, so ΔW = s·B·A) plus the merge weights, and returns factors (A, B) whose product
*with scaling 1* is the merged update. Three groups:

- `naive_factors` — average A and B separately (federated LoRA's usual FedAvg). Inexact:
  mean(B)·mean(A) ≠ mean(B·A) unless all A (or all B) are equal; kept as the reference point.
- `exact_factors` — Σ wᵢ·sᵢ·Bᵢ·Aᵢ held exactly by concatenating ranks (B's columns carry the
  weight and scaling), and `lowrank_svd` to truncate such a product back to a target rank
  without ever forming the full out×in matrix (QR of both factors, SVD of the small core).
- The task-arithmetic family, through peft's own primitives (`peft.utils.merge_utils`) so the
  semantics are peft's `add_weighted_adapter`: `factor_task_arithmetic` combines the A's and the
  B's separately with weights √|wᵢ·sᵢ| (the sign on A), as peft's `ties`/`dare_*`/
  `magnitude_prune` do (equal ranks needed); `delta_task_arithmetic` combines the full updates
  ΔWᵢ, as peft's `*_svd` variants do, and `dense_svd` truncates the result to a rank.

DARE's random masks come from torch's global generator inside peft; we fork it and seed it per
(seed, module, factor), so a merge is reproducible and independent of module order, and the
caller's RNG state is untouched.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Sequence
from typing import Literal

import torch

from .adapter_io import LoraModule

Factors = tuple[torch.Tensor, torch.Tensor]  # (A, B), scaling 1

# method → what it does (the keys are what `merge_adapters(method=...)` accepts).
METHODS: dict[str, str] = {
    "naive": "weighted average of A and B separately (FedAvg of factors; inexact)",
    "exact": "exact weighted average of the updates B·A (ranks concatenated)",
    "svd": "exact weighted average truncated to target_rank by SVD (reports the error)",
    "ties": "peft TIES on the A and B factors (trim to density, elect sign, disjoint mean)",
    "dare_linear": "peft DARE on the A and B factors (random drop to density, rescale, sum)",
    "dare_ties": "peft DARE drop then TIES sign election on the A and B factors",
    "magnitude_prune": "peft magnitude pruning to density on the A and B factors, then sum",
    "ties_svd": "peft TIES on the updates B·A, truncated to target_rank by SVD",
    "dare_linear_svd": "peft DARE on the updates B·A, truncated to target_rank by SVD",
    "dare_ties_svd": "peft DARE+TIES on the updates B·A, truncated to target_rank by SVD",
    "magnitude_prune_svd": "peft magnitude pruning on the updates B·A, truncated by SVD",
}
TASK_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
DELTA_METHODS = tuple(f"{m}_svd" for m in TASK_METHODS)
DENSITY_METHODS = TASK_METHODS + DELTA_METHODS
SIGN_METHODS = ("ties", "dare_ties", "ties_svd", "dare_ties_svd")
RANDOM_METHODS = ("dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd")

MajoritySign = Literal["total", "frequency"]


def naive_factors(mods: Sequence[LoraModule], weights: Sequence[float], *,
                  keep_scaling: bool = False) -> Factors:
    """Σ wᵢ·Aᵢ and Σ wᵢ·Bᵢ (equal ranks needed).

    With `keep_scaling` (all inputs share one scaling s, which the output config keeps) the
    factors are averaged as they are; otherwise each sᵢ is folded into Bᵢ first and the
    result has scaling 1.
    """
    A = sum(w * m.A for w, m in zip(weights, mods))
    B = sum(w * (m.B if keep_scaling else m.B * m.scaling) for w, m in zip(weights, mods))
    return A, B


def exact_factors(mods: Sequence[LoraModule], weights: Sequence[float]) -> Factors:
    """[A₁; A₂; …] and [w₁s₁B₁, w₂s₂B₂, …]: their product is Σ wᵢ·sᵢ·Bᵢ·Aᵢ exactly."""
    A = torch.cat([m.A for m in mods], dim=0)
    B = torch.cat([m.B * (w * m.scaling) for w, m in zip(weights, mods)], dim=1)
    return A, B


def lowrank_svd(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                       torch.Tensor]:
    """Best rank-`rank` factors of B·A without forming it, and all its singular values.

    B·A = Qb·(Rb·Raᵀ)·Qaᵀ with B = Qb·Rb and Aᵀ = Qa·Ra (reduced QR); the SVD of the small core
    Rb·Raᵀ gives B·A's. The singular values are split evenly between the new factors
    (B' = U·√S, A' = √S·Vᵀ), which keeps them on the same scale for further training.
    Computed in float64; returns (A', B') in float32 and the singular values (float64).
    """
    Qb, Rb = torch.linalg.qr(B.double(), mode="reduced")
    Qa, Ra = torch.linalg.qr(A.double().T, mode="reduced")
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
    k = min(rank, S.numel())
    root = S[:k].sqrt()
    B_k = (Qb @ U[:, :k]) * root
    A_k = root[:, None] * (Vh[:k] @ Qa.T)
    return A_k.float(), B_k.float(), S


def dense_svd(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors of the full matrix `delta` (as peft's `*_svd` merges do), and
    its singular values. Same even split of the singular values as `lowrank_svd`."""
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)
    k = min(rank, S.numel())
    root = S[:k].sqrt()
    return (root[:, None] * Vh[:k]).float(), (U[:, :k] * root).float(), S.double()


def tail_energy(S: torch.Tensor, rank: int) -> tuple[float, float]:
    """(Σ_{k≥rank} σₖ², Σ σₖ²): the squared Frobenius norms of what truncation drops and of all."""
    S = S.double()
    return float((S[rank:] ** 2).sum()), float((S ** 2).sum())


def lowrank_sq_norm(A: torch.Tensor, B: torch.Tensor) -> float:
    """‖B·A‖²_F = trace((BᵀB)(AAᵀ)) without forming B·A (float64; clamped at 0 against
    rounding when the product is a difference that nearly cancels)."""
    A, B = A.double(), B.double()
    return max(float(torch.trace((B.T @ B) @ (A @ A.T))), 0.0)


def difference_sq_norm(x: Factors, y: Factors) -> float:
    """‖B_x·A_x − B_y·A_y‖²_F via the concatenated factors."""
    (Ax, Bx), (Ay, By) = x, y
    return lowrank_sq_norm(torch.cat([Ax, Ay], dim=0), torch.cat([Bx, -By], dim=1))


def _peft_combiner(method: str):
    from peft.utils import merge_utils

    base = method.removesuffix("_svd")
    return {"ties": merge_utils.ties, "dare_linear": merge_utils.dare_linear,
            "dare_ties": merge_utils.dare_ties, "magnitude_prune": merge_utils.magnitude_prune,
            "linear": merge_utils.task_arithmetic}[base], base


def _combine(method: str, tensors: list[torch.Tensor], weights: torch.Tensor,
             density: float | None, majority_sign: MajoritySign, seed: int) -> torch.Tensor:
    """peft's combination `method` of `tensors`, under a forked RNG seeded with `seed`."""
    fn, base = _peft_combiner(method)
    kwargs: dict = {}
    if base != "linear":
        kwargs["density"] = density
    if base in ("ties", "dare_ties"):
        kwargs["majority_sign_method"] = majority_sign
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft warns that density >= 1 prunes nothing: that is what density 1 asks for.
        warnings.filterwarnings("ignore", message="The density .* no pruning")
        torch.manual_seed(seed)
        return fn(tensors, weights, **kwargs)


def module_seed(seed: int, name: str, part: str) -> int:
    """A seed for one module's factor, stable across processes and module order."""
    return zlib.crc32(f"{seed}:{name}:{part}".encode())


def factor_task_arithmetic(method: str, mods: Sequence[LoraModule], weights: Sequence[float], *,
                           density: float | None, majority_sign: MajoritySign = "total",
                           seed: int = 0) -> Factors:
    """peft `add_weighted_adapter(combination_type=method)` for one module (equal ranks).

    As peft does: each adapter's weight times its scaling, w·s, is split as √|w·s| onto both
    factors with the sign on A only, then A's and B's are combined separately.
    """
    w_a, w_b = [], []
    for w, m in zip(weights, mods):
        ws = w * m.scaling
        root = math.sqrt(abs(ws))
        w_a.append(root if ws >= 0 else -root)
        w_b.append(root)
    name = mods[0].name
    A = _combine(method, [m.A for m in mods], torch.tensor(w_a), density, majority_sign,
                 module_seed(seed, name, "A"))
    B = _combine(method, [m.B for m in mods], torch.tensor(w_b), density, majority_sign,
                 module_seed(seed, name, "B"))
    return A.float(), B.float()


def delta_task_arithmetic(method: str, mods: Sequence[LoraModule], weights: Sequence[float], *,
                          density: float | None, majority_sign: MajoritySign = "total",
                          seed: int = 0) -> torch.Tensor:
    """peft's `*_svd` combination for one module, before its SVD: the method applied to the
    full updates ΔWᵢ = sᵢ·Bᵢ·Aᵢ with the weights as given."""
    deltas = [m.delta() for m in mods]
    return _combine(method, deltas, torch.tensor(list(weights)), density, majority_sign,
                    module_seed(seed, mods[0].name, "delta"))
