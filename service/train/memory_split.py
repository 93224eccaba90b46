"""Peak memory of one job split layer-wise over several GPUs of one machine, and the choice of
whether a job runs on one card, split over k cards, or nowhere there.

Pure arithmetic over memory.py's terms (no torch), so the pool can ask it per node:

    plan = plan_gpus(spec, gpus)        # gpus: one DeviceInfo per GPU, free_memory filled in
    plan.mode                           # "single" / "split" / "none"
    plan.gpus, plan.layers, plan.peaks  # which GPUs in layer order, [start, end) per GPU, bytes
    plan.reason                         # one human-readable line, also for "none"

How a split model spends each GPU's memory (`part_estimate`), with the one-card estimate's own
terms and calibration factors (memory.py):

- every GPU: its decoder layers' share of the quantised weights, the LoRA adapters, their
  grads, compute copies and optimizer state (layers are alike, so `layers / L` of each), one
  layer's activations (the one it recomputes in backward), the checkpointed layer inputs it
  keeps (its own layers', or the offload's two), the backward workspace, the hidden state
  arriving from the GPU before it, its CUDA context and the allocator's slack;
- the first GPU: the embeddings' output, and the input table unless it is in host memory;
- the last GPU: the final norm's output, the output head (unless it is in host memory) and the
  loss (chunked, streamed or full logits), i.e. what a one-card run holds for them.

CUDA graphs never run split (a graph replays one device's stream), so no graph pool is counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence

from . import memory as M
from .spec import DeviceInfo, TrainSpec

Mode = Literal["single", "split", "none"]


@dataclass(frozen=True)
class GpuPlan:
    """Where one job runs on one machine: `mode`, the GPUs (indices into the list given to
    `plan_gpus`, in the order the decoder layers run over them), each GPU's [start, end) of
    decoder layers, its predicted peak (`parts[i].total`, with a breakdown) and why."""

    mode: Mode
    gpus: tuple[int, ...] = ()
    layers: tuple[tuple[int, int], ...] = ()
    parts: tuple[M.MemoryEstimate, ...] = ()
    host_head: bool = False
    reason: str = ""
    free: tuple[int, ...] = field(default=(), repr=False)  # each chosen GPU's free bytes

    @property
    def peaks(self) -> tuple[int, ...]:
        return tuple(p.total for p in self.parts)

    @property
    def layer_counts(self) -> tuple[int, ...]:
        return tuple(e - s for s, e in self.layers)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for events, lorapool.json and payloads."""
        return {"mode": self.mode, "gpus": list(self.gpus),
                "layers": [list(r) for r in self.layers], "peaks": list(self.peaks),
                "host_head": self.host_head, "reason": self.reason}


def _shape_terms(spec: TrainSpec, device: DeviceInfo, config: Any):
    shape = M.model_shape(spec, config=config)
    dtype = M.resolve_compute_dtype(spec, device)
    return shape, dtype, M._DTYPE_BYTES[dtype]


def _tables(shape: M.ModelShape) -> tuple[int, int]:
    """(input table elements, output head elements) outside the decoder layers; a tied table
    is counted once, as the head's (it lives with the head: model.py's split map)."""
    table = shape.vocab_size * shape.hidden_size
    head = next((lin.in_features * lin.out_features for lin in shape.linears
                 if lin.is_output_head), table)
    if shape.tied_embeddings:
        return 0, head
    return table, head


def split_pieces(spec: TrainSpec, device: DeviceInfo, host_head: bool) -> dict[str, bool]:
    """The fast-path pieces a split run has on `device`: memory.py's `fast_pieces`, with the
    head where `host_head` says and never CUDA graphs."""
    pieces = dict(M.fast_pieces(spec, device))
    pieces["host_head"] = bool(host_head and pieces["host_head"])
    pieces["cuda_graphs"] = False
    return pieces


def head_variants(spec: TrainSpec, device: DeviceInfo) -> list[bool]:
    """`host_head` values a split run may use, richest (head on the last GPU) first; a single
    value where the spec pins it or the fast path does not run (then the head stays on the GPU)."""
    pieces = M.fast_pieces(spec, device)
    if not pieces["fused_lora"] or spec.device == "cpu" or device.kind != "cuda":
        return [False]
    switch = spec.fast_spec().host_head
    if switch == "on" and pieces["host_head"]:
        return [True]
    return [False, True] if pieces["host_head"] else [False]


