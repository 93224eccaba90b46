"""Sibling QLoRA projections that read one input (q/k/v, gate/up) as a single fused node.

At micro-batch 1 a small model's step is bound by the CPU launching kernels, not by the GPU
running them; a decoder layer's seven LoRA projections are seven autograd nodes, each casting
its input, launching a rank-r matmul on each side and, in backward, two more for A's and the
input's gradient. Projections that read the same tensor share most of that work:

    h        = x [A_1; ...; A_n]^T                  one (N, sum r) matmul instead of n
    y_i      = x W_i^T + b_i + s_i h_i B_i^T        base matmuls stay per member (W_i differ)
    gB       = [s_1 g_1 B_1, ..., s_n g_n B_n]      (N, sum r)
    dL/dx    = sum_i g_i W_i + gB [A_1; ...; A_n]   one rank-R matmul instead of n
    dL/dA    = gB^T x, split by member              one matmul instead of n
    dL/dB_i  = s_i g_i^T h_i

`LoraGroupFunction` is that node. HF decoder layers call `q_proj(x)`, `k_proj(x)`, `v_proj(x)`
one after the other with the same `x`, so the grouping needs no change to the model's code: the
first member called computes every member's output and leaves the others with the group
(`LoraGroup.take`), each handed out once, only to a member called on the very same tensor (same
object, same in-place version, same grad mode); any other call runs the member alone. LoRA
dropout draws one mask per member, which breaks the shared A matmul: a group runs only while
dropout is off (`lora.dropout: 0`, Unsloth's recommended setting); with dropout on, each member
runs fused on its own, as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .lora import bnb, dequantize_weight, lora_weight_in, stacked_lora_weights

# Sibling projection names by architecture family: Llama/Mistral/Qwen/Gemma/Phi-3-split share
# these; a model whose names differ simply runs its projections one by one.
SIBLING_GROUPS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("w1", "w3"),
)

class LoraGroupFunction(torch.autograd.Function):
    """The outputs of n QLoRA projections of one input `x` (see the module docstring).

    Arguments after `x`: the compute dtype, then per member (A, B, W, quant_state, bias, scale)
    flattened. Gradients flow to x and every A and B; W and b are frozen.
    """

    @staticmethod
    def forward(ctx, x, compute_dtype, *members):
        n = len(members) // 6
        groups = [members[6 * i:6 * i + 6] for i in range(n)]
        in_shape = x.shape
        x2 = x.reshape(-1, in_shape[-1])
        xc = x2 if x2.dtype == compute_dtype else x2.to(compute_dtype)
        a_params = [m[0] for m in groups]
        a_cat = stacked_lora_weights(a_params, compute_dtype)
        h = xc @ a_cat.t()  # (N, sum r)
        ranks = [a.shape[0] for a in a_params]
        outs = []
        off = 0
        for (lora_a, lora_b, weight, quant_state, bias, scale), r in zip(groups, ranks):
            w = dequantize_weight(weight, quant_state, compute_dtype)
            out = xc @ w.t()
            del w
            if bias is not None:
                out = out + bias.to(compute_dtype)
            out.addmm_(h[:, off:off + r], lora_weight_in(lora_b, compute_dtype).t(), alpha=scale)
            off += r
            out = out.reshape(*in_shape[:-1], out.shape[-1])
            outs.append(out if out.dtype == x.dtype else out.to(x.dtype))
        ctx.compute_dtype = compute_dtype
        ctx.in_shape = in_shape
        ctx.ranks = ranks
        ctx.frozen = [(m[2], m[3], float(m[5])) for m in groups]
        ctx.save_for_backward(x, *a_params, *[m[1] for m in groups])
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        cd = ctx.compute_dtype
        n = len(ctx.ranks)
        x, *ab = ctx.saved_tensors
        a_params, b_params = ab[:n], ab[n:]
        xc = x.reshape(-1, ctx.in_shape[-1])
        xc = xc if xc.dtype == cd else xc.to(cd)
        a_cat = stacked_lora_weights(a_params, cd)
        need_x = ctx.needs_input_grad[0]
        # needs_input_grad: x, dtype, then per member (A, B, W, qs, bias, scale)
        need = ctx.needs_input_grad[2:]

        h = None
        gb_parts = []
        grad_ab: list[Optional[torch.Tensor]] = [None] * (2 * n)
        dx: Optional[torch.Tensor] = None
        for i, (g, b_param, (weight, quant_state, scale)) in enumerate(
                zip(grads, b_params, ctx.frozen)):
            r = ctx.ranks[i]
            if g is None:  # an output nobody used: its gradient is zero
                gb_parts.append(xc.new_zeros(xc.shape[0], r))
                continue
            g = g.reshape(-1, g.shape[-1])
            g = g if g.dtype == cd else g.to(cd)
            b = lora_weight_in(b_param, cd)
            gb_parts.append((g @ b).mul_(scale))
            if need[6 * i + 1]:
                if h is None:
                    h = xc @ a_cat.t()
                off = sum(ctx.ranks[:i])
                grad_ab[n + i] = (g.t() @ h[:, off:off + r]).float().mul_(scale)
            if need_x:
                w = dequantize_weight(weight, quant_state, cd)
                if dx is None:
                    dx = g @ w
                else:
                    dx.addmm_(g, w)
                del w
        gb = torch.cat(gb_parts, dim=1)  # (N, sum r), scales folded in
        if any(need[6 * i] for i in range(n)):
            grad_a_cat = (gb.t() @ xc).float()
            off = 0
            for i, r in enumerate(ctx.ranks):
                if need[6 * i]:
                    grad_ab[i] = grad_a_cat[off:off + r]
                off += r
        grad_x = None
        if need_x:
            # Accumulated in the GEMM (see lora.py): no (N, in) temporary, no separate add.
            dx = gb @ a_cat if dx is None else dx.addmm_(gb, a_cat)
            grad_x = dx.reshape(ctx.in_shape).to(x.dtype)
        per_member: list[Any] = []
        for i in range(n):
            per_member += [grad_ab[i], grad_ab[n + i], None, None, None, None]
        return (grad_x, None, *per_member)


@dataclass(eq=False)
class LoraGroup:
    """Sibling fused LoRA modules of one parent that read the same input.

    `run` computes every member's output in one `LoraGroupFunction` node; `take` hands a member
    the output computed for it, once, if it is called on the same tensor.
    """

    members: list[Any]
    _pending: dict[int, torch.Tensor] = field(default_factory=dict)
    _key: Optional[tuple] = None
    _x: Optional[torch.Tensor] = None

    @staticmethod
    def _call_key(x: torch.Tensor) -> tuple:
        return (x._version, torch.is_grad_enabled())

    def take(self, member: Any, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The output computed for `member` by its sibling on this very `x`, or None."""
        if self._x is not x or self._key != self._call_key(x):
            return None
        out = self._pending.pop(id(member), None)
        if not self._pending:
            self._x = self._key = None
        return out

    def run(self, caller: Any, x: torch.Tensor, adapter: str) -> Optional[torch.Tensor]:
        """Every member's output on `x`; returns the caller's and keeps the others for `take`.

        None when some member cannot join (another adapter, dropout on, ...): the caller then
        runs on its own.
        """
        args: list[Any] = []
        compute_dtype = None
        for m in self.members:
            if m is not caller and (m._fused_adapter({}) != adapter or m._dropout_active(adapter)):
                return None
            base = m.get_base_layer()
            bnb.nn.modules.fix_4bit_weight_quant_state_from_module(base)
            cd = base.compute_dtype or x.dtype
            if compute_dtype is None:
                compute_dtype = cd
            elif cd != compute_dtype:
                return None
            args += [m.lora_A[adapter].weight, m.lora_B[adapter].weight, base.weight,
                     base.weight.quant_state, base.bias, float(m.scaling[adapter])]
        outs = LoraGroupFunction.apply(x, compute_dtype, *args)
        self._pending = {id(m): o for m, o in zip(self.members, outs) if m is not caller}
        self._x, self._key = x, self._call_key(x)
        return outs[self.members.index(caller)]


def reset_groups(model: torch.nn.Module) -> None:
    """Forget every group's pending outputs (fast/graphs.py, after a capture or its failure)."""
    for module in model.modules():
        group = module.__dict__.get("_lorapool_group")
        if group is not None:
            group._pending, group._x, group._key = {}, None, None


def group_siblings(model: torch.nn.Module, fused_cls: type) -> int:
    """Attach a `LoraGroup` to every set of sibling fused modules; returns how many groups."""
    n = 0
    for parent in model.modules():
        children = dict(parent.named_children())
        for names in SIBLING_GROUPS:
            members = [children.get(name) for name in names]
            if all(type(m) is fused_cls for m in members):
                group = LoraGroup(members=list(members))
                for m in members:
                    m._lorapool_group = group
                n += 1
    return n
