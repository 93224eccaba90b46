"""The trainer's side of the fast path: resolve the plan, and call tfast's hooks when they exist.

The fast pieces themselves (fused QLoRA linear, activation offload, Liger kernels, padding-free
attention) live in the package `service/train/fast/`, which is imported lazily: where it is
missing (not built yet, or a slim install) the fallback plan below is used, in which only
`chunked_loss` (implemented in loss.py) follows its switch and every other piece is off with the
reason "fast path not built". On the CPU, "auto" means off for every piece but chunked_loss.

    plan = resolve_plan(spec, device)            # FastPlan (frozen), recorded in events + lorapool.json
    kwargs = prepare_kwargs(plan, spec)          # extra from_pretrained kwargs (attention impl)
    apply(model, plan, spec, device)             # after peft wrapped the model
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from .spec import FAST_PIECES, TrainSpec

log = logging.getLogger(__name__)

NOT_BUILT = "fast path not built"


@dataclass(frozen=True)
class FastPlan:
    """Which fast pieces run (the fallback twin of service/train/fast's FastPlan)."""

    fused_lora: bool = False
    offload_activations: bool = False
    kernels: bool = False
    padding_free: bool = False
    chunked_loss: bool = False
    host_embeddings: bool = False
    grouped_lora: bool = False
    reasons: dict[str, str] = field(default_factory=dict)  # piece -> why it is off (or "on")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fast_module():
    """service/train/fast, or None when it is not there."""
    try:
        from . import fast
    except ImportError as exc:
        if getattr(exc, "name", None) not in (f"{__package__}.fast", None):
            # The package exists but something it needs does not: say so, then fall back.
            log.warning("service/train/fast failed to import (%s); using the reference path", exc)
        return None
    return fast


def _fallback_plan(spec: TrainSpec) -> FastPlan:
    switches = spec.fast_spec()
    chunked = switches.chunked_loss != "off"
    reasons = {name: NOT_BUILT for name in FAST_PIECES}
    reasons["chunked_loss"] = "on" if chunked else "off in the spec"
    return FastPlan(chunked_loss=chunked, reasons=reasons)


def resolve_plan(spec: TrainSpec, device: torch.device) -> Any:
    """The FastPlan for `spec` on `device` (tfast's `resolve_fast`, or the fallback)."""
    fast = _fast_module()
    if fast is None or not hasattr(fast, "resolve_fast"):
        return _fallback_plan(spec)
    return fast.resolve_fast(spec, device)


def without(plan: Any, reasons: dict[str, str]) -> Any:
    """`plan` with the named pieces turned off, each with its reason (plans are frozen)."""
    if not any(getattr(plan, name) for name in reasons):
        return plan
    merged = {**plan.reasons, **{k: v for k, v in reasons.items() if getattr(plan, k)}}
    return replace(plan, **{k: False for k in reasons}, reasons=merged)


def prepare_kwargs(plan: Any, spec: TrainSpec) -> dict[str, Any]:
    """Extra `from_pretrained` kwargs the plan needs (none without the fast package)."""
    fast = _fast_module()
    if fast is None or not hasattr(fast, "prepare_for_fast"):
        return {}
    return dict(fast.prepare_for_fast(plan, spec) or {})


def apply(model: Any, plan: Any, spec: TrainSpec, device: torch.device) -> None:
    """Swap the plan's pieces into `model` (a no-op when none is on or nothing is built)."""
    if not any(getattr(plan, name) for name in FAST_PIECES if name != "chunked_loss"):
        return
    fast = _fast_module()
    if fast is not None and hasattr(fast, "apply_fast_path"):
        fast.apply_fast_path(model, plan, spec, device)


def describe(plan: Any) -> str:
    """"fast path: fused_lora on, offload_activations off (cpu), ..." for the status event."""
    parts = []
    for name in FAST_PIECES:
        on = bool(getattr(plan, name))
        why = plan.reasons.get(name, "")
        parts.append(f"{name} {'on' if on else 'off'}" + (f" ({why})" if why and why != "on" else ""))
    return "fast path: " + ", ".join(parts)
