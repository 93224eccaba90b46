"""A model too big for one card of a machine, split layer-wise over several of its devices.

One worker holds several local GPUs; the decoder layers are cut into contiguous ranges, one per
device (`SplitSpec`, sized by each device's memory through memory_split.py unless the ranges
are given). The pieces around the layers follow the fast path's rules (model.py,
fastpath.py): the input embedding is read into host memory where the plan keeps it there
(else it sits on the first device), the final norm, output head and loss are on the last
device (or the head streams from host memory where the split plan chose `host_head`); a table
tied to the head lives with the head.

    split = resolve_split(split_spec, spec, plan)   # ResolvedSplit: devices, ranges, why
    device_map = split_device_map(folder, spec, split, input_embedding=..., head=...)
    model = load_base_model(..., device_map=device_map)   # model.py: loads and checks it
    install_split_hooks(model, split)                     # hidden states cross at boundaries

The hooks are this module's own, not accelerate's (its hooks are removed after the load, as
for the host-embedding load): each decoder layer (and the final norm) moves the tensors it is
called with to its device before it runs, outside the layer's activation checkpoint (so the
checkpoint saves, offloads and recomputes its input on the layer's own device, and the RNG it
restores for dropout is that device's), and makes its device the current CUDA device while it
runs (Triton kernels launch on the current device). Tensors that need no gradient and are
handed to every layer (RoPE's cos/sin, position ids, a mask) are moved once per device per
forward. Gradients cross back through autograd's own copies.

What cannot work across devices is switched off with a reason by build_model: CUDA graphs (a
graph replays one device's stream).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .errors import ModelLoadError
from .spec import DeviceInfo, SplitSpec, TrainSpec

log = logging.getLogger(__name__)

GRAPHS_OFF = "a CUDA graph replays one device's stream; this run is split over {n} devices"


@dataclass(frozen=True)
class ResolvedSplit:
    """The split a run uses: its devices, each one's [start, end) decoder layers, whether the
    head streams from host memory (None: as the fast plan has it), predicted peaks, and why."""

    devices: tuple[torch.device, ...]
    layers: tuple[tuple[int, int], ...]
    host_head: Optional[bool] = None
    peaks: Optional[tuple[int, ...]] = None
    reason: str = ""

    @property
    def first(self) -> torch.device:
        return self.devices[0]

    @property
    def last(self) -> torch.device:
        return self.devices[-1]

    def device_of_layer(self, index: int) -> torch.device:
        for dev, (start, end) in zip(self.devices, self.layers):
            if start <= index < end:
                return dev
        raise IndexError(f"decoder layer {index} is in no range of {self.layers}")

    def as_dict(self) -> dict[str, Any]:
        """Plain data for events and lorapool.json."""
        return {"devices": [str(d) for d in self.devices],
                "layers": [list(r) for r in self.layers],
                "host_head": self.host_head,
                "predicted_peaks": list(self.peaks) if self.peaks is not None else None,
                "reason": self.reason}

    def describe(self) -> str:
        parts = []
        for j, (dev, (s, e)) in enumerate(zip(self.devices, self.layers)):
            peak = f", {self.peaks[j] / 2**30:.2f} GiB predicted" if self.peaks else ""
            parts.append(f"layers {s}-{e - 1} on {dev}{peak}")
        return f"model split over {len(self.devices)} devices: " + "; ".join(parts)


def _num_layers(spec: TrainSpec) -> int:
    from .memory import model_shape

    return model_shape(spec).num_layers


def _card_info(device: torch.device, budget: Optional[int]) -> DeviceInfo:
    """This CUDA card as the estimate sees it, its free memory being the room a run has there
    (fastpath's rule: free + what this process holds + its context), within `budget`."""
    from .fastpath import _card

    info, room = _card(device)
    if budget is not None:
        room = min(room, budget)
    return info.model_copy(update={"free_memory": room})


def resolve_split(split: SplitSpec, spec: TrainSpec, *,
                  num_layers: Optional[int] = None) -> ResolvedSplit:
    """The ranges for `split`: as given, else sized by each CUDA device's room (memory_split.py,
    head on the last card before the head in host memory), else (CPU devices: no GPU memory to
    size by) as even as the layer count allows. Raises ModelLoadError where the layers given
    do not add up, or the devices do not hold the model."""
    from .memory_split import head_variants, ranges, split_over

    devices = tuple(torch.device(d) for d in split.devices)
    L = num_layers if num_layers is not None else _num_layers(spec)
    if len(devices) > L:
        raise ModelLoadError(f"cannot split {L} decoder layers over {len(devices)} devices",
                             code="split_invalid")
    if split.layers is not None:
        if sum(split.layers) != L:
            raise ModelLoadError(f"split.layers {split.layers} add up to {sum(split.layers)}; "
                                 f"the model has {L} decoder layers", code="split_invalid")
        if not all(d.type == "cuda" for d in devices):
            return ResolvedSplit(devices, ranges(split.layers), reason="layer ranges as given")
        return _given_on_cards(split, spec, devices, L)
    if all(d.type == "cuda" for d in devices):
        budgets = split.budgets or [None] * len(devices)
        infos = [_card_info(d, b) for d, b in zip(devices, budgets)]
        order = list(range(len(devices)))
        for host_head in head_variants(spec, infos[-1]):
            plan = split_over(spec, infos, order, host_head=host_head)
            if plan is not None:
                return ResolvedSplit(devices, plan.layers, host_head=plan.host_head,
                                     peaks=plan.peaks,
                                     reason="layer ranges sized by each card's free memory")
        rooms = ", ".join(f"{d}: {i.free_memory / 2**30:.2f} GiB" for d, i in zip(devices, infos))
        raise ModelLoadError(f"the model does not fit split over {len(devices)} cards ({rooms})",
                             code="split_does_not_fit")
    counts = [L // len(devices) + (1 if j < L % len(devices) else 0)
              for j in range(len(devices))]
    return ResolvedSplit(devices, ranges(counts),
                         reason="even layer ranges (no GPU memory to size them by)")


def _given_on_cards(split: SplitSpec, spec: TrainSpec, devices: tuple[torch.device, ...],
                    L: int) -> ResolvedSplit:
    """Ranges given for CUDA cards (the scheduler's split, service/pool/multi_gpu.py): the
    output head stays on the last card where every card holds its part with it there (within
    its budget), as the scheduler's estimate chose; else it streams from host memory."""
    from .memory_split import head_variants, part_estimate, ranges

    budgets = split.budgets or [None] * len(devices)
    infos = [_card_info(d, b) for d, b in zip(devices, budgets)]
    k = len(devices)
    variants = head_variants(spec, infos[-1])
    for host_head in variants:
        parts = [part_estimate(spec, info, layers=n, num_layers=L, first=j == 0,
                               last=j == k - 1, host_head=host_head)
                 for j, (info, n) in enumerate(zip(infos, split.layers))]
        if all(p.total <= info.free_memory for p, info in zip(parts, infos)):
            return ResolvedSplit(devices, ranges(split.layers), host_head=host_head,
                                 peaks=tuple(p.total for p in parts),
                                 reason="layer ranges as the scheduler planned them")
    return ResolvedSplit(devices, ranges(split.layers), host_head=variants[-1],
                         reason="layer ranges as given; the estimate finds them tight on "
                                "these cards (the out-of-memory fallback is the last word)")


# -- the device map --------------------------------------------------------------------------


def _map_value(device: torch.device | str) -> Any:
    """accelerate's spelling of a device in a device map: a CUDA index, or "cpu"."""
    device = torch.device(device)
    return device.index if device.type == "cuda" else device.type


def map_for_model(model: torch.nn.Module, split: ResolvedSplit, *,
                  input_embedding: torch.device | str,
                  head: torch.device | str) -> Optional[dict[str, Any]]:
    """The device map of `split` for `model` (weightless is enough): every decoder layer to its
    range's device, the input embedding to `input_embedding`, the output head to `head`; the
    decoder's other children by their place: those registered after the layer list that hold
    parameters (the final norm) to the last device, the rest (RoPE's buffers, which compute on
    the embeddings' output) to the first. None where a module on the way to the layers holds
    weights of its own (it could only be mapped with its whole subtree)."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    stack = getattr(decoder, "layers", None)
    if not isinstance(stack, torch.nn.ModuleList):
        return None
    names = {id(m): n for n, m in model.named_modules()}
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    stack_name = names[id(stack)]
    first, last = _map_value(split.first), _map_value(split.last)
    device_map: dict[str, Any] = {}
    module, prefix = model, ""
    while True:
        if next(module.parameters(recurse=False), None) is not None or \
                next(module.buffers(recurse=False), None) is not None:
            return None
        step = None
        after_stack = False
        for child_name, child in module.named_children():
            name = prefix + child_name
            if child is stack:
                for i in range(len(stack)):
                    device_map[f"{name}.{i}"] = _map_value(split.device_of_layer(i))
                after_stack = True
            elif child is emb:
                device_map[name] = _map_value(input_embedding)
            elif out is not None and child is out:
                device_map[name] = _map_value(head)
            elif stack_name.startswith(name + "."):
                step = (child, name + ".")
            else:
                has_params = next(child.parameters(), None) is not None
                device_map[name] = last if (after_stack and has_params) else first
        if step is None:
            return device_map
        module, prefix = step


def split_device_map(folder: str | Path, spec: TrainSpec, split: ResolvedSplit, *,
                     input_embedding: torch.device | str,
                     head: torch.device | str) -> dict[str, Any]:
    """`map_for_model` on a weightless copy of the model in `folder` (nothing is loaded).
    A tied table follows the head. Raises ModelLoadError where no map can be made."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True,
                                            trust_remote_code=spec.trust_remote_code)
        with init_empty_weights():
            empty = AutoModelForCausalLM.from_config(
                config, trust_remote_code=spec.trust_remote_code)
        if getattr(empty.config, "tie_word_embeddings", False):
            empty.tie_weights()
    except Exception as exc:  # noqa: BLE001 - an odd config cannot be split
        raise ModelLoadError(f"cannot read the model in {folder} to split it: {exc}",
                             code="split_unsupported") from exc
    if tied_tables(empty):
        input_embedding = head
    device_map = map_for_model(empty, split, input_embedding=input_embedding, head=head)
    if device_map is None:
        raise ModelLoadError(f"cannot split {type(empty).__name__} layer-wise: no decoder "
                             "layer list, or weights outside it on the way there",
                             code="split_unsupported")
    return device_map


