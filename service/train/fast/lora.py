"""The fused QLoRA linear: NF4/FP4 dequantisation, base matmul and LoRA path in one autograd node.

peft's `Linear4bit` runs the frozen 4-bit base through bitsandbytes' `matmul_4bit` (which keeps
its own saved state for backward) and then the LoRA path as two more autograd nodes (dropout,
A, B, scale, add), each saving its input. `FusedLoraFunction` does the same arithmetic as one
node with a hand-derived backward and saves only the layer input (plus the dropped-out input
when LoRA dropout is on): the dequantised weight is rebuilt in backward instead of kept, and
the rank-r intermediate is recomputed (it costs r/out of the base matmul).

With y = x W^T + b + s * (d(x) A^T) B^T, g = dL/dy, h = d(x) A^T:
    dL/dx    = g W + s * (g B) A          (the second term through the dropout mask, if any)
    dL/dB    = s * g^T h
    dL/dA    = s * (g B)^T d(x)
A and B are fp32 master weights: they are cast to the compute dtype for the matmuls and their
gradients are returned in fp32.

`FusedLoraLinear4bit` is a subclass of peft's bnb `Linear4bit` whose forward takes the fused
path for a plain single LoRA adapter and falls back to peft otherwise; `apply_fused_lora` swaps
the class of a peft model's existing modules, so parameter names, shapes and the saved adapter
stay exactly peft's.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Optional, Sequence

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

log = logging.getLogger(__name__)

try:  # peft only defines its bnb layers when bitsandbytes imports
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit as _PeftLinear4bit
except Exception as exc:  # pragma: no cover - exercised only where bnb/peft are missing
    bnb = None
    _PeftLinear4bit = None
    _IMPORT_ERROR: Optional[str] = f"{type(exc).__name__}: {exc}"
else:
    _IMPORT_ERROR = None


def fused_lora_available() -> tuple[bool, str]:
    """(True, "") when bitsandbytes and peft's bnb LoRA layer import, else (False, why)."""
    if _PeftLinear4bit is None:
        return False, f"bitsandbytes/peft 4-bit LoRA layer not importable ({_IMPORT_ERROR})"
    return True, ""


# Compute-dtype copies of the fp32 LoRA weights, made once per optimizer step instead of at every
# forward, recompute and backward of every projection (three small casts each, which on a small
# model are launch overhead the GPU waits for). Keyed by the parameter's identity and in-place
# version; every optimizer step anywhere drops them all (bitsandbytes' optimizers update the
# parameters in their own kernels, which the version counter does not see). A parameter that is
# freed (a model evaluated on a long-lived node) takes its copy with it, and every stack it is in
# (`stacked_lora_weights`): a later parameter given the same id and memory must never be served
# a dead one's values.
_CAST_CACHE: dict[int, tuple[tuple, torch.Tensor]] = {}
_STACK_CACHE: dict[tuple[int, ...], tuple[tuple, torch.Tensor]] = {}  # by the members' ids
_WATCHED: set[int] = set()  # parameters with a finalizer that drops their entries


def _forget(pid: int) -> None:
    _CAST_CACHE.pop(pid, None)
    for ids in [ids for ids in _STACK_CACHE if pid in ids]:
        del _STACK_CACHE[ids]
    _WATCHED.discard(pid)


def _watch(param: torch.Tensor) -> None:
    pid = id(param)
    if pid not in _WATCHED:
        _WATCHED.add(pid)
        weakref.finalize(param, _forget, pid)


def _drop_casts(*_: Any, **__: Any) -> None:
    _CAST_CACHE.clear()
    _STACK_CACHE.clear()


register_optimizer_step_post_hook(_drop_casts)


def drop_step_caches() -> None:
    """Forget every cached cast and stack now (fast/graphs.py, around a CUDA graph capture:
    the graph must compute its own, and nothing outside it may read the ones it made)."""
    _drop_casts()


