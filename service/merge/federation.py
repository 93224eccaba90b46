"""Federated rounds, the pure part: round decisions and aggregation (no Ray, store or HTTP).

A federation trains one LoRA adapter across participants whose data stay where they are
(an uploaded file of the creator's, or a node-local data set on a donor). Round k:

1. every participant trains `local steps` (or epochs) starting from the global adapter of round
   k-1 (peft's initialisation in round 1) — an ordinary pool job each;
2. the round waits until every participant is done, or until its deadline; `decide_round`
   says what then: aggregate the adapters that came back if at least `quorum` did (the rest
   are recorded as dropped: failed, node lost, cut at the deadline), else the federation fails;
3. `aggregate_round` merges the returned adapters with any `merge_adapters` method, in the
   participants' declared order (never completion order, so a round's result does not depend
   on which node was fastest), weighted by the given per-participant weights or else by each
   adapter's training-example count (FedAvg);
4. the result becomes the round's global adapter and the next round's starting point.

**Starting the next round from an exact aggregate.** `exact` (and any method whose result has a
higher rank than the participants train with) concatenates ranks: Σ wᵢ·Bᵢ·Aᵢ has rank up to
n·r, and a participant's LoRA modules hold rank r. lorapool re-factorises: the aggregate is
truncated back to rank r by SVD (`merge_adapters(method="svd")` on the one adapter: the best
rank-r approximation in Frobenius norm, singular values split evenly between B and A), and the
relative reconstruction error ‖ΔW − ΔW_r‖/‖ΔW‖ is recorded per round (`refactor_error`).
The alternative, plain `naive` FedAvg of A and B, needs no re-factorisation but is inexact
(mean(B)·mean(A) ≠ mean(B·A)); `deviation_from_exact` records how far it lands from the exact
average. bench/federated_rounds.py measures both per round (error and held-out loss).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from .errors import MergeError
from .merge import merge_adapters
from .methods import DELTA_METHODS, DENSITY_METHODS, METHODS

# A participant's job as the round sees it (the store's job statuses, folded).
Status = Literal["pending", "running", "succeeded", "failed", "cancelled"]
OPEN = frozenset({"pending", "running", "queued", "validating_files"})
DONE = "succeeded"


@dataclass(frozen=True)
class RoundPolicy:
    """When a round may close: `quorum` adapters back, or `deadline_s` after it started."""

    quorum: int
    deadline_s: float

    def __post_init__(self) -> None:
        if self.quorum < 1:
            raise ValueError("quorum must be at least 1")
        if not self.deadline_s > 0:
            raise ValueError("deadline_s must be positive")


@dataclass(frozen=True)
class RoundDecision:
    """`wait`, `aggregate` the adapters of `took_part`, or `fail` the federation (`reason`).

    `took_part` is in the participants' declared order; `dropped` maps each participant left
    out to why (its job failed or was cancelled, or it was cut at the deadline); `late` lists
    the participants still running when the round closed (their jobs are to be cancelled).
    """

    action: Literal["wait", "aggregate", "fail"]
    took_part: tuple[str, ...] = ()
    dropped: dict[str, str] = field(default_factory=dict)
    late: tuple[str, ...] = ()
    reason: str = ""


def decide_round(statuses: Mapping[str, str], order: Sequence[str], *, started_at: float,
                 now: float, policy: RoundPolicy,
                 errors: Optional[Mapping[str, str]] = None) -> RoundDecision:
    """What to do with a round whose participants' jobs are in `statuses` (see module doc).

    - Everyone finished: aggregate those that succeeded if at least `quorum` did, else fail.
    - Deadline passed: the same with whoever succeeded so far; the others are cut (`late`).
    - Before the deadline: fail at once if the quorum can no longer be reached (too many
      failed), else wait.
    """
    errors = errors or {}
    unknown = set(statuses) - set(order)
    if unknown:
        raise ValueError(f"statuses for participants not in the round: {sorted(unknown)}")
    succeeded = tuple(p for p in order if statuses.get(p) == DONE)
    open_ = tuple(p for p in order if statuses.get(p, "pending") in OPEN)
    failed = {p: f"job {statuses[p]}" + (f": {errors[p]}" if errors.get(p) else "")
              for p in order if p not in succeeded and p not in open_}
    expired = now >= started_at + policy.deadline_s
    if open_ and not expired:
        if len(succeeded) + len(open_) < policy.quorum:
            return RoundDecision("fail", succeeded, failed, (), _short(
                len(succeeded) + len(open_), len(order), policy.quorum, "can still finish"))
        return RoundDecision("wait", succeeded, failed)
    dropped = dict(failed)
    late = open_ if expired else ()
    for p in late:
        dropped[p] = f"still {statuses.get(p, 'pending')} at the round's deadline " \
                     f"({policy.deadline_s:g} s)"
    if len(succeeded) >= policy.quorum:
        return RoundDecision("aggregate", succeeded, dropped, late)
    return RoundDecision("fail", succeeded, dropped, late,
                         _short(len(succeeded), len(order), policy.quorum, "returned an adapter"))


def _short(k: int, n: int, quorum: int, what: str) -> str:
    return f"only {k} of {n} participants {what}; the quorum is {quorum}"


# -- aggregation ------------------------------------------------------------------------------

SVD_LIKE = ("svd",) + DELTA_METHODS


@dataclass
class Aggregate:
    """A round's global adapter and what making it measured."""

    path: Path
    method: str
    weights: dict[str, float]  # applied, normalised, by participant
    rank: int  # of the global adapter (= the participants' r)
    merged_rank: int  # of the aggregate before re-factorisation
    refactor_error: Optional[float]  # ‖ΔW − ΔW_r‖/‖ΔW‖ when re-factorised, else None
    deviation_from_exact: Optional[float]  # of the aggregate vs the exact weighted average
    diagnostics: dict[str, Any] = field(default_factory=dict)


