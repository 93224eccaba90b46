"""The one home of the training and evaluation loss: summed next-token cross-entropy.

`token_loss_sum(model, batch, chunked=...)` returns the *sum* of the next-token cross-entropy
over the label tokens of a collated batch (labels != IGNORE_INDEX) and their count; the loop
divides by the label tokens of the whole optimizer step, evaluation by those of the whole set.
Training (loop.py) and evaluation (evaluation.py, `Trainer.evaluate`) both call it, so their
numbers are the same function of the same weights.

Two ways to compute it, the same number to rounding:

- full (the reference): the model's logits (tokens x vocab, compute dtype), cast to fp32, into
  `F.cross_entropy`. For a 128k vocabulary at seq 2048 that is 1 GiB of bf16 logits plus 2 GiB of
  fp32 copy, held until backward.
- chunked (`fast.chunked_loss`): the decoder's hidden states go into `chunked_linear_cross_entropy`,
  an autograd function that runs the lm_head matmul + cross-entropy over `chunk` tokens at a
  time, upcasting each chunk's logits to fp32, and computes the gradient wrt the hidden states
  (and wrt the lm_head weight, only if it is trainable) chunk by chunk *in forward*; backward
  only scales them by the incoming gradient. The (tokens x vocab) logits never exist at once.
  On CUDA, Liger-Kernel's fused linear cross-entropy is used instead when it is importable and
  the lm_head is frozen (`LORAPOOL_LIGER_FLCE=0` turns it off). Where the fast path moved the
  head to host memory (fast/host_head.py), its own streamed loss computes the same sum.

The labels are shifted by one (position t predicts token t+1); the last position's target is
IGNORE_INDEX. Every example's first label is IGNORE_INDEX (data.py), so in a flat padding-free
row (collate.py's `FlatCollator`) no example is predicted from the one before it.
"""

from __future__ import annotations

import inspect
import logging
import os
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from .memory import loss_chunk_rows
from .resolve import IGNORE_INDEX

log = logging.getLogger(__name__)

# fp32 logits of one chunk are at most this many bytes (plus their softmax, in place).
CHUNK_BYTES = 256 * 2**20
MIN_CHUNK = 64

