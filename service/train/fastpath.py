"""The trainer's door to the fast path (service/train/fast): resolve, adjust, apply, describe.

model.py and loop.py call these instead of `service/train/fast` directly, so that a fast
package that fails to import (a dependency of it missing or broken) costs a logged warning and
the reference path, not the run: the plan is then the not-built plan, in which only
`chunked_loss` (implemented in loss.py) follows its switch and every other piece is off with
the reason "fast path not built". The plan type is `spec.FastPlan` either way.

    plan = resolve_plan(spec, device)            # FastPlan (frozen), recorded in events + lorapool.json
    plan = without(plan, {"piece": "why"})       # a piece the caller cannot use, turned off
    plan = fit_memory(plan, spec, device, budget)  # host_head / cuda_graphs as the memory allows
    where = load_placement(plan, spec, device, budget)  # "host", "tables_on_host",
    keep_tables_on_host(model, plan, device)     #   "head_on_host", "input_embedding_on_host"
                                                 #   or "device"; tables read into host
                                                 #   memory stay there
    kwargs = prepare_kwargs(plan, spec)          # extra from_pretrained kwargs (attention impl)
    apply(model, plan, spec, device)             # after peft wrapped the model
    graphed_steps(model, plan, params, device, max_tokens=...)  # the CUDA graphs, or None
    flat = flat_params(plan, params)             # the packed tensors the optimizer steps, or None
    describe(plan)                               # the "status" event's one-line summary
"""

from __future__ import annotations

import logging
from dataclasses import replace
from types import ModuleType
from typing import Any, Optional

import torch

from .spec import FAST_PIECES, DeviceInfo, FastPlan, MemoryBudget, TrainSpec

log = logging.getLogger(__name__)

NOT_BUILT = "fast path not built"


def _fast_module() -> Optional[ModuleType]:
    """service/train/fast, or None (with a warning) when it cannot be imported."""
    try:
        from . import fast
    except ImportError as exc:
        log.warning("service/train/fast failed to import (%s); using the reference path", exc)
        return None
    return fast


def _not_built_plan(spec: TrainSpec) -> FastPlan:
    chunked = spec.fast_spec().chunked_loss != "off"
    reasons = {name: NOT_BUILT for name in FAST_PIECES}
    reasons["chunked_loss"] = "on" if chunked else "off in the spec"
    return FastPlan(chunked_loss=chunked, reasons=reasons)


def resolve_plan(spec: TrainSpec, device: torch.device) -> FastPlan:
    """The FastPlan for `spec` on `device` (`fast.resolve_fast`, or the not-built plan)."""
    fast = _fast_module()
    if fast is None:
        return _not_built_plan(spec)
    return fast.resolve_fast(spec, device)


def without(plan: FastPlan, reasons: dict[str, str]) -> FastPlan:
    """`plan` with the named pieces turned off, each with its reason (plans are frozen)."""
    if not any(getattr(plan, name) for name in reasons):
        return plan
    merged = {**plan.reasons, **{k: v for k, v in reasons.items() if getattr(plan, k)}}
    return replace(plan, **{k: False for k in reasons}, reasons=merged)


def prepare_kwargs(plan: FastPlan, spec: TrainSpec) -> dict[str, Any]:
    """Extra `from_pretrained` kwargs the plan needs (none without the fast package)."""
    fast = _fast_module()
    if fast is None:
        return {}
    return dict(fast.prepare_for_fast(plan, spec) or {})


def apply(model: Any, plan: FastPlan, spec: TrainSpec, device: torch.device) -> None:
    """Swap the plan's pieces into `model` (a no-op when none but chunked_loss is on: the loss
    is chosen by the trainer, not plugged into the model)."""
    if not any(getattr(plan, name) for name in FAST_PIECES if name != "chunked_loss"):
        return
    fast = _fast_module()
    if fast is not None:
        fast.apply_fast_path(model, plan, spec, device)


def keep_tables_on_host(model: Any, plan: FastPlan, device: torch.device) -> str:
    """For a model whose tables were loaded into host memory (`load_placement`): make its frozen
    tables that are there host modules, so that no later move takes them to `device`
    (fast/host_head.py)."""
    fast = _fast_module()
    if fast is None or not (plan.host_head or plan.host_embeddings):
        return ""
    from .fast.host_head import keep_tables_on_host as keep

    return keep(model, device)


def graphed_steps(model: Any, plan: FastPlan, params: list, device: torch.device, *,
                  max_tokens: int) -> Any:
    """The run's CUDA-graph runner (fast/graphs.py `GraphedSteps`), or None when the plan has
    cuda_graphs off or the fast package is not built."""
    if not plan.cuda_graphs or _fast_module() is None:
        return None
    from .fast.graphs import GraphedSteps

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return GraphedSteps(model, params, device, max_tokens=max_tokens,
                        hidden_size=int(lm.config.hidden_size))


def flat_params(plan: FastPlan, params: list) -> Any:
    """`params` packed into one buffer per dtype (fast/flat_params.py `FlatParams`: its
    `.params` go to the optimizer), or None when the plan has flat_optimizer off or the fast
    package is not built. Call it before anything else holds the tensors' storage or grads."""
    if not plan.flat_optimizer or _fast_module() is None or not params:
        return None
    from .fast.flat_params import FlatParams

    return FlatParams(params)