def tied_tables(model: torch.nn.Module) -> bool:
    """Whether the input embedding and the output head share one table."""
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return bool(getattr(text, "tie_word_embeddings", False)) or (
        out is not None and getattr(out, "weight", None) is getattr(emb, "weight", None))


def check_placement(model: torch.nn.Module, device_map: dict[str, Any]) -> None:
    """Raise RuntimeError where a weight is not on the device `device_map` gave its module
    (longest matching prefix), or is left on the meta device."""
    keys = sorted(device_map, key=len, reverse=True)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.device.type == "meta":
            raise RuntimeError(f"weight {name} left on the meta device")
        key = next((k for k in keys if name == k or name.startswith(k + ".")), None)
        if key is None:
            continue
        want = torch.device("cuda", device_map[key]) if isinstance(device_map[key], int) \
            else torch.device(device_map[key])
        if t.device.type != want.type or (want.index is not None and t.device.index != want.index):
            raise RuntimeError(f"{name} is on {t.device}, the split map put {key} on {want}")


# -- moving hidden states at layer boundaries -----------------------------------------------


class _Mover:
    """Moves the tensors of a call to a device. A tensor that needs no gradient is moved once
    per device (its copy is kept while the original lives: every layer of a forward gets the
    same RoPE cos/sin, position ids and mask), which also keeps the padding-free attention's
    per-tensor caches hitting; one that needs a gradient is moved every time, through
    autograd."""

    def __init__(self) -> None:
        self._memo: dict[tuple[int, torch.device], tuple[weakref.ref, torch.Tensor]] = {}

    def __call__(self, value: Any, device: torch.device) -> Any:
        if isinstance(value, torch.Tensor):
            if value.device == device:
                return value
            if value.requires_grad:
                return value.to(device)
            key = (id(value), device)
            hit = self._memo.get(key)
            if hit is not None and hit[0]() is value:
                return hit[1]
            moved = value.to(device)
            memo = self._memo
            memo[key] = (weakref.ref(value, lambda _ref, k=key: memo.pop(k, None)), moved)
            return moved
        if isinstance(value, tuple) and not hasattr(value, "_fields"):
            return tuple(self(v, device) for v in value)
        if isinstance(value, list):
            return [self(v, device) for v in value]
        if isinstance(value, dict):
            return {k: self(v, device) for k, v in value.items()}
        return value