__all__ = ["chunked_linear_cross_entropy", "chunked_loss_unsupported", "head_loss_sum",
           "label_count", "shifted_targets", "token_loss_sum"]


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """labels[:, 1:] padded with IGNORE_INDEX at the end: the target of every position."""
    pad = torch.full_like(labels[:, :1], IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


def default_chunk(n_tokens: int, vocab: int) -> int:
    return max(MIN_CHUNK, min(n_tokens, CHUNK_BYTES // (4 * max(1, vocab))))


def small_chunk(n_tokens: int, vocab: int, hidden: int) -> int:
    """Liger's chunk rule: tokens / ceil(vocab / hidden) rows, to the next power of two. Used
    where launches are free (inside a CUDA graph): many small chunks keep the loss' transient
    memory to what Liger's kernel takes, which is what the memory estimate models (with this
    very rule, memory.py's `loss_chunk_rows`)."""
    return loss_chunk_rows(n_tokens, vocab, hidden)


class _ChunkedLinearCE(torch.autograd.Function):
    """sum over valid rows of CE(hidden @ weight.T + bias, target), without the full logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, chunk: int, ignore_index: int,
                grad_hidden: bool, grad_weight: bool, skip_empty: bool = True):
        n = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        g_hidden = torch.zeros_like(hidden) if grad_hidden else None
        g_weight = torch.zeros_like(weight, dtype=torch.float32) if grad_weight else None
        for start in range(0, n, chunk):
            h = hidden[start:start + chunk]
            t = target[start:start + chunk]
            valid = t != ignore_index
            # Skipping a label-free chunk reads `valid` on the host; a captured CUDA graph
            # cannot, and computes the chunk's zero loss and zero gradient instead.
            if skip_empty and not bool(valid.any()):
                continue
            logits = F.linear(h, weight, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            safe_t = t.clamp_min(0)
            picked = logits.gather(1, safe_t[:, None]).squeeze(1)
            total += ((lse - picked) * valid).sum()
            if g_hidden is None and g_weight is None:
                continue
            # d(lse - logit_t)/d logits = softmax - onehot(t); rows without a label get 0.
            grad = logits.sub_(lse[:, None]).exp_()
            grad.scatter_add_(1, safe_t[:, None], grad.new_full((len(t), 1), -1.0))
            grad.mul_(valid[:, None])
            # Same rounding as autograd on the full path: the logits' gradient is cast back to
            # the matmul's dtype before it meets the weight.
            grad = grad.to(weight.dtype)
            if g_hidden is not None:
                g_hidden[start:start + chunk] = grad @ weight
            if g_weight is not None:
                g_weight += grad.t().float() @ h.float()
        ctx.save_for_backward(g_hidden if g_hidden is not None else torch.empty(0),
                              g_weight if g_weight is not None else torch.empty(0))
        ctx.flags = (g_hidden is not None, g_weight is not None, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        g_hidden, g_weight = ctx.saved_tensors
        has_h, has_w, w_dtype = ctx.flags
        dh = (g_hidden * grad_out.to(g_hidden.dtype)) if has_h else None
        dw = (g_weight * grad_out).to(w_dtype) if has_w else None
        return dh, dw, None, None, None, None, None, None, None


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                                 target: torch.Tensor, *, bias: torch.Tensor | None = None,
                                 chunk: int | None = None,
                                 ignore_index: int = IGNORE_INDEX,
                                 graph_safe: bool = False) -> torch.Tensor:
    """Sum of CE(hidden @ weight.T + bias, target) over rows whose target != ignore_index.

    `hidden` is (N, H), `weight` (V, H), `target` (N,). Logits are computed `chunk` rows at a
    time and upcast to fp32 for the softmax; gradients flow to `hidden` and, when it requires
    grad, to `weight` (accumulated in fp32). A frozen `bias` is added, never trained.
    """
    if bias is not None and bias.requires_grad:
        raise ValueError("chunked_linear_cross_entropy does not train a bias")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    target = target.reshape(-1)
    if not chunk:
        n, vocab = hidden.shape[0], weight.shape[0]
        chunk = small_chunk(n, vocab, hidden.shape[1]) if graph_safe else default_chunk(n, vocab)
    need = torch.is_grad_enabled()
    return _ChunkedLinearCE.apply(hidden, weight, bias, target, int(chunk), ignore_index,
                                  need and hidden.requires_grad, need and weight.requires_grad,
                                  not graph_safe)


# -- the model side -------------------------------------------------------------------------------


def _causal_lm(model: Any) -> Any:
    """The transformers *ForCausalLM inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def chunked_loss_unsupported(model: Any) -> str | None:
    """Why the chunked loss cannot reproduce this model's logits (None when it can)."""
    lm = _causal_lm(model)
    cfg = getattr(lm, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            return f"the model scales its logits ({attr})"
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if _host_head(lm) is not None:  # fast/host_head.py streams it into its own loss
        return None
    if type(head) is not torch.nn.Linear:  # a LoRA-wrapped or quantized head has no plain weight
        return f"the output head is a {type(head).__name__}, not a plain Linear"
    if head.bias is not None and head.bias.requires_grad:
        return "the output head has a trainable bias"
    try:
        lm.get_decoder()
    except Exception:  # noqa: BLE001 — any model without a decoder accessor
        return "the model has no get_decoder()"
    return None


def _liger_loss():
    """Liger's fused linear cross-entropy (sum reduction), or None where it cannot run."""
    if os.environ.get("LORAPOOL_LIGER_FLCE", "1") == "0":
        return None
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception:  # not installed, or no triton: the pure-torch version
        return None
    # Old releases subclassed CrossEntropyLoss and silently ignored `reduction` (always a mean).
    if issubclass(LigerFusedLinearCrossEntropyLoss, torch.nn.CrossEntropyLoss) or \
            "reduction" not in inspect.signature(LigerFusedLinearCrossEntropyLoss).parameters:
        return None
    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")


def _host_head(model: Any) -> Any:
    """The model's output head when the fast path moved it to host memory (fast/host_head.py's
    `HostHead`), else None. Known by its class name: importing the fast package here would make
    the loss depend on it, and it is optional (fastpath.py)."""
    head = getattr(_causal_lm(model), "get_output_embeddings", lambda: None)()
    if head is None or type(head).__name__ != "HostHead":
        return None
    return head


def label_count(labels: torch.Tensor) -> int:
    """The label tokens `token_loss_sum` sums over (read on the tensor's own device: pass the
    host copy of a batch to avoid a device sync)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def head_loss_sum(model: Any, hidden: torch.Tensor, target: torch.Tensor, *,
                  graph_safe: bool = False, chunk: int | None = None) -> torch.Tensor:
    """Summed CE of the model's output head over `hidden` (B, T, H) against shifted `target`
    (B, T), without the full logits (the chunked path of `token_loss_sum`).

    `graph_safe` skips Liger's kernel (it reads the label count on the host) and never reads a
    device value on the host, so a CUDA graph can capture it.
    """
    host = _host_head(model)
    if host is not None:
        if graph_safe:
            raise ValueError("the streamed host head cannot run inside a CUDA graph")
        return host.loss_sum(hidden.reshape(-1, hidden.shape[-1]), target.reshape(-1))
    head = _causal_lm(model).get_output_embeddings()
    # The model's own lm_head call would see the same dtypes; a mismatch only arises where a
    # norm was upcast and the head was not (then the head's dtype is what the logits use).
    hidden = hidden.reshape(-1, hidden.shape[-1]).to(head.weight.dtype)
    # A split model (model_split.py) ends on its last device while the batch's labels stay on
    # the first; on one device this is the same tensor.
    target = target.reshape(-1).to(hidden.device)
    with _on_device(hidden.device):
        if not graph_safe and hidden.is_cuda and not head.weight.requires_grad and \
                head.bias is None:
            liger = _liger_loss()
            if liger is not None:
                out = liger(head.weight, hidden, target)
                return out[0] if isinstance(out, tuple) else out
        return chunked_linear_cross_entropy(hidden, head.weight, target, bias=head.bias,
                                            chunk=chunk, graph_safe=graph_safe)


def _on_device(device: torch.device) -> Any:
    """The CUDA device `device` made current (Triton kernels launch on the current device)
    where it is another one, as on a split model's last device; else nothing to do."""
    if device.type == "cuda" and device.index is not None and \
            device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return nullcontext()


def token_loss_sum(model: Any, batch: dict[str, torch.Tensor], *, chunked: bool,
                   chunk: int | None = None, count: int | None = None) -> tuple[torch.Tensor, int]:
    """(summed next-token CE over the label tokens of `batch`, their count).

    `batch` is a collated micro-batch already on the model's device (labels included). With
    `chunked`, the model must pass `chunked_loss_unsupported(model) is None` (the caller checks
    once and falls back with a recorded reason). `count`, when the caller already knows it
    (`label_count` of the host batch), spares a device sync.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    target = shifted_targets(batch["labels"])
    if count is None:
        count = label_count(batch["labels"])
    if not chunked:
        logits = model(**inputs, use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                               target.reshape(-1).to(logits.device),
                               ignore_index=IGNORE_INDEX, reduction="sum")
        return loss, count
    hidden = _causal_lm(model).get_decoder()(**inputs, use_cache=False).last_hidden_state
    return head_loss_sum(model, hidden, target, chunk=chunk), count
