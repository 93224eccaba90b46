"""The fast path of the trainer: which pieces run on this device, and plugging them in.

The pieces are the fields of `spec.FastSpec` (`FAST_PIECES`, also exported here as `PIECES`):
`fused_lora` (fast/lora.py), `grouped_lora` (fast/lora_group.py: sibling projections of one
input as one node, on top of fused_lora), `offload_activations` (fast/offload.py), `kernels`
(Liger, fast/kernels.py), `padding_free` (fast/attention.py), `chunked_loss` (the trainer's
loss.py), `host_embeddings` (fast/embeddings.py), `host_head` (fast/host_head.py: the frozen
output head streamed from host memory into the loss), `cuda_graphs` (fast/graphs.py: a
micro-batch's forward and backward replayed as one CUDA graph) and `flat_optimizer`
(fast/flat_params.py: the trainable tensors in one buffer, stepped by one optimizer call; the
trainer applies it, as it builds the optimizer). `TrainSpec.fast` switches each "auto",
"on" or "off"; `resolve_fast(spec, device)` turns that into a `spec.FastPlan` for the device:

- CUDA: "auto" is on wherever the piece can run (`host_head` and `cuda_graphs` stay
  tentative: the trainer keeps them only where the memory says so, fastpath.fit_memory);
- CPU: "auto" is off (the reference path) except `chunked_loss`, which is numerically the
  same and always saves memory;
- "on" forces a piece wherever it can run at all; where it cannot, it is off and
  `plan.reasons` says why.

The trainer reaches these through fastpath.py: it merges `prepare_for_fast(plan, spec)` into its
`from_pretrained` kwargs and, after peft wrapped the model and checkpointing is on, calls
`apply_fast_path(...)`. A piece's module is imported only when the piece is considered, so a
missing optional dependency (bitsandbytes, triton, liger-kernel) turns that piece off with a
reason instead of failing the import of this package.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, get_args

import torch

from ..spec import FAST_PIECES, FastPlan, FastSpec, Switch, cuda_graphs_unsupported

log = logging.getLogger(__name__)

PIECES = FAST_PIECES  # the pieces, in FastSpec's field order (spec.py owns the list)
_SWITCHES = get_args(Switch)


def fast_switches(spec: Any) -> dict[str, str]:
    """The per-piece switches of `spec.fast`: "auto"/"off", a FastSpec, or a plain dict.

    `spec` is a TrainSpec or any object with a `fast` attribute (none: everything "auto").
    """
    if hasattr(spec, "fast_spec") and callable(spec.fast_spec):
        fast: Any = spec.fast_spec()
    else:
        fast = getattr(spec, "fast", "auto")
    if fast is None or fast == "auto":
        return {p: "auto" for p in PIECES}
    if fast == "off":
        return {p: "off" for p in PIECES}
    if isinstance(fast, str):
        raise ValueError(f"fast must be 'auto', 'off' or per-piece switches, not {fast!r}")
    if isinstance(fast, Mapping):
        fast = FastSpec(**fast)  # validates names and values
    out = {}
    for p in PIECES:
        value = getattr(fast, p, "auto")
        if value not in _SWITCHES:
            raise ValueError(f"fast.{p} must be one of {_SWITCHES}, not {value!r}")
        out[p] = value
    return out


def _can_run(piece: str, spec: Any, device: torch.device) -> tuple[bool, str]:
    """Whether `piece` can run at all for this spec on this device, and if not why."""
    if piece == "fused_lora":
        from .lora import fused_lora_available

        quant = getattr(spec, "quantization", "nf4")
        if quant not in ("nf4", "fp4"):
            return False, f"fused LoRA needs nf4/fp4 quantization (spec has {quant!r})"
        lora = getattr(spec, "lora", None)
        if lora is not None and getattr(lora, "use_dora", False):
            return False, "fused LoRA does not do DoRA (peft's DoRA layer runs instead)"
        return fused_lora_available()
    if piece == "grouped_lora":
        lora = getattr(spec, "lora", None)
        if lora is not None and getattr(lora, "dropout", 0.0) > 0:
            return False, ("grouped LoRA shares one input across siblings; LoRA dropout draws a "
                           "mask per projection (set lora.dropout to 0 to group)")
        return _can_run("fused_lora", spec, device)
    if piece == "offload_activations":
        if not getattr(spec, "gradient_checkpointing", True):
            return False, "activation offload needs gradient_checkpointing on"
        return True, ""
    if piece == "host_embeddings":
        if device.type != "cuda":
            return False, "host embeddings save GPU memory; on the CPU they already are in RAM"
        return True, ""
    if piece == "host_head":
        if device.type != "cuda":
            return False, "a host head saves GPU memory; on the CPU it already is in RAM"
        return True, ""
    if piece == "kernels":
        from .kernels import kernels_available

        return kernels_available(device)
    if piece == "cuda_graphs":
        return _graphs_can_run(spec, device)
    if piece == "padding_free":
        try:
            from transformers import AttentionInterface  # noqa: F401
            from transformers.masking_utils import AttentionMaskInterface  # noqa: F401
        except ImportError as exc:
            return False, f"transformers has no attention registry ({exc})"
        return True, ""
    return True, ""  # chunked_loss is pure torch


def _graphs_can_run(spec: Any, device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, "CUDA graphs need a CUDA device"
    why = cuda_graphs_unsupported(spec, torch.cuda.get_device_capability(device))
    return why is None, why or ""


def _what_runs(piece: str, device: torch.device) -> str:
    if piece == "padding_free":
        from .attention import flex_attention_supported

        ok, why = flex_attention_supported(device)
        return "flex_attention document mask" if ok else f"per-document SDPA ({why})"
    if piece == "offload_activations" and device.type != "cuda":
        return "custom checkpoint, inputs stay in host memory (already on the CPU)"
    return {"fused_lora": "fused NF4 dequant + base matmul + LoRA autograd function",
            "offload_activations": "checkpointed layer inputs in pinned host memory",
            "kernels": "Liger RMSNorm/SwiGLU/RoPE",
            "chunked_loss": "chunked linear + cross-entropy",
            "host_embeddings": "frozen input embeddings in pinned host memory",
            "host_head": "frozen output head in pinned host memory, streamed into the loss",
            "grouped_lora": "q/k/v and gate/up projections as one fused node each",
            "cuda_graphs": "forward + backward of each micro-batch shape replayed as a CUDA "
                           "graph (one-document rows, padded to a length bucket)",
            "flat_optimizer": "trainable tensors in one buffer, one optimizer call per step"
            }[piece]


def resolve_fast(spec: Any, device: torch.device | str) -> FastPlan:
    """The fast-path plan for `spec` on `device` (see the module docstring for the rules)."""
    device = torch.device(device)
    switches = fast_switches(spec)
    on: dict[str, bool] = {}
    reasons: dict[str, str] = {}
    for piece in PIECES:
        switch = switches[piece]
        if switch == "off":
            on[piece], reasons[piece] = False, "off: switched off"
            continue
        if switch == "auto" and device.type != "cuda" and piece != "chunked_loss":
            on[piece], reasons[piece] = False, "off: auto keeps the reference path on the CPU"
            continue
        ok, why = _can_run(piece, spec, device)
        if not ok:
            on[piece], reasons[piece] = False, f"off: {why}"
            continue
        on[piece], reasons[piece] = True, f"on ({switch}): {_what_runs(piece, device)}"
    if on["grouped_lora"] and not on["fused_lora"]:
        on["grouped_lora"], reasons["grouped_lora"] = False, "off: needs fused_lora"
    if on["host_head"] and not on["chunked_loss"]:
        on["host_head"], reasons["host_head"] = False, "off: needs chunked_loss (its loss streams)"
    if on["host_head"] and switches["host_head"] == "on":
        # The streamed head's copies are paced by the host: a graph cannot hold them.
        on["cuda_graphs"], reasons["cuda_graphs"] = False, "off: host_head is on"
    if on["cuda_graphs"] and not (on["padding_free"] and on["chunked_loss"]):
        # The graph takes flat rows (position_ids, no mask) and ends in the chunked loss.
        on["cuda_graphs"], reasons["cuda_graphs"] = False, "off: needs padding_free and chunked_loss"
    return FastPlan(reasons=reasons, **on)


def prepare_for_fast(plan: FastPlan, spec: Any) -> dict[str, Any]:
    """Extra kwargs for `AutoModelForCausalLM.from_pretrained` that the plan needs."""
    if plan.padding_free:
        from .attention import register_doc_attention

        return {"attn_implementation": register_doc_attention()}
    return {}


def apply_fast_path(model: torch.nn.Module, plan: FastPlan, spec: Any,
                    device: torch.device | str) -> None:
    """Plug the plan's pieces into a peft-wrapped model (after checkpointing was enabled).

    What was done is left on the model as `model.lorapool_fast` (a dict) for events; a piece
    that finds nothing to do says so there instead of failing.
    """
    done: dict[str, str] = {}
    if plan.fused_lora:
        from .lora import apply_fused_lora

        n = apply_fused_lora(model)
        done["fused_lora"] = f"{n} LoRA Linear4bit modules fused" if n else \
            "no peft LoRA Linear4bit module found"
        if plan.grouped_lora:
            from .lora import FusedLoraLinear4bit
            from .lora_group import group_siblings

            groups = group_siblings(model, FusedLoraLinear4bit)
            done["grouped_lora"] = f"{groups} sibling groups" if groups else \
                "no sibling projections (q/k/v, gate/up) found"
    if plan.offload_activations:
        from .offload import install_offloaded_checkpointing

        n = install_offloaded_checkpointing(model)
        done["offload_activations"] = f"{n} checkpointed layers offload their inputs" if n else \
            "no checkpointed decoder layer (gradient checkpointing off?)"
    if plan.kernels:
        from .kernels import apply_kernels

        ok, why = apply_kernels(model)
        done["kernels"] = why if ok else f"off: {why}"
    if plan.host_embeddings:
        from ..loss import _causal_lm
        from .embeddings import HostEmbedding, move_input_embeddings_to_host

        done["host_embeddings"] = (
            "input embedding in pinned host memory since load"
            if isinstance(_causal_lm(model).get_input_embeddings(), HostEmbedding)
            else move_input_embeddings_to_host(model))
    if plan.host_head:
        from .host_head import host_head_of, move_output_head_to_host

        # After host_embeddings: a tied input table already on the host is shared, not copied.
        done["host_head"] = ("output head in pinned host memory since load"
                             if host_head_of(model) is not None
                             else move_output_head_to_host(model))
    if plan.padding_free:
        from .attention import register_doc_attention

        name = register_doc_attention()
        config = getattr(model, "config", None)
        if config is not None and getattr(config, "_attn_implementation", None) != name:
            # The loader did not take prepare_for_fast's kwargs: switch the loaded model over.
            _set_attention(model, name)
        done["padding_free"] = name
    try:
        model.lorapool_fast = done
    except Exception:  # a module that refuses attributes: the log line is enough
        pass
    log.info("fast path: %s", done)


def _set_attention(model: torch.nn.Module, name: str) -> None:
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    setter = getattr(hf, "set_attn_implementation", None)
    if callable(setter):
        setter(name)
    else:  # transformers without the setter: the config field is what the layers read
        hf.config._attn_implementation = name


__all__ = ["FastPlan", "FastSpec", "PIECES", "apply_fast_path", "fast_switches",
           "prepare_for_fast", "resolve_fast"]