def part_estimate(spec: TrainSpec, device: DeviceInfo, *, layers: int, num_layers: int,
                  first: bool, last: bool, host_head: bool = False,
                  config: Any = None) -> M.MemoryEstimate:
    """Predicted peak of the GPU holding `layers` of the model's `num_layers` decoder layers,
    the first and/or last of a split (see the module docstring). `first and last` with all the
    layers is a one-card run without CUDA graphs (its numbers are close to, not the same as,
    memory.py's: this counts the tables where a split map puts them)."""
    shape, dtype, a = _shape_terms(spec, device, config)
    h, i, L = shape.hidden_size, shape.intermediate_size, num_layers
    frac = layers / max(1, L)
    tokens = spec.micro_batch_size * spec.max_seq_len
    quantized = spec.quantization != "none"
    lora_params, optim, per_layer_lora = M._adapter_terms(shape, spec, a)
    base = M._quantized_weight_bytes(spec, shape, a)
    emb_rows, head_rows = _tables(shape)
    layer_other = max(0, shape.other_params - emb_rows - head_rows)
    fast = (device.kind == "cuda" and spec.device != "cpu"
            and M.fast_pieces(spec, device)["fused_lora"])
    pieces = split_pieces(spec, device, host_head) if fast else {}
    # Tables on this GPU (elements): the input table on the first unless the fast path keeps it
    # in host memory; the head (and a table tied to it) on the last unless it streams from there.
    tables = 0
    if first and emb_rows and not pieces.get("host_embeddings"):
        tables += emb_rows
    if last and not pieces.get("host_head"):
        tables += head_rows
    other_elems = layer_other * frac + tables
    ckpt = spec.gradient_checkpointing
    incoming = 0 if first else a * h  # the hidden state handed over by the GPU before
    if fast:
        layer = M.fast_layer_bytes(spec, shape, a, pieces) if layers else 0
        if ckpt:
            resident = min(M.FAST_RESIDENT_LAYER_INPUTS, layers) \
                if pieces["offload_activations"] else layers
            per_token = resident * a * h + layer
        else:
            per_token = layers * layer
        per_token += (a * h if first else 0) + (a * h if last else 0) + incoming
        loss = M.fast_loss_bytes(shape, a, pieces, tokens) if last else 0
        workspace = tokens * a * (3 * i + 2 * h) if layers else 0
        breakdown = {
            "base_weights_quantized": int(base * frac),
            "unquantized_params": int(other_elems * a),
            "lora_params": int(lora_params * M.LORA_PARAM_BYTES * frac),
            "lora_grads": int(lora_params * M.LORA_PARAM_BYTES * frac),
            "lora_compute_copies": int(lora_params * a * frac),
            "optimizer_state": int(optim * frac),
        }
        resident_bytes = sum(breakdown.values())
        breakdown.update({
            "weight_workspace": int((M.FAST_WEIGHT_FACTOR - 1) * resident_bytes),
            "activations": int(M.FAST_TOKEN_FACTOR * tokens * per_token),
            "logits": int(M.FAST_TOKEN_FACTOR * loss),
            "token_workspace": int(M.FAST_TOKEN_FACTOR * workspace),
        })
        allocated = sum(breakdown.values())
        if not pieces.get("host_head"):
            # Its share of the load: its quantised layers, its tables, one layer arriving
            # unquantised (memory.py's `loading_peak`, per GPU).
            loading = int(base * frac + other_elems * a
                          + (shape.largest_quantizable * a if layers else 0))
            if loading > allocated:
                breakdown["loading_peak"] = loading - allocated
                allocated = loading
        breakdown["cuda_context"] = M.cuda_context_bytes(device)
        breakdown["allocator_slack"] = int(M.ALLOCATOR_PAGE_SLACK * allocated
                                           + M.FAST_FIXED_SLACK)
        return M.MemoryEstimate(breakdown=breakdown, total=sum(breakdown.values()),
                                compute_dtype=dtype, device_kind="cuda",
                                host_head=bool(pieces.get("host_head")))
    # The reference path (memory.py's `_estimates`), term by term per GPU.
    other_bytes = 4 if (quantized and M.UPCAST_UNQUANTIZED_TO_FP32) else a
    layer_base = M.reference_layer_bytes(shape, a, spec.max_seq_len) if layers else 0
    lora_max = max((v for k, v in per_layer_lora.items() if k is not None), default=0) \
        if layers else 0
    lora_all = sum(per_layer_lora.values()) * frac
    factor = M.KBIT_ACTIVATION_FACTOR if quantized else 1.0
    if ckpt:
        per_token = layers * a * h + factor * (layer_base + lora_max)
    else:
        per_token = factor * (layers * layer_base + lora_all)
    per_token += (a * h if first else 0) + ((4 * h + a * h) if last else 0) + incoming
    activations = tokens * per_token
    if layers and (spec.micro_batch_size > 1 or spec.packing):
        activations += spec.micro_batch_size * spec.max_seq_len ** 2 * (
            1 if shape.attn_implementation != "eager" else a)
    workspace = 0
    if layers:
        workspace = tokens * a * (3 * i + 2 * h)
        if quantized:
            workspace += 2 * a * shape.largest_quantizable
        if spec.lora.use_dora:
            workspace += (a + 8) * shape.largest_quantizable
    breakdown = {
        "base_weights_quantized": int(base * frac),
        "unquantized_params": int(other_elems * other_bytes),
        "lora_params": int(lora_params * M.LORA_PARAM_BYTES * frac),
        "lora_grads": int(lora_params * M.LORA_PARAM_BYTES * frac),
        "optimizer_state": int(optim * frac),
        "activations": int(activations),
        "logits": int(tokens * shape.vocab_size * (a + M.LOGITS_EXTRA_BYTES)) if last else 0,
        "backward_workspace": int(workspace),
    }
    if device.kind == "cpu" or spec.device == "cpu":
        # Split devices are GPUs; a CPU "split" (tests) shares one RAM: the tensor terms only.
        return M.MemoryEstimate(breakdown=breakdown, total=sum(breakdown.values()),
                                compute_dtype=dtype, device_kind="cpu")
    breakdown["cuda_context"] = M.cuda_context_bytes(device)
    breakdown["allocator_slack"] = int(M.ALLOCATOR_SLACK * sum(
        v for k, v in breakdown.items() if k != "cuda_context"))
    return M.MemoryEstimate(breakdown=breakdown, total=sum(breakdown.values()),
                            compute_dtype=dtype, device_kind="cuda")


