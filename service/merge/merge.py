"""`merge_adapters`: several LoRA adapters of one base model → one PEFT adapter folder.

Inputs are lorapool adapter folders (`adapter_io`); the output is the same kind of folder: a
PEFT adapter that `PeftModel.from_pretrained` loads as is, plus `lorapool.json` recording the
inputs (path, job, sample count, weight, sha256 of their weights), the method, its parameters
and diagnostics. The per-module arithmetic lives in `methods`; this module validates, picks the
weights, writes the config so that peft's own scaling reproduces the merged update, and saves.

Weights: by default each adapter's `n_examples` from its `lorapool.json` (FedAvg). They are
normalised to sum to 1 (`normalize_weights=True`), so `naive`/`exact`/`svd` are weighted
averages; for the task-arithmetic family peft multiplies each task vector by its weight, so pass
`normalize_weights=False` (e.g. weights [1, 1]) for task arithmetic's plain sum.

Output scaling: merged factors carry every adapter's scaling and weight themselves, and the
config says scaling 1 (lora_alpha = r, rank_pattern/alpha_pattern where module ranks differ) —
except `naive` on inputs that share one scaling per module, which keeps their config (so a
federated round continues training with the same r/alpha).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from . import methods as M
from .adapter_io import LoadedAdapter, LoraModule, load_adapter, save_adapter
from .errors import MergeError

METADATA_FORMAT = "lorapool-adapter/1"


@dataclass
class MergeResult:
    """What a merge wrote and measured.

    `weights` are the weights applied (normalised unless asked otherwise), in input order.
    `rank` is the merged config's `r` (the most common module rank); `ranks` gives each
    module's. `diagnostics` holds, for every method, `deviation_from_exact` (‖ΔW − ΔW_exact‖ /
    ‖ΔW_exact‖ over all modules, ΔW_exact = Σ wᵢ·ΔWᵢ) and its `_per_module` map; the SVD methods
    add `relative_error` (what truncation to the target rank dropped, relative to the
    untruncated merge) and `relative_error_per_module`.
    """

    output_dir: Path
    method: str
    weights: list[float]
    rank: int
    ranks: dict[str, int]
    params: dict[str, Any] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)

    @property
    def relative_error(self) -> float | None:
        return self.diagnostics.get("relative_error")


def _check_params(method: str, n: int, target_rank: int | None, density: float | None,
                  majority_sign: str) -> None:
    if method not in M.METHODS:
        raise MergeError(f"method: unknown merge method {method!r}; one of {sorted(M.METHODS)}")
    minimum = 1 if method == "svd" else 2  # svd of one adapter is a rank reduction
    if n < minimum:
        raise MergeError(f"adapters: method {method!r} needs at least {minimum}, got {n}")
    if method in M.DENSITY_METHODS:
        if density is None:
            raise MergeError(f"density: required for method {method!r} (0 < density <= 1)")
        if isinstance(density, bool) or not isinstance(density, (int, float)) \
                or not 0.0 < density <= 1.0:
            raise MergeError(f"density: must be in (0, 1], got {density!r}")
    elif density is not None:
        raise MergeError(f"density: applies only to {list(M.DENSITY_METHODS)}, not {method!r}")
    if majority_sign not in ("total", "frequency"):
        raise MergeError(f"majority_sign: must be 'total' or 'frequency', got {majority_sign!r}")
    if target_rank is not None:
        if method not in ("svd",) + M.DELTA_METHODS:
            raise MergeError(f"target_rank: applies only to 'svd' and the *_svd methods, "
                             f"not {method!r}")
        if isinstance(target_rank, bool) or not isinstance(target_rank, int) or target_rank < 1:
            raise MergeError(f"target_rank: must be a positive integer, got {target_rank!r}")


def _label(a: LoadedAdapter) -> str:
    return str(a.path)


def _check_compatible(loaded: Sequence[LoadedAdapter]) -> None:
    """Same base model (by sha256), same adapted modules and shapes, same extra tensors."""
    first = loaded[0]
    for a in loaded:
        if not a.base_model_sha256:
            raise MergeError(f"{_label(a)}: lorapool.json has no base_model_sha256, so it cannot "
                             "be checked to share a base model with the others")
    for a in loaded[1:]:
        if a.base_model_sha256 != first.base_model_sha256:
            raise MergeError(
                "adapters are for different base models: "
                f"{_label(first)} ({first.base_model}, sha256 {first.base_model_sha256[:12]}…) vs "
                f"{_label(a)} ({a.base_model}, sha256 {a.base_model_sha256[:12]}…)")
        if bool(a.config.get("fan_in_fan_out")) != bool(first.config.get("fan_in_fan_out")):
            raise MergeError(f"{_label(a)}: fan_in_fan_out differs from {_label(first)}")
        names, ref = set(a.modules), set(first.modules)
        if names != ref:
            only_first, only_a = sorted(ref - names), sorted(names - ref)
            parts = []
            if only_first:
                parts.append(f"{_label(first)} adapts {_short(only_first)} which "
                             f"{_label(a)} does not")
            if only_a:
                parts.append(f"{_label(a)} adapts {_short(only_a)} which "
                             f"{_label(first)} does not")
            raise MergeError("incompatible target modules: " + "; ".join(parts))
        for name, m in a.modules.items():
            r = first.modules[name]
            if m.shape != r.shape or m.embedding != r.embedding:
                raise MergeError(f"module {name!r}: {_label(a)} has shape {m.shape} "
                                 f"({'embedding' if m.embedding else 'linear'}) but "
                                 f"{_label(first)} has {r.shape} "
                                 f"({'embedding' if r.embedding else 'linear'})")
        if set(a.extra) != set(first.extra):
            diff = sorted(set(a.extra) ^ set(first.extra))
            raise MergeError(f"non-LoRA tensors (modules_to_save / saved embedding layers) "
                             f"differ between {_label(first)} and {_label(a)}: {_short(diff)}")
        for key, t in a.extra.items():
            if not torch.equal(t, first.extra[key]):
                raise MergeError(f"non-LoRA tensor {key!r} differs between {_label(first)} and "
                                 f"{_label(a)}: full weights cannot be merged as LoRA factors")


def _short(names: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{', …' if len(names) > limit else ''}] ({len(names)})"


def _weights(loaded: Sequence[LoadedAdapter], weights: Sequence[float] | None,
             normalize: bool) -> list[float]:
    if weights is None:
        if not normalize:
            raise MergeError("weights: normalize_weights=False needs explicit weights (raw "
                             "sample counts are not merge coefficients)")
        out = []
        for a in loaded:
            n = a.n_examples
            if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                raise MergeError(f"{_label(a)}: lorapool.json n_examples is {n!r}; the default "
                                 "weights are the training-sample counts, so pass weights=")
            out.append(float(n))
    else:
        out = [float(w) for w in weights]
        if len(out) != len(loaded):
            raise MergeError(f"weights: {len(out)} given for {len(loaded)} adapters")
        bad = [w for w in out if not math.isfinite(w)]
        if bad:
            raise MergeError(f"weights: must be finite numbers, got {bad[0]!r}")
    if normalize:
        total = sum(out)
        if total <= 0:
            raise MergeError(f"weights: their sum must be positive to normalise them, got {total}")
        out = [w / total for w in out]
    return out


def _require_equal_ranks(method: str, name: str, mods: Sequence[LoraModule]) -> None:
    ranks = [m.rank for m in mods]
    if len(set(ranks)) > 1:
        hint = "exact or svd" if method == "naive" else f"exact, svd or {method}_svd"
        raise MergeError(f"method {method!r} needs equal ranks, but module {name!r} has ranks "
                         f"{ranks}; use {hint}")


def _scaling_one_config(first: dict[str, Any], ranks: dict[str, int]) -> tuple[dict[str, Any], int]:
    """A LoRA config whose peft scaling is 1 for every module, with these module ranks."""
    counts = Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], k))
    pattern = {name: k for name, k in sorted(ranks.items()) if k != r}
    cfg = dict(first)
    cfg.update(r=r, lora_alpha=r, use_rslora=False, rank_pattern=pattern,
               alpha_pattern=dict(pattern), inference_mode=True)
    return cfg, r


def _overall(num: dict[str, float], den: dict[str, float]) -> float:
    total = sum(den.values())
    return math.sqrt(sum(num.values()) / total) if total > 0 else 0.0


def _per_module(num: dict[str, float], den: dict[str, float]) -> dict[str, float]:
    return {k: (math.sqrt(num[k] / den[k]) if den[k] > 0 else 0.0) for k in num}


def merge_adapters(adapters: list[str | Path], method: str, *,
                   weights: list[float] | None = None, target_rank: int | None = None,
                   density: float | None = None,
                   majority_sign: Literal["total", "frequency"] = "total", seed: int = 0,
                   normalize_weights: bool = True, output_dir: str | Path) -> MergeResult:
    """Merge the LoRA adapter folders `adapters` with `method` (see `METHODS`) into `output_dir`.

    - `weights`: one per adapter; default each adapter's `n_examples` (FedAvg); normalised to
      sum 1 unless `normalize_weights=False`.
    - `target_rank`: for `svd` and the `*_svd` methods; default the largest input rank.
    - `density`, `majority_sign`: the task-arithmetic family's parameters (peft's `density`,
      `majority_sign_method`); `seed` makes DARE's random drops reproducible.

    Cost: `naive`, `exact`, `svd` and the factor methods never form an out×in matrix; the
    `*_svd` methods do (as peft does) and take a dense SVD per module, which is slow on CPU for
    large models.

    Raises `MergeError` (before writing anything) for bad parameters, unreadable or unsupported
    adapters, different base models (by sha256) or incompatible target modules. `output_dir`
    must not exist or be empty; it is written all at once.
    """
    paths = [Path(p) for p in adapters]
    _check_params(method, len(paths), target_rank, density, majority_sign)
    resolved = [p.resolve() for p in paths]
    dupes = sorted({str(p) for p in resolved if resolved.count(p) > 1})
    if dupes:
        raise MergeError(f"adapters: listed more than once: {dupes}")
    out = Path(output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MergeError(f"output_dir {out} already exists and is not empty")

    loaded = [load_adapter(p) for p in paths]
    _check_compatible(loaded)
    w = _weights(loaded, weights, normalize_weights)
    first = loaded[0]
    names = list(first.modules)  # the first adapter's (= peft's save) order

    svd_like = method == "svd" or method in M.DELTA_METHODS
    rank_cap = target_rank or max(a.max_rank for a in loaded)
    keep_scaling = method == "naive" and all(
        len({a.modules[n].rank for a in loaded}) == 1
        and all(math.isclose(a.modules[n].scaling, first.modules[n].scaling, rel_tol=1e-12)
                for a in loaded)
        for n in names)

    factors: dict[str, tuple[torch.Tensor, torch.Tensor, bool]] = {}
    dev_num: dict[str, float] = {}
    exact_sq: dict[str, float] = {}
    trunc_num: dict[str, float] = {}
    trunc_den: dict[str, float] = {}
    for name in names:
        mods = [a.modules[name] for a in loaded]
        exact = M.exact_factors(mods, w)
        if method == "naive":
            _require_equal_ranks(method, name, mods)
            A, B = M.naive_factors(mods, w, keep_scaling=keep_scaling)
            effective = (A, B * mods[0].scaling) if keep_scaling else (A, B)
        elif method == "exact":
            A, B = exact
            effective = exact
        elif method == "svd":
            A, B, S = M.lowrank_svd(*exact, rank_cap)
            trunc_num[name], trunc_den[name] = M.tail_energy(S, A.shape[0])
            effective = (A, B)
        elif method in M.TASK_METHODS:
            _require_equal_ranks(method, name, mods)
            A, B = M.factor_task_arithmetic(method, mods, w, density=density,
                                            majority_sign=majority_sign, seed=seed)
            effective = (A, B)
        else:  # the *_svd methods: combine full updates, then truncate
            delta = M.delta_task_arithmetic(method, mods, w, density=density,
                                            majority_sign=majority_sign, seed=seed)
            A, B, S = M.dense_svd(delta, rank_cap)
            trunc_num[name], trunc_den[name] = M.tail_energy(S, A.shape[0])
            effective = (A, B)
        factors[name] = (A, B, mods[0].embedding)
        exact_sq[name] = M.lowrank_sq_norm(*exact)
        dev_num[name] = M.difference_sq_norm(effective, exact)

    ranks = {name: int(f[0].shape[0]) for name, f in factors.items()}
    if keep_scaling:
        config, r = dict(first.config), int(first.config["r"])
        config["inference_mode"] = True
    else:
        config, r = _scaling_one_config(first.config, ranks)

    diagnostics: dict[str, Any] = {
        "deviation_from_exact": _overall(dev_num, exact_sq),
        "deviation_from_exact_per_module": _per_module(dev_num, exact_sq),
    }
    if svd_like:
        diagnostics["relative_error"] = _overall(trunc_num, trunc_den)
        diagnostics["relative_error_per_module"] = _per_module(trunc_num, trunc_den)
    params: dict[str, Any] = {"normalize_weights": normalize_weights}
    if svd_like:
        params["target_rank"] = rank_cap
    if method in M.DENSITY_METHODS:
        params["density"] = density
    if method in M.SIGN_METHODS:
        params["majority_sign"] = majority_sign
    if method in M.RANDOM_METHODS:
        params["seed"] = seed

    counts = [a.n_examples for a in loaded]
    known = all(isinstance(n, int) and not isinstance(n, bool) for n in counts)
    metadata = {
        "format": METADATA_FORMAT,
        "base_model": first.base_model,
        "base_model_sha256": first.base_model_sha256,
        "n_examples": sum(counts) if known else None,
        "spec": None,
        "metrics": {},
        "job_id": None,
        "merge": {
            "method": method,
            "params": params,
            "weights": w,
            "inputs": [{"path": str(a.path.resolve()), "job_id": a.metadata.get("job_id"),
                        "base_model": a.base_model, "n_examples": a.n_examples, "weight": wi,
                        "adapter_sha256": a.weights_sha256, "r": a.max_rank}
                       for a, wi in zip(loaded, w)],
            "rank": r,
            "diagnostics": diagnostics,
            "versions": _versions(),
        },
        "created_at": int(time.time()),
    }
    save_adapter(out, config=config, modules=factors, metadata=metadata, extra=first.extra,
                 key_prefix=first.key_prefix)
    return MergeResult(output_dir=out, method=method, weights=w, rank=r, ranks=ranks,
                       params=params, diagnostics=diagnostics)


def _versions() -> dict[str, str]:
    import peft

    return {"peft": peft.__version__, "torch": torch.__version__}
