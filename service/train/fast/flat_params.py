"""The trainable parameters packed into one buffer, so the optimizer makes one call per step.

bitsandbytes' 8-bit AdamW steps one parameter at a time: a Python call, a kernel and a full
device synchronisation each (`sync_gpu` after every tensor). A LoRA on all seven projections
has 224 tensors on a 1B Llama and 448 on an 8B one; profiled on an H100, the 1B optimizer step
spanned 22.5 ms for ~1 ms of kernels, the card idle in between (bench/results/
h100-2026-12-07c/; the profiler inflates host time, and unprofiled the card idled at most
~14 ms of a 206 ms step at micro-batch 4, this among it).

`FlatParams` copies every trainable tensor into one contiguous buffer per (device, dtype) and
makes each parameter's `.data` and `.grad` views of that buffer and of a gradient buffer beside
it. The parameters keep their identity (peft's modules, the CUDA graphs and the checkpoint
hold them); autograd accumulates into the views in place; the optimizer is given only the flat
parameters (`params`). Each tensor starts at a multiple of 256 elements, bitsandbytes' block
size for 8-bit optimizer state, and the padding after it gets zero gradients, so its moments
stay at the code of 0.0 and never set a block's scale: every block of the flat state
quantises what that tensor's own state would, and the flat step is the per-tensor step, bit
for bit (tests/train/test_fast_flat_params.py, on the CPU), for tensors of at least 4,096
elements. bitsandbytes keeps 32-bit state for smaller ones; packed, they get 8-bit state. (A
run resumed from a per-tensor checkpoint in which every tensor of a buffer had 32-bit state,
a model that small, keeps 32-bit state for the buffer.) No view reads the padding.

`paged_adamw_8bit` pages the one flat state buffer (bitsandbytes pages buffers of 1e5
elements and more; per tensor, the smaller LoRA matrices were not paged).

The gradients live as long as the run, which the memory estimate already assumes
(memory.py's `lora_grads`), so zeroing is in place (`zero_grad`): the optimizer's own
`zero_grad(set_to_none=True)` would cut the views loose.

Checkpoints keep the per-tensor layout that the optimizer would have unpacked
(`unpack_state`, `pack_state`), so a checkpoint does not depend on this packing: one written
before it, or by an optimizer over the tensors themselves, loads, and the other way round.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

BLOCK = 256  # bitsandbytes' block size for 8-bit optimizer state (absmax per block)
_BLOCK_KEYS = ("absmax1", "absmax2")  # per-block tensors of bitsandbytes' state
_WRAPPED = "__bnb_optimizer_quant_state__"  # where bitsandbytes nests its quantisation state


def _padded(numel: int) -> int:
    return -(-numel // BLOCK) * BLOCK


class _Pack:
    """One flat buffer: the tensors of one (device, dtype), their offsets, and the gradient.
    `indices` are the tensors' places in the whole list (checkpoints number them so)."""

    def __init__(self, params: list[torch.nn.Parameter], indices: list[int]) -> None:
        self.members = params
        self.indices = indices
        self.offsets: list[int] = []
        total = 0
        for p in params:
            self.offsets.append(total)
            total += _padded(p.numel())
        first = params[0]
        data = torch.zeros(total, dtype=first.dtype, device=first.device)
        grad = torch.zeros_like(data)
        with torch.no_grad():
            for p, off in zip(params, self.offsets):
                n = p.numel()
                data[off:off + n].copy_(p.detach().reshape(-1))
                if p.grad is not None:
                    grad[off:off + n].copy_(p.grad.reshape(-1))
        self.flat = torch.nn.Parameter(data, requires_grad=True)
        self.flat.grad = grad
        self.seat()

    def view(self, buffer: torch.Tensor, i: int) -> torch.Tensor:
        p, off = self.members[i], self.offsets[i]
        return buffer[off:off + p.numel()].view(p.shape)

    def seat(self) -> None:
        """Make every member's data and grad the views of the flat buffers."""
        for i, p in enumerate(self.members):
            p.data = self.view(self.flat.data, i)
            p.grad = self.view(self.flat.grad, i)