def _room(device: DeviceInfo, margin: float) -> int:
    free = device.free_memory if device.free_memory is not None else device.total_memory
    return int(free / (1.0 + margin))


def _capacity(spec: TrainSpec, device: DeviceInfo, room: int, L: int, *, first: bool,
              last: bool, host_head: bool, config: Any) -> int:
    """The most decoder layers (0..L) this GPU holds in its role within `room` bytes (its
    estimate grows with every layer, so a bisection finds it); -1 when not even its role's
    fixed share (context, tables, loss) fits."""
    def fits(n: int) -> bool:
        return part_estimate(spec, device, layers=n, num_layers=L, first=first, last=last,
                             host_head=host_head, config=config).total <= room
    if not fits(0):
        return -1
    lo, hi = 0, L
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def assign_layers(caps: Sequence[int], num_layers: int) -> Optional[list[int]]:
    """Decoder layers per GPU, each between 1 and its capacity, summing to `num_layers`, in
    proportion to the capacities (so every GPU is about as full as the others); None when the
    capacities do not add up or a GPU holds none."""
    k = len(caps)
    if k == 0 or min(caps) < 1 or sum(caps) < num_layers or num_layers < k:
        return None
    total = sum(caps)
    counts = [max(1, min(c, math.floor(num_layers * c / total))) for c in caps]
    # Hand out what the floors left (or take back what the 1-minimums added), always where
    # the most spare capacity is, so the split stays proportional.
    while sum(counts) < num_layers:
        j = max(range(k), key=lambda x: (caps[x] - counts[x], -x))
        counts[j] += 1
    while sum(counts) > num_layers:
        j = max((x for x in range(k) if counts[x] > 1), key=lambda x: (counts[x] - caps[x], x))
        counts[j] -= 1
    return counts