def check_method(method: str, params: Mapping[str, Any]) -> None:
    """Refuse an unknown method or parameter before any round runs (MergeError names it)."""
    if method not in METHODS:
        raise MergeError(f"method: unknown merge method {method!r}; one of {sorted(METHODS)}")
    allowed = {"density", "majority_sign", "seed"}
    extra = set(params) - allowed
    if extra:
        raise MergeError(f"params: unknown {sorted(extra)}; allowed: {sorted(allowed)}")
    if method in DENSITY_METHODS and params.get("density") is None:
        raise MergeError(f"params.density: required for method {method!r} (0 < density <= 1)")
    if method not in DENSITY_METHODS and params.get("density") is not None:
        raise MergeError(f"params.density: applies only to {list(DENSITY_METHODS)}")


def aggregate_round(adapters: Sequence[tuple[str, str | Path]], *, method: str, rank: int,
                    output_dir: str | Path,
                    weights: Optional[Mapping[str, float]] = None,
                    params: Optional[Mapping[str, Any]] = None) -> Aggregate:
    """Merge (participant, adapter folder) pairs, in the given order, into `output_dir` as a
    rank-`rank` adapter the next round can start from (see the module docstring)."""
    if not adapters:
        raise MergeError("adapters: a round needs at least one returned adapter")
    params = dict(params or {})
    check_method(method, params)
    names = [n for n, _ in adapters]
    out = Path(output_dir)
    w = None
    if weights is not None:
        missing = [n for n in names if n not in weights]
        if missing:
            raise MergeError(f"weights: none given for {missing}")
        w = [float(weights[n]) for n in names]
    with tempfile.TemporaryDirectory(prefix="lorapool-fed-") as tmp:
        merged = Path(tmp) / "merged"
        if len(adapters) == 1:
            # One adapter came back: it is the aggregate (every method's weighted mean of one).
            shutil.copytree(adapters[0][1], merged)
            applied, diag = [1.0], {"deviation_from_exact": 0.0}
        else:
            kw: dict[str, Any] = {k: v for k, v in params.items() if v is not None}
            if method in SVD_LIKE:
                kw["target_rank"] = rank
            res = merge_adapters([p for _, p in adapters], method, weights=w,
                                 output_dir=merged, **kw)
            applied, diag = res.weights, res.diagnostics
        merged_rank = _max_rank(merged)
        refactor_error = diag.get("relative_error")  # svd-like methods truncate as they merge
        if merged_rank > rank:
            res = merge_adapters([merged], "svd", target_rank=rank, output_dir=out)
            refactor_error = res.relative_error
        else:
            shutil.copytree(merged, out)
    return Aggregate(
        path=out, method=method, weights=dict(zip(names, applied)), rank=min(rank, merged_rank),
        merged_rank=merged_rank, refactor_error=refactor_error,
        deviation_from_exact=diag.get("deviation_from_exact"),
        diagnostics={k: v for k, v in diag.items() if not k.endswith("_per_module")})


def _max_rank(folder: Path) -> int:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    return max([int(cfg["r"]), *(int(v) for v in (cfg.get("rank_pattern") or {}).values())])


def weighted_mean(values: Mapping[str, Optional[float]],
                  weights: Mapping[str, float]) -> Optional[float]:
    """Σ wᵢ·vᵢ / Σ wᵢ over participants with a finite value (round metrics such as loss)."""
    pairs = [(weights.get(k, 0.0), v) for k, v in values.items()
             if v is not None and math.isfinite(v)]
    total = sum(w for w, _ in pairs)
    return sum(w * v for w, v in pairs) / total if total > 0 else None