class FlatParams:
    """`params` packed per (device, dtype) in first-seen order; `params` here are the flat ones
    to hand the optimizer, `members` the tensors themselves."""

    def __init__(self, params: Sequence[torch.nn.Parameter]) -> None:
        self.members = [p for p in params if p.requires_grad]
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(self.members):
            groups.setdefault((p.device, p.dtype), []).append(i)
        self.packs = [_Pack([self.members[i] for i in indices], indices)
                      for indices in groups.values()]
        self.params = [pack.flat for pack in self.packs]

    @torch.no_grad()
    def zero_grad(self) -> None:
        """Zero every gradient in place, one fill per buffer."""
        for pack in self.packs:
            pack.flat.grad.zero_()

    def intact(self) -> bool:
        """Whether every member still reads and writes the flat buffers (nothing replaced a
        member's `.data` or `.grad` since packing)."""
        for pack in self.packs:
            for i, p in enumerate(pack.members):
                data, grad = pack.view(pack.flat.data, i), pack.view(pack.flat.grad, i)
                if p.data_ptr() != data.data_ptr() or p.grad is None \
                        or p.grad.data_ptr() != grad.data_ptr():
                    return False
        return True

    # -- checkpoints: the per-tensor layout --------------------------------------------------------

    def unpack_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """The state dict `state` of an optimizer over `params` (one param group, as the
        trainer builds it) as the same optimizer over `members` would have written it: one
        entry per tensor, sliced out of the flat state, numbered in `members` order. Its tensors
        are views of the optimizer's live state: write them out, do not keep them."""
        (group,) = state["param_groups"]
        per_tensor: dict[int, Any] = {}
        for pack, flat_id in zip(self.packs, group["params"]):
            flat_state = state["state"].get(flat_id)
            if flat_state is None:
                continue  # no step taken yet
            for i, index in enumerate(pack.indices):
                per_tensor[index] = _slice_state(flat_state, pack, i)
        return {"state": dict(sorted(per_tensor.items())),
                "param_groups": [{**group, "params": list(range(len(self.members)))}]}

    def pack_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """The inverse of `unpack_state`: a per-tensor optimizer state dict in one param group
        (written by `unpack_state`, or by the optimizer over the tensors themselves) as the
        state of the optimizer over `params`. Raises ValueError when it does not fit."""
        if len(state["param_groups"]) != 1:
            raise ValueError(f"the optimizer state has {len(state['param_groups'])} parameter "
                             "groups; the trainer writes one")
        (group,) = state["param_groups"]
        ids = list(group["params"])
        if len(ids) != len(self.members):
            raise ValueError(f"the optimizer state has {len(ids)} tensors, this model trains "
                             f"{len(self.members)}")
        flat_states: dict[int, Any] = {}
        for k, pack in enumerate(self.packs):
            entries = [state["state"].get(ids[i]) for i in pack.indices]
            if all(e is None for e in entries):
                continue  # no step taken yet
            if any(e is None for e in entries):
                raise ValueError("the optimizer state has moments for some tensors and not "
                                 "for others")
            flat_states[k] = _join_state(_same_kind(entries, pack), pack)
        return {"state": flat_states,
                "param_groups": [{**group, "params": list(range(len(self.packs)))}]}


_ELEMENT_KEYS = ("state1", "state2", "exp_avg", "exp_avg_sq", "max_exp_avg_sq",
                 "momentum_buffer")  # one value per parameter element


def _kind(key: str, value: Any, numel: int) -> str:
    """How a state entry maps to the parameter: "element" (one value each), "block" (one
    per 256 elements) or "shared" (the step, a quantisation map)."""
    if not isinstance(value, torch.Tensor) or key.startswith("qmap"):
        return "shared"
    if key in _BLOCK_KEYS:
        return "block"
    if key in _ELEMENT_KEYS or (value.dim() >= 1 and value.numel() == numel):
        return "element"
    return "shared"