def lora_weight_in(param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`param` in `dtype`, cast at most once between two optimizer steps."""
    if param.dtype == dtype:
        return param
    pid, key = id(param), (param.data_ptr(), param._version, dtype)
    hit = _CAST_CACHE.get(pid)
    if hit is None or hit[0] != key:
        _watch(param)
        hit = _CAST_CACHE[pid] = (key, param.detach().to(dtype))
    return hit[1]


def stacked_lora_weights(params: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """[P_1; ...; P_n] (stacked along dim 0) in `dtype`, made at most once between two
    optimizer steps (fast/lora_group.py stacks sibling projections' A matrices)."""
    ids = tuple(id(p) for p in params)
    key = tuple((p.data_ptr(), p._version) for p in params) + (dtype,)
    hit = _STACK_CACHE.get(ids)
    if hit is None or hit[0] != key:
        for p in params:
            _watch(p)
        hit = _STACK_CACHE[ids] = (key, torch.cat([lora_weight_in(p, dtype) for p in params]))
    return hit[1]


def dequantize_weight(weight: torch.Tensor, quant_state: Any, dtype: torch.dtype) -> torch.Tensor:
    """The dense (out, in) weight of a bitsandbytes 4-bit parameter, in `dtype`.

    bitsandbytes' own kernels, called through their registered ops rather than
    `functional.dequantize_4bit`: that wrapper re-validates the state and goes through two more
    Python layers per call, which at micro-batch 1 (a few hundred calls per step, each a short
    kernel) is time the GPU spends waiting. The kernel writes `dtype` directly, so no cast follows.
    """
    qs = quant_state
    if weight.shape[0] == 1 or qs.quant_type not in ("nf4", "fp4"):
        # The legacy transposed packing, or anything unusual: bitsandbytes' checked path.
        w = bnb.functional.dequantize_4bit(weight, qs)
        return w if w.dtype == dtype else w.to(dtype)
    if qs.nested:
        s2 = qs.state2
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
            qs.absmax, s2.absmax, s2.code, s2.blocksize, torch.float32)
        absmax += qs.offset
    else:
        absmax = qs.absmax if qs.absmax.dtype == torch.float32 else qs.absmax.float()
    return torch.ops.bitsandbytes.dequantize_4bit.default(weight, absmax, qs.blocksize,
                                                          qs.quant_type, qs.shape, dtype)


class FusedLoraFunction(torch.autograd.Function):
    """y = x W^T + b + scale * (xd A^T) B^T with W a bitsandbytes 4-bit weight.

    `xd` is the dropped-out input, or None when LoRA dropout is off (then the LoRA path reads
    `x` and only `x` is saved). Gradients flow to x, xd, A and B; W and b are frozen.
    """

    @staticmethod
    def forward(ctx, x, xd, lora_a, lora_b, weight, quant_state, bias, scale, compute_dtype):
        in_shape = x.shape
        out_dtype = x.dtype
        x2 = x.reshape(-1, in_shape[-1])
        xc = x2 if x2.dtype == compute_dtype else x2.to(compute_dtype)
        if xd is None:
            xdc = xc
        else:
            xd2 = xd.reshape(-1, in_shape[-1])
            xdc = xd2 if xd2.dtype == compute_dtype else xd2.to(compute_dtype)
        a = lora_weight_in(lora_a, compute_dtype)
        b = lora_weight_in(lora_b, compute_dtype)

        w = dequantize_weight(weight, quant_state, compute_dtype)
        out = xc @ w.t()
        del w  # rebuilt in backward, never kept
        if bias is not None:
            out = out + bias.to(compute_dtype)
        # out += scale * (xd A^T) B^T, the rank-r product added in place (no second (N, out) buffer)
        out.addmm_(xdc @ a.t(), b.t(), alpha=scale)

        ctx.weight = weight
        ctx.quant_state = quant_state
        ctx.scale = scale
        ctx.compute_dtype = compute_dtype
        ctx.in_shape = in_shape
        ctx.has_dropout = xd is not None
        # Save the inputs as given (usually already in the compute dtype: no copy is kept).
        if xd is None:
            ctx.save_for_backward(x, lora_a, lora_b)
        else:
            ctx.save_for_backward(x, xd, lora_a, lora_b)
        out = out.reshape(*in_shape[:-1], out.shape[-1])
        return out if out.dtype == out_dtype else out.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        cd = ctx.compute_dtype
        if ctx.has_dropout:
            x, xd, lora_a, lora_b = ctx.saved_tensors
        else:
            x, lora_a, lora_b = ctx.saved_tensors
            xd = None
        in_features = ctx.in_shape[-1]
        x_dtype = x.dtype
        g = grad_out.reshape(-1, grad_out.shape[-1])
        g = g if g.dtype == cd else g.to(cd)
        src = x if xd is None else xd
        xdc = src.reshape(-1, in_features)
        xdc = xdc if xdc.dtype == cd else xdc.to(cd)
        a = lora_weight_in(lora_a, cd)
        b = lora_weight_in(lora_b, cd)
        scale = ctx.scale

        need_x, need_xd, need_a, need_b = ctx.needs_input_grad[:4]
        grad_x = grad_xd = grad_a = grad_b = None

        gb = g @ b  # (N, r): the gradient reaching the rank-r intermediate, before the scale
        if need_b:
            h = xdc @ a.t()  # (N, r), recomputed: cheap next to the base matmul
            grad_b = (g.t() @ h).float().mul_(scale)
        if need_a:
            grad_a = (gb.t() @ xdc).float().mul_(scale)

        if need_x:
            w = dequantize_weight(ctx.weight, ctx.quant_state, cd)
            dx = g @ w
            del w
            if xd is None:
                # The LoRA term accumulates in the GEMM's epilogue: a separate (N, in) product,
                # its scaling and the add would be three more passes over an activation.
                dx.addmm_(gb, a, alpha=scale)
            grad_x = dx.reshape(ctx.in_shape).to(x_dtype)
        if xd is not None and need_xd:
            lora_dx = (gb @ a).mul_(scale)  # (N, in), gradient wrt the dropped-out input
            grad_xd = lora_dx.reshape(ctx.in_shape).to(xd.dtype)
        return grad_x, grad_xd, grad_a, grad_b, None, None, None, None, None


def fused_lora_linear(x: torch.Tensor, xd: Optional[torch.Tensor], lora_a: torch.Tensor,
                      lora_b: torch.Tensor, weight: torch.Tensor, quant_state: Any,
                      bias: Optional[torch.Tensor], scale: float,
                      compute_dtype: torch.dtype) -> torch.Tensor:
    """Functional entry point of `FusedLoraFunction` (see its docstring)."""
    return FusedLoraFunction.apply(x, xd, lora_a, lora_b, weight, quant_state, bias, float(scale),
                                   compute_dtype)


if _PeftLinear4bit is not None:

    class FusedLoraLinear4bit(_PeftLinear4bit):
        """peft's LoRA-over-`bnb.nn.Linear4bit` with the fused forward for plain LoRA.

        The fused path runs when exactly one adapter is active, it is plain LoRA (no DoRA or
        other variant, no LoRA bias), the adapters are neither disabled nor merged and no
        per-call adapter routing is asked for; anything else goes through peft unchanged.
        Parameters and state dict are peft's own, so adapters save and load as plain PEFT.
        """

        def _fused_adapter(self, kwargs: dict) -> Optional[str]:
            if kwargs.get("adapter_names") is not None or self.disable_adapters or self.merged:
                return None
            active = [a for a in self.active_adapters if a in self.lora_A]
            if len(active) != 1:
                return None
            name = active[0]
            if name in getattr(self, "lora_variant", {}) or self.use_dora.get(name, False):
                return None
            if not isinstance(self.lora_A[name], torch.nn.Linear):
                return None
            if self.lora_B[name].bias is not None:
                return None
            base = self.get_base_layer()
            qs = getattr(base.weight, "quant_state", None)
            if qs is None or getattr(qs, "packing_format_for_cpu", False):
                # bitsandbytes' CPU inference layout: only its own gemv kernel reads it.
                return None
            return name

        def _dropout_active(self, name: str) -> bool:
            dropout = self.lora_dropout[name]
            return isinstance(dropout, torch.nn.Dropout) and dropout.training and dropout.p > 0

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            group = self.__dict__.get("_lorapool_group")  # fast/lora_group.py, when grouped
            if group is not None and not args and not kwargs:
                out = group.take(self, x)  # a sibling already computed it on this very x
                if out is not None:
                    return out
            name = self._fused_adapter(kwargs) if not args else None
            if name is None:
                return super().forward(x, *args, **kwargs)
            if group is not None and not kwargs and not self._dropout_active(name):
                out = group.run(self, x, name)
                if out is not None:
                    return out
            self._check_forward_args(x, *args, **kwargs)
            base = self.get_base_layer()
            bnb.nn.modules.fix_4bit_weight_quant_state_from_module(base)
            compute_dtype = base.compute_dtype or x.dtype
            dropout = self.lora_dropout[name]
            # Dropout stays an ordinary autograd op ahead of the fused node: the same module and
            # RNG draw as peft, so a seed gives the same mask on both paths.
            xd = dropout(x) if self._dropout_active(name) else None
            return fused_lora_linear(x, xd, self.lora_A[name].weight, self.lora_B[name].weight,
                                     base.weight, base.weight.quant_state, base.bias,
                                     self.scaling[name], compute_dtype)

else:  # pragma: no cover
    FusedLoraLinear4bit = None  # type: ignore[assignment,misc]


def apply_fused_lora(model: torch.nn.Module) -> int:
    """Give every peft LoRA `Linear4bit` in `model` the fused forward; returns how many.

    The class swap keeps the module object, its parameters and hooks; only `forward` changes.
    """
    if FusedLoraLinear4bit is None:
        return 0
    n = 0
    for module in model.modules():
        if type(module) is _PeftLinear4bit:
            module.__class__ = FusedLoraLinear4bit
            n += 1
    return n