def fit_memory(plan: FastPlan, spec: TrainSpec, device: torch.device,
               budget: Optional[MemoryBudget] = None) -> FastPlan:
    """`plan` with `host_head` and `cuda_graphs` kept only where the memory says so: the
    richest configuration of memory.py's `fast_variants` that this card holds, and no more
    than the scheduler's reservation (`budget`) when there is one: the head on the GPU with
    graphs, else without them, else the head in host memory. The placement estimate makes the
    same choice for the node it picked, so the job keeps within what was reserved for it.

    Called before the weights load: the room is what is free plus what this process already
    holds (and its CUDA context, which the estimate counts)."""
    if device.type != "cuda" or not (plan.cuda_graphs or plan.host_head):
        return plan
    info, room = _card(device)
    return decide_memory(plan, spec, info, room, budget)


def _card(device: torch.device) -> tuple[DeviceInfo, int]:
    """This CUDA card as the estimate sees it, and its room: what is free plus what this
    process already holds, and its CUDA context (which the estimate counts)."""
    from .memory import cuda_context_bytes

    free, total = torch.cuda.mem_get_info(device)
    props = torch.cuda.get_device_properties(device)
    info = DeviceInfo(kind="cuda", name=props.name, total_memory=total,
                      compute_capability=(props.major, props.minor))
    return info, free + torch.cuda.memory_reserved(device) + cuda_context_bytes(info)


def load_placement(plan: FastPlan, spec: TrainSpec, device: torch.device,
                   budget: Optional[MemoryBudget] = None) -> str:
    """Where model.py's `load_base_model` puts the weights as they arrive: "host" (loaded on the
    CPU, only what stays moves to the card) where the output head goes to the host and loading
    straight onto the card would not fit the room `fit_memory` decided by; else, where the plan
    keeps the input table in host memory, "tables_on_host" (the head too, when it goes there)
    or "input_embedding_on_host" (the loader falls back to "device" for a table tied to a head
    on the card); where it keeps only the head there, "head_on_host"; else "device"."""
    if device.type != "cuda" or _fast_module() is None:
        return "device"
    info, room = _card(device) if plan.host_head else (None, 0)
    return placement_decision(plan, spec, info, room, budget)


def placement_decision(plan: FastPlan, spec: TrainSpec, info: Optional[DeviceInfo], room: int,
                       budget: Optional[MemoryBudget] = None) -> str:
    """`load_placement`'s decision for a CUDA card described by `info` with `room` bytes (both
    read only where the plan sends the head to the host)."""
    if plan.host_head and info is not None and load_decision(spec, info, room, budget):
        return "host"
    if not plan.host_embeddings:
        return "head_on_host" if plan.host_head else "device"
    return "tables_on_host" if plan.host_head else "input_embedding_on_host"


def _within(info: DeviceInfo, room: int,
            budget: Optional[MemoryBudget]) -> tuple[DeviceInfo, int]:
    """The card and room a decision works with: no more than the scheduler's reservation, and
    its context, so the trainer uses the same numbers the scheduler reserved by."""
    if budget is None:
        return info, room
    return (info.model_copy(update={"context_bytes": budget.context_bytes}),
            min(room, budget.total))


def load_decision(spec: TrainSpec, info: DeviceInfo, room: int,
                  budget: Optional[MemoryBudget] = None) -> bool:
    """Whether a straight load (every table on the card for a moment) would not fit a card
    described by `info` with `room` bytes: `load_placement`'s "host" decision."""
    from .memory import straight_load_bytes

    info, room = _within(info, room, budget)
    try:
        return straight_load_bytes(spec, info) > room
    except Exception as exc:  # noqa: BLE001 - no estimate: the load that always fits
        log.warning("no load estimate (%s); loading on the CPU", exc)
        return True


def decide_memory(plan: FastPlan, spec: TrainSpec, info: DeviceInfo, room: int,
                  budget: Optional[MemoryBudget] = None) -> FastPlan:
    """`fit_memory`'s decision for a card described by `info` with `room` bytes."""
    from .memory import fit_to_room

    info, room = _within(info, room, budget)
    where = "the memory reserved for this job" if budget is not None and room == budget.total \
        else "the card"
    try:
        chosen = fit_to_room(spec, info, room)
    except Exception as exc:  # noqa: BLE001 - no estimate (odd config): graphs as planned
        log.warning("no memory estimate for the host-head / CUDA-graphs decision (%s)", exc)
        return without(plan, {"host_head": f"off: no memory estimate ({exc})"[:200]}) \
            if spec.fast_spec().host_head != "on" else plan
    numbers = f"{chosen.gib():.2f} GiB in {where}'s {room / 2**30:.2f} GiB"
    off: dict[str, str] = {}
    if plan.host_head and not chosen.host_head:
        off["host_head"] = f"off (auto): the head fits on the GPU ({numbers})"
    if plan.cuda_graphs and not chosen.graphs:
        off["cuda_graphs"] = ("off: the output head streams from host memory"
                              if chosen.host_head else
                              f"no room for the graphs' pool in {where} ({numbers} without it)")
    plan = without(plan, off)
    if plan.host_head and spec.fast_spec().host_head == "auto":
        plan = replace(plan, reasons={**plan.reasons, "host_head": (
            f"on (auto): the job fits {where} only with its output head in host memory "
            f"({numbers})")})
    return plan


def describe(plan: FastPlan) -> str:
    """"fast path: fused_lora on, offload_activations off (cpu), ..." for the status event."""
    parts = []
    for name in FAST_PIECES:
        on = bool(getattr(plan, name))
        why = plan.reasons.get(name, "")
        parts.append(f"{name} {'on' if on else 'off'}" + (f" ({why})" if why and why != "on" else ""))
    return "fast path: " + ", ".join(parts)
