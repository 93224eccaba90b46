"""Liger-Kernel's Triton RMSNorm, SwiGLU and RoPE for the decoder, where they can run.

The kernels come from the `liger-kernel` library (extra `gpu`), not from here: they need CUDA,
Triton and compute capability >= 7.0. `kernels_available(device)` says whether they can run
(and why not); `apply_kernels(model)` patches a loaded (possibly peft-wrapped) model in place
through Liger's per-model-type entry point. The loss kernels stay off: the trainer's
`token_loss_sum` owns the loss.

Liger patches some functions at module level (e.g. Llama's `apply_rotary_pos_emb`), so every
model of that type in the same process gets the Triton RoPE afterwards; numerically it is the
same rotation.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

MIN_CAPABILITY = (7, 0)


def kernels_available(device: torch.device) -> tuple[bool, str]:
    """(True, "") when Liger's Triton kernels can run on `device`, else (False, why)."""
    if device.type != "cuda":
        return False, f"Triton kernels need a CUDA GPU (device is {device.type})"
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        return False, (f"Triton kernels need compute capability >= "
                       f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}; this GPU has {cap[0]}.{cap[1]}")
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return False, f"triton not importable ({type(exc).__name__}: {exc})"
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN  # noqa: F401
    except Exception as exc:
        return False, f"liger-kernel not importable ({type(exc).__name__}: {exc}); pip install 'lorapool[gpu]'"
    return True, ""


def _hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def apply_kernels(model: torch.nn.Module) -> tuple[bool, str]:
    """Patch RMSNorm, SwiGLU and RoPE of `model` with Liger's kernels.

    Returns (applied, reason): False with the reason when the model type has no Liger entry.
    """
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    hf = _hf_model(model)
    model_type = getattr(getattr(hf, "config", None), "model_type", None)
    fn = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if fn is None:
        return False, f"Liger has no kernels for model type {model_type!r}"
    wanted: dict[str, Any] = dict(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                  fused_linear_cross_entropy=False)
    params = inspect.signature(fn).parameters
    fn(model=hf, **{k: v for k, v in wanted.items() if k in params})
    return True, f"Liger RMSNorm/SwiGLU/RoPE for {model_type}"