class _OnDevice:
    """A module's forward pre-hook and hook: inputs to `device`, and `device` the current CUDA
    device while the module runs (restored after, also when it raises)."""

    def __init__(self, device: torch.device, mover: _Mover) -> None:
        self.device = device
        self.mover = mover
        self._previous: list[int] = []

    def pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self.device.type == "cuda":
            self._previous.append(torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        return self.mover(args, self.device), self.mover(kwargs, self.device)

    def post(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        if self.device.type == "cuda" and self._previous:
            torch.cuda.set_device(self._previous.pop())


def _causal_lm(model: Any) -> Any:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def install_split_hooks(model: Any, split: ResolvedSplit) -> int:
    """Put `split`'s boundary hooks on `model` (a peft model or the transformers one): every
    decoder layer and every module mapped after the layers (the final norm) runs on its own
    device with its inputs moved there; an input embedding that is not on the first device (a
    table tied to the head) hands its output to it. Returns the number of hooked modules."""
    lm = _causal_lm(model)
    decoder = lm.get_decoder()
    mover = _Mover()
    handles = []

    def hook(module: torch.nn.Module, device: torch.device) -> None:
        on = _OnDevice(device, mover)
        handles.append(module.register_forward_pre_hook(on.pre, with_kwargs=True))
        handles.append(module.register_forward_hook(on.post, always_call=True))

    for i, layer in enumerate(decoder.layers):
        hook(layer, split.device_of_layer(i))
    after = False
    for child in decoder.children():
        if child is decoder.layers:
            after = True
        elif after and next(child.parameters(), None) is not None:
            hook(child, split.last)
    emb = lm.get_input_embeddings()
    weight = getattr(emb, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.device.type != "cpu" and \
            weight.device != split.first:
        first = split.first
        handles.append(emb.register_forward_hook(
            lambda _m, _a, out: out.to(first) if isinstance(out, torch.Tensor) else out))
    lm._lorapool_split_hooks = handles  # kept with the model, for removal and for tests
    return len(handles)


def split_peaks(devices: Sequence[torch.device]) -> list[Optional[int]]:
    """Peak allocated bytes per device of a split run (None off CUDA), for its metrics."""
    return [int(torch.cuda.max_memory_allocated(d)) if d.type == "cuda" else None
            for d in devices]


__all__ = ["GRAPHS_OFF", "ResolvedSplit", "check_placement", "install_split_hooks",
           "map_for_model", "resolve_split", "split_device_map", "split_peaks", "tied_tables"]