def _slice_state(flat_state: dict[str, Any], pack: _Pack, i: int) -> dict[str, Any]:
    """Member `i`'s share of one flat tensor's optimizer state: views, no copies (a checkpoint
    copies each to the host as it writes it; a copy here would take card memory)."""
    p, off = pack.members[i], pack.offsets[i]
    out: dict[str, Any] = {}
    for key, value in flat_state.items():
        if key == _WRAPPED:
            out[key] = _slice_state(value, pack, i)
            continue
        kind = _kind(key, value, pack.flat.numel())
        if kind == "block":
            out[key] = value[off // BLOCK:(off + p.numel() + BLOCK - 1) // BLOCK]
        elif kind == "element":
            out[key] = value.reshape(-1)[off:off + p.numel()].reshape(p.shape)
        else:
            out[key] = value
    return out


def _join_state(entries: list[dict[str, Any]], pack: _Pack) -> dict[str, Any]:
    """The flat tensor's optimizer state from its members' (the inverse of `_slice_state`)."""
    total = pack.flat.numel()
    first = entries[0]
    out: dict[str, Any] = {}
    for key, value in first.items():
        if key == _WRAPPED:
            out[key] = _join_state([e[key] for e in entries], pack)
            continue
        kind = _kind(key, value, pack.members[0].numel())
        if kind == "block":
            joined = torch.zeros(total // BLOCK, dtype=value.dtype, device=value.device)
            for e, p, off in zip(entries, pack.members, pack.offsets):
                blocks = e[key].reshape(-1)
                if blocks.numel() != _padded(p.numel()) // BLOCK:
                    raise ValueError(f"optimizer state {key!r} has {blocks.numel()} blocks for a "
                                     f"tensor of {p.numel()} (blocks of {BLOCK} expected)")
                joined[off // BLOCK:off // BLOCK + blocks.numel()] = blocks
        elif kind == "element":
            joined = torch.full((total,), _zero_code(first, key), dtype=value.dtype,
                                device=value.device)
            for e, p, off in zip(entries, pack.members, pack.offsets):
                part = e[key].reshape(-1)
                if part.numel() != p.numel():
                    raise ValueError(f"optimizer state {key!r} has {part.numel()} values for "
                                     f"a tensor of {p.numel()}")
                joined[off:off + p.numel()] = part
        else:
            joined = value
        out[key] = joined
    return out


def _zero_code(state: dict[str, Any], key: str) -> float:
    """What the padding holds in state `key`: 0, or for an 8-bit state the code of 0.0 in its
    quantisation map (a zero byte decodes to the map's first entry, not to 0)."""
    qmap = state.get("qmap" + key[-1]) if key.startswith("state") else None
    value = state.get(key)
    if isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and qmap is not None:
        return float(torch.argmin(qmap.abs()))
    return 0.0


def _inner(entry: dict[str, Any]) -> dict[str, Any]:
    return entry.get(_WRAPPED, entry)


def _same_kind(entries: list[dict[str, Any]], pack: _Pack) -> list[dict[str, Any]]:
    """`entries` with one kind of moment each: bitsandbytes keeps 32-bit state for tensors
    under 4,096 elements, and when such tensors share a buffer with larger ones their state
    is quantised with the others' maps (blockwise, as the flat optimizer would have kept it)."""
    eight = [e for e in entries if _inner(e).get("state1") is not None
             and _inner(e)["state1"].dtype == torch.uint8]
    if not eight or len(eight) == len(entries):
        return entries
    import bitsandbytes.functional as F

    template = _inner(eight[0])
    out = []
    for e, p in zip(entries, pack.members):
        q = _inner(e)
        if q["state1"].dtype == torch.uint8:
            out.append(e)
            continue
        converted = dict(template)
        for s in ("1", "2"):
            padded = torch.zeros(_padded(p.numel()), dtype=torch.float32)
            padded[:p.numel()] = q["state" + s].reshape(-1).float().cpu()
            codes, qs = F.quantize_blockwise(padded, code=template["qmap" + s].cpu(),
                                             blocksize=BLOCK)
            converted["state" + s] = codes[:p.numel()].reshape(p.shape)
            converted["absmax" + s] = qs.absmax.reshape(-1)
        if _WRAPPED in e:
            out.append({**{k: v for k, v in e.items() if k != _WRAPPED}, _WRAPPED: converted})
        else:
            out.append({**e, **converted})
    return out