def ranges(counts: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """[start, end) decoder layers per GPU from the counts, in order."""
    out, start = [], 0
    for n in counts:
        out.append((start, start + n))
        start += n
    return tuple(out)


def split_over(spec: TrainSpec, gpus: Sequence[DeviceInfo], order: Sequence[int], *,
               host_head: bool, margin: float = 0.0, config: Any = None
               ) -> Optional[GpuPlan]:
    """The split of `spec` over the GPUs `order` (indices into `gpus`, in layer order), with
    layer counts in proportion to what each holds, or None where they do not hold it."""
    L = M.model_shape(spec, config=config).num_layers
    k = len(order)
    caps = [_capacity(spec, gpus[g], _room(gpus[g], margin), L, first=j == 0, last=j == k - 1,
                      host_head=host_head, config=config) for j, g in enumerate(order)]
    counts = assign_layers(caps, L)
    if counts is None:
        return None
    parts = tuple(part_estimate(spec, gpus[g], layers=n, num_layers=L, first=j == 0,
                                last=j == k - 1, host_head=host_head, config=config)
                  for j, (g, n) in enumerate(zip(order, counts)))
    free = tuple(_free(gpus[g]) for g in order)
    return GpuPlan(mode="split", gpus=tuple(order), layers=ranges(counts), parts=parts,
                   host_head=host_head, free=free)


def _free(device: DeviceInfo) -> int:
    return device.free_memory if device.free_memory is not None else device.total_memory


def _gib(n: float) -> str:
    return f"{n / M.GiB:.2f} GiB"


def describe_split(plan: GpuPlan, names: Optional[Sequence[str]] = None) -> str:
    """"layers 0-13 on GPU 0 (9.1 of 11.5 GiB free), layers 14-31 on GPU 1 (...)"."""
    parts = []
    for j, g in enumerate(plan.gpus):
        s, e = plan.layers[j]
        name = names[j] if names is not None else f"GPU {g}"
        role = []
        if j == len(plan.gpus) - 1:
            role.append("head in host memory" if plan.host_head else "head and loss")
        parts.append(f"layers {s}-{e - 1} on {name}"
                     + (f" with the {', '.join(role)}" if role else "")
                     + f" ({_gib(plan.parts[j].total)}"
                     + (f" of {_gib(plan.free[j])} free)" if plan.free else ")"))
    return ", ".join(parts)


def plan_gpus(spec: TrainSpec, gpus: Sequence[DeviceInfo], *, margin: float = 0.0,
              max_gpus: Optional[int] = None, config: Any = None) -> GpuPlan:
    """Whether `spec` fits one of this machine's GPUs, only split over k of them, or none; see
    the module docstring. `gpus[i].free_memory` (else its total) is what GPU i offers; a job
    fits where its peak x (1 + `margin`) is within that.

    One card wins whenever one holds the job's minimum (memory.py's `estimate_memory`): the
    best fit among them, with the richest configuration it holds (`fit_to_room`). Otherwise the
    fewest GPUs that hold it together, taken largest free first (`max_gpus` at most), layers in
    GPU order with each GPU in turn as the last (the head and loss) until one order fits, the
    head on the last GPU before the head in host memory.
    """
    if not gpus:
        return GpuPlan(mode="none", reason="the machine reports no GPU")
    rooms = [_room(g, margin) for g in gpus]
    single = []
    for idx, g in enumerate(gpus):
        est = M.estimate_memory(spec, g, config=config)
        if est.total <= rooms[idx]:
            single.append((rooms[idx], idx))
    if single:
        room, idx = min(single)
        est = M.fit_to_room(spec, gpus[idx], room, config=config)
        return GpuPlan(mode="single", gpus=(idx,), layers=((0, M.model_shape(
            spec, config=config).num_layers),), parts=(est,), host_head=est.host_head,
            free=(_free(gpus[idx]),),
            reason=f"fits one card: {_gib(est.total)} on GPU {idx} ({_gib(_free(gpus[idx]))} "
                   "free)")
    minimum = min((M.estimate_memory(spec, g, config=config).total, i)
                  for i, g in enumerate(gpus))
    by_free = sorted(range(len(gpus)), key=lambda x: (-_free(gpus[x]), x))
    limit = min(len(gpus), max_gpus or len(gpus))
    L = M.model_shape(spec, config=config).num_layers
    for k in range(2, min(limit, L) + 1):
        chosen = sorted(by_free[:k])
        # Each GPU in turn as the last (the head and loss), the highest index first.
        orders = [[g for g in chosen if g != last] + [last] for last in reversed(chosen)]
        for host_head in head_variants(spec, gpus[chosen[-1]]):
            for order in orders:
                plan = split_over(spec, gpus, order, host_head=host_head, margin=margin,
                                  config=config)
                if plan is not None:
                    why = (f"fits no single card (needs {_gib(minimum[0])}, the largest has "
                           f"{_gib(_free(gpus[by_free[0]]))} free); split over {k} GPUs: "
                           f"{describe_split(plan)}")
                    return GpuPlan(mode="split", gpus=plan.gpus, layers=plan.layers,
                                   parts=plan.parts, host_head=plan.host_head,
                                   free=plan.free, reason=why)
    frees = ", ".join(_gib(_free(g)) for g in gpus)
    whole = sum(part_estimate(spec, gpus[by_free[0]], layers=n, num_layers=L, first=j == 0,
                              last=j == limit - 1, host_head=head_variants(
                                  spec, gpus[by_free[0]])[-1], config=config).total
                for j, n in enumerate(_even(L, limit)))
    return GpuPlan(mode="none", reason=(
        f"fits no single card (needs {_gib(minimum[0])}) and not split over "
        f"{limit} GPU{'s' if limit != 1 else ''} either (about {_gib(whole)} in all with the "
        f"layers spread evenly; free: {frees}{f', margin {margin:.0%}' if margin else ''})"))


def _even(L: int, k: int) -> list[int]:
    return [L // k + (1 if j < L % k else 0) for j in range(k)]


__all__ = ["GpuPlan", "assign_layers", "describe_split", "head_variants", "part_estimate",
           "plan_gpus", "ranges", "split_over", "split_pieces"]
