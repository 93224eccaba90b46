"""A frozen output head kept in (pinned) host memory and streamed to the GPU block by block.

The output head (lm_head) of a Llama-3 model is a (128,256 x hidden) bf16 table: 0.5 GiB for
1B, 0.75 GiB for 3B, 1 GiB for 8B. LoRA never trains it, yet it sits on the GPU for the whole
run; on an 8 GB card that is a tenth of the card. `HostHead` keeps it in pinned host memory
and the loss (`streamed_linear_cross_entropy`) sends it to the GPU `block_rows` vocabulary rows
at a time, two reusable device buffers deep: while block b is multiplied, block b+1 is copied
on a side stream. The math is that of loss.py's `_ChunkedLinearCE`, exact (no quantization):
fp32 logits per block, a running (online) logsumexp per token, the gradient wrt the hidden
states computed in forward (a second pass over the blocks) and only scaled in backward.

The price is bandwidth: the head crosses PCIe twice per micro-batch (once per pass), about
30 ms each way for 0.75 GiB on PCIe 4; the matmuls of a long micro-batch hide most of it.
The copies are paced by the host, so the streamed loss cannot be captured in a CUDA graph.

A model whose input embedding is tied to the head (Llama-3.2-1B/3B) keeps ONE host table:
`move_output_head_to_host` moves the input embedding to the host as well (fast/embeddings.py's
`HostEmbedding`, which gathers the step's rows there) and the head streams the same tensor.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from ..loss import _causal_lm
from ..resolve import IGNORE_INDEX
from .embeddings import HostEmbedding, set_input_embedding

log = logging.getLogger(__name__)

# The default block (`default_block_rows`): its fp32 logits are at most LOGITS_BLOCK_BYTES, one
# weight block at most WEIGHT_BLOCK_BYTES (two live on the device), and it is never under
# MIN_BLOCK_ROWS rows (smaller copies and matmuls waste the bus and the card more than they
# save) nor over the vocabulary. The head moves to the host only on a card that needs the
# room, so the blocks are sized for memory first: 60-120 blocks of a 128k vocabulary at seq
# 2048 cost launches, not memory. memory.py restates this rule (torch-free); a test checks.
LOGITS_BLOCK_BYTES = 64 * 2**20
WEIGHT_BLOCK_BYTES = 16 * 2**20
MIN_BLOCK_ROWS = 512

__all__ = ["HostHead", "default_block_rows", "host_head_of", "move_output_head_to_host",
           "streamed_linear_cross_entropy"]


def default_block_rows(n_rows: int, vocab: int, hidden_size: int, elem_size: int) -> int:
    """Vocabulary rows per block: min(V, max(512, min(64 MiB / (4 N), 16 MiB / (H elem)))).

    The fp32 logits of a block (N x rows x 4 bytes) stay within 64 MiB and a weight block
    (rows x H x elem bytes) within 16 MiB, so the loss holds ~2 weight blocks and one logits
    block on the device; the 512-row floor wins over both caps (at N > 32,768 tokens the
    logits block grows past 64 MiB rather than the blocks becoming tiny).
    """
    by_logits = LOGITS_BLOCK_BYTES // (4 * max(1, n_rows))
    by_weight = WEIGHT_BLOCK_BYTES // max(1, hidden_size * elem_size)
    return max(1, min(vocab, max(MIN_BLOCK_ROWS, min(by_logits, by_weight))))


class _BlockStreamer:
    """Yields (start, block) for the `block_rows`-row blocks of `weight`, each on `device`.

    Where the weight already is on `device` (the CPU in tests) a block is a slice. From the host
    to a CUDA device, block b+1 is copied on a side stream into one of two reusable device
    buffers while the compute stream works on block b: the compute stream waits for a block's
    copy (event `copied`), and a copy waits until the compute stream is done with the block it
    overwrites (event `released`, recorded when the caller asks for the next block). Iterating
    again streams the blocks again through the same buffers.
    """

    def __init__(self, weight: torch.Tensor, device: torch.device, block_rows: int) -> None:
        self.weight = weight
        self.device = device
        vocab = weight.shape[0]
        self.block_rows = max(1, min(int(block_rows), vocab))
        self.starts = list(range(0, vocab, self.block_rows))
        self.streams = weight.device != device and device.type == "cuda"
        if not self.streams:
            return
        self.copy_stream = torch.cuda.Stream(device)
        slots = min(2, len(self.starts))
        self.buffers = [torch.empty((self.block_rows, weight.shape[1]), dtype=weight.dtype,
                                    device=device) for _ in range(slots)]
        for buf in self.buffers:
            # Freed buffers must not be handed out again while a copy may still write them.
            buf.record_stream(self.copy_stream)
        self.copied = [torch.cuda.Event() for _ in range(slots)]
        self.released = [torch.cuda.Event() for _ in range(slots)]
        # The buffers come from the compute stream's pool, which may hand out memory that its
        # queued kernels still read: the first copies wait for them.
        self.copy_stream.wait_stream(torch.cuda.current_stream(device))

    def _rows(self, i: int) -> int:
        return min(self.block_rows, self.weight.shape[0] - self.starts[i])

    def _copy(self, i: int) -> None:
        slot = i % len(self.buffers)
        start, rows = self.starts[i], self._rows(i)
        with torch.cuda.stream(self.copy_stream):
            # An event never recorded is no wait: the first use of each buffer.
            self.copy_stream.wait_event(self.released[slot])
            self.buffers[slot][:rows].copy_(self.weight[start:start + rows], non_blocking=True)
            self.copied[slot].record(self.copy_stream)

    def __len__(self) -> int:
        return len(self.starts)

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        if not self.streams:
            for i, start in enumerate(self.starts):
                # A slice where the weight is on the device already; a plain copy to a
                # non-CUDA device (no streams there).
                yield start, self.weight[start:start + self._rows(i)].to(self.device)
            return
        compute = torch.cuda.current_stream(self.device)
        self._copy(0)
        for i, start in enumerate(self.starts):
            if i + 1 < len(self.starts):
                self._copy(i + 1)  # in flight while the caller computes with block i
            slot = i % len(self.buffers)
            compute.wait_event(self.copied[slot])
            try:
                yield start, self.buffers[slot][:self._rows(i)]
            finally:
                # Runs when the caller has queued its work on the block (it asks for the next
                # one, or stops): from here on the copy stream may overwrite the buffer.
                self.released[slot].record(compute)


def _picked(logits: torch.Tensor, target: torch.Tensor, start: int) -> torch.Tensor:
    """Each row's logit at its target where the target falls in this block, else 0."""
    local = target - start
    inside = (local >= 0) & (local < logits.shape[1])
    got = logits.gather(1, local.clamp(0, logits.shape[1] - 1)[:, None]).squeeze(1)
    return torch.where(inside, got, torch.zeros_like(got))


def _bias_block(bias: torch.Tensor | None, start: int, rows: int) -> torch.Tensor | None:
    return None if bias is None else bias[start:start + rows]


def _logsumexp_and_target(hidden: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None,
                          blocks: _BlockStreamer) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1: every row's logsumexp over the whole vocabulary and its target logit (fp32)."""
    n = hidden.shape[0]
    run_max = torch.full((n,), float("-inf"), dtype=torch.float32, device=hidden.device)
    run_sum = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    picked = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    for start, w in blocks:
        logits = F.linear(hidden, w, _bias_block(bias, start, w.shape[0])).float()
        picked += _picked(logits, target, start)
        new_max = torch.maximum(run_max, logits.amax(dim=1))
        # Rescale the sum so far to the new maximum: no exp ever sees a positive argument.
        run_sum = run_sum * torch.exp(run_max - new_max) + \
            logits.sub_(new_max[:, None]).exp_().sum(dim=1)
        run_max = new_max
    return run_max + run_sum.log(), picked


def _hidden_grad(hidden: torch.Tensor, target: torch.Tensor, lse: torch.Tensor,
                 bias: torch.Tensor | None, blocks: _BlockStreamer) -> torch.Tensor:
    """Pass 2: d(sum of lse - target logit)/d hidden = sum_b (softmax_b - onehot_b) @ w_b (fp32)."""
    grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for start, w in blocks:
        logits = F.linear(hidden, w, _bias_block(bias, start, w.shape[0])).float()
        grad = logits.sub_(lse[:, None]).exp_()
        local = target - start
        inside = (local >= 0) & (local < w.shape[0])
        grad.scatter_add_(1, local.clamp(0, w.shape[0] - 1)[:, None], -inside.float()[:, None])
        # Same rounding as _ChunkedLinearCE (and autograd on the full path): the logits'
        # gradient meets the weight in the weight's dtype; the sum over blocks stays fp32.
        grad_hidden += grad.to(w.dtype) @ w
    return grad_hidden


class _StreamedLinearCE(torch.autograd.Function):
    """sum over labelled rows of CE(hidden @ weight.T + bias, target), weight streamed in blocks."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, block_rows: int | None, ignore_index: int,
                need_grad: bool):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if need_grad else None
        # Only labelled rows go through the head (one host read of their count): prompts carry
        # no loss, and each row costs two passes over the vocabulary here.
        rows = (target != ignore_index).nonzero().squeeze(1)
        if rows.numel():
            h, t = hidden.index_select(0, rows), target.index_select(0, rows)
            vocab = weight.shape[0]
            if bool(((t < 0) | (t >= vocab)).any()):
                raise ValueError(f"a target is outside the vocabulary [0, {vocab})")
            rows_per_block = block_rows or default_block_rows(
                h.shape[0], vocab, weight.shape[1], weight.element_size())
            blocks = _BlockStreamer(weight, hidden.device, rows_per_block)
            lse, picked = _logsumexp_and_target(h, t, bias, blocks)
            total = (lse - picked).sum()
            if grad_hidden is not None:
                grad_hidden.index_copy_(0, rows, _hidden_grad(h, t, lse, bias, blocks)
                                        .to(hidden.dtype))
        ctx.save_for_backward(grad_hidden if grad_hidden is not None else torch.empty(0))
        ctx.has_grad = grad_hidden is not None
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad_hidden,) = ctx.saved_tensors
        dh = grad_hidden * grad_out.to(grad_hidden.dtype) if ctx.has_grad else None
        return dh, None, None, None, None, None, None


def streamed_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                                  target: torch.Tensor, *, bias: torch.Tensor | None = None,
                                  ignore_index: int = IGNORE_INDEX,
                                  block_rows: int | None = None) -> torch.Tensor:
    """Sum of CE(hidden @ weight.T + bias, target) over rows whose target != ignore_index.

    `hidden` is (N, H) (or (..., H)) on the compute device, `weight` the frozen (V, H) head on
    the host (pinned when the device is CUDA, else every copy is synchronous) or on the device,
    `target` (N,). The weight is read `block_rows` rows at a time (default:
    `default_block_rows`), twice when a gradient is needed; the (N, V) logits never exist.
    `hidden` is cast to the weight's dtype as the head's own matmul needs; its gradient comes
    back in its own dtype. A frozen `bias` (any device) is added per block.
    """
    if weight.requires_grad:
        raise ValueError("streamed_linear_cross_entropy computes no gradient for the weight: "
                         "a trained head stays on the device (loss.chunked_linear_cross_entropy)")
    if bias is not None and bias.requires_grad:
        raise ValueError("streamed_linear_cross_entropy does not train a bias")
    hidden = hidden.reshape(-1, hidden.shape[-1]).to(weight.dtype)
    target = target.reshape(-1).to(hidden.device)
    if bias is not None:
        bias = bias.to(hidden.device, non_blocking=True)
    need = torch.is_grad_enabled() and hidden.requires_grad
    return _StreamedLinearCE.apply(hidden, weight, bias, target, block_rows, ignore_index, need)


class _StreamedLinear(torch.autograd.Function):
    """hidden @ weight.T + bias with the weight streamed in blocks; gradient wrt hidden only."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, block_rows: int | None):
        flat = hidden.reshape(-1, hidden.shape[-1])
        vocab = weight.shape[0]
        rows = block_rows or default_block_rows(flat.shape[0], vocab, weight.shape[1],
                                                weight.element_size())
        out = flat.new_empty((flat.shape[0], vocab))
        for start, w in _BlockStreamer(weight, flat.device, rows):
            out[:, start:start + w.shape[0]] = F.linear(flat, w, _bias_block(bias, start,
                                                                              w.shape[0]))
        # The host table is not saved for backward (no copy, no version bump to track).
        ctx.weight, ctx.rows, ctx.shape = weight, rows, hidden.shape
        return out.reshape(*hidden.shape[:-1], vocab)

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_hidden = torch.zeros((g.shape[0], ctx.shape[-1]), dtype=torch.float32,
                                  device=g.device)
        for start, w in _BlockStreamer(ctx.weight, g.device, ctx.rows):
            grad_hidden += g[:, start:start + w.shape[0]].to(w.dtype) @ w
        return grad_hidden.to(grad_out.dtype).reshape(ctx.shape), None, None, None


def _to_host(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    """`tensor` in host memory (pinned if `pin`): the same tensor object where it already is,
    so a table shared with a tied embedding stays one tensor."""
    host = tensor if tensor.device.type == "cpu" and not tensor.requires_grad else \
        tensor.detach().to("cpu")
    return host.pin_memory() if pin and not host.is_pinned() else host


class HostHead(torch.nn.Module):
    """A frozen `nn.Linear` output head whose weight (and bias) live in host memory.

    `forward` still returns the full logits (blocks streamed to the hidden states' device) for
    the code that asks for logits (generation, the full-logits evaluation); the training loss
    goes through `loss_sum`, which never builds them. A bias is supported (kept on the host,
    a few hundred KiB sent whole per call and added per block); a trained weight or bias is
    refused (nothing here computes their gradient).
    """

    def __init__(self, head: torch.nn.Linear, *, pin: bool,
                 host_weight: torch.Tensor | None = None, block_rows: int | None = None) -> None:
        super().__init__()
        if head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad):
            raise ValueError("HostHead holds a frozen head: freeze its weight and bias first")
        if host_weight is None:
            host_weight = _to_host(head.weight, pin)
        else:
            if host_weight.shape != head.weight.shape or host_weight.dtype != head.weight.dtype:
                raise ValueError(f"host_weight is {tuple(host_weight.shape)} {host_weight.dtype}, "
                                 f"the head {tuple(head.weight.shape)} {head.weight.dtype}")
            if host_weight.device.type != "cpu":
                raise ValueError("host_weight must be in host memory")
            # Shared as it is (a tied embedding's table); pinned only if it is not already.
            host_weight = _to_host(host_weight, pin)
        # Buffers, not parameters: nothing trains them, and model.to()/state_dict leave them be.
        self.register_buffer("weight", host_weight, persistent=False)
        self.register_buffer("bias", None if head.bias is None else _to_host(head.bias, pin),
                             persistent=False)
        self.out_features, self.in_features = host_weight.shape
        self.pinned = pin
        self.block_rows = block_rows

    def _bias_on(self, device: torch.device) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(device, non_blocking=True)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.to(self.weight.dtype)
        return _StreamedLinear.apply(hidden, self.weight, self._bias_on(hidden.device),
                                     self.block_rows)

    def loss_sum(self, hidden: torch.Tensor, target: torch.Tensor, *,
                 ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
        """Summed CE of this head over `hidden` (..., H) against `target` (...): the streamed loss."""
        return streamed_linear_cross_entropy(hidden, self.weight, target,
                                             bias=self._bias_on(hidden.device),
                                             ignore_index=ignore_index,
                                             block_rows=self.block_rows)

    def extra_repr(self) -> str:
        where = "pinned host memory" if self.pinned else "host memory"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, on host ({where}), streamed in blocks")

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module's signature
        # model.to(...) / .cuda() / .half() must not pull the table back onto the GPU.
        return self


# -- the model side -------------------------------------------------------------------------------


def _output_head(hf: Any) -> Any:
    get_out = getattr(hf, "get_output_embeddings", None)
    return get_out() if callable(get_out) else None


def host_head_of(model: Any) -> HostHead | None:
    """The model's output head when it is a `HostHead` (the loss must stream it), else None."""
    head = _output_head(_causal_lm(model))
    return head if isinstance(head, HostHead) else None


def _equal_tables(device_weight: torch.Tensor, host_table: torch.Tensor) -> bool:
    """Whether the head's weight holds exactly the host table (compared block by block, so no
    second full host copy is made; a different table stops at its first block)."""
    if device_weight.shape != host_table.shape or device_weight.dtype != host_table.dtype:
        return False
    step = max(1, WEIGHT_BLOCK_BYTES // max(1, device_weight[0].numel() *
                                            device_weight.element_size()))
    for start in range(0, device_weight.shape[0], step):
        if not torch.equal(device_weight[start:start + step].to("cpu"),
                           host_table[start:start + step]):
            return False
    return True


def _shared_table(hf: Any, head: torch.nn.Linear, pin: bool) -> torch.Tensor | None:
    """The host table a tied input embedding and the head share (None: the head is untied).

    Tied and still a plain embedding on the device: it moves to the host (`HostEmbedding`) and
    its table is returned. Already a `HostEmbedding` (its table is a copy, so identity no longer
    tells): its table is returned when it holds exactly the head's values.
    """
    get_in = getattr(hf, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    if isinstance(emb, torch.nn.Embedding) and emb.weight is head.weight:
        host_emb = HostEmbedding(emb, head.weight.device)
        if pin and not host_emb.weight.is_pinned():
            host_emb.weight = host_emb.weight.pin_memory()
        set_input_embedding(hf, host_emb)
        return host_emb.weight
    if isinstance(emb, HostEmbedding) and _equal_tables(head.weight, emb.weight):
        if pin and not emb.weight.is_pinned():
            emb.weight = emb.weight.pin_memory()  # one pinned table, still shared
        return emb.weight
    return None


def move_output_head_to_host(model: Any, *, allow_cpu: bool = False,
                             block_rows: int | None = None) -> str:
    """Swap a frozen CUDA `nn.Linear` output head for a `HostHead`; what was done, for the events.

    A tied input embedding goes to the host with it (one pinned table for both). Refused, with
    the reason ("off: ..."), where it cannot help. `allow_cpu` runs the same swap for a head on
    the CPU, unpinned (tests: nothing is saved there, CPU builds have no pinned memory).
    """
    hf = _causal_lm(model)
    head = _output_head(hf)
    if isinstance(head, HostHead):
        return "off: the output head already is in host memory"
    if type(head) is not torch.nn.Linear:  # a LoRA-wrapped or quantized head has no plain weight
        return f"off: the output head is a {type(head).__name__}, not a plain nn.Linear"
    if head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad):
        return "off: the output head is trained"
    device = head.weight.device
    if device.type != "cuda" and not (allow_cpu and device.type == "cpu"):
        return f"off: the output head is not on CUDA ({device.type}: nothing to save)"
    pin = device.type == "cuda"
    size = head.weight.numel() * head.weight.element_size()
    table = _shared_table(hf, head, pin)
    host = HostHead(head, pin=pin, host_weight=table, block_rows=block_rows)
    hf.set_output_embeddings(host)
    _release(model, head.weight, host.weight)
    del head
    if pin:
        torch.cuda.empty_cache()
    where = "pinned host memory" if pin else "host memory"
    tied = ", shared with the tied input embedding" if table is not None else ""
    return f"output head ({size / 2**20:.0f} MiB) in {where}{tied}"


def _release(model: Any, old: torch.Tensor, host: torch.Tensor) -> None:
    """Free the storage of the head's old weight once no module of `model` holds it and the
    host table is a copy of it. Dropping the module is not always enough: on an H100 a 3B
    model's head, loaded onto the card and swapped for a HostHead, stayed allocated to the
    end of training (bench/train_speed.py --memory-trace), held by something not yet found;
    emptying the Parameter's storage frees the card where that something holds the Parameter.
    (The trainer's loader no longer puts a streamed head on the card at all: model.py's
    "tables_on_host".)"""
    if host.data_ptr() == old.data_ptr() or any(p is old for p in model.parameters()):
        return
    old.data = torch.empty(0, dtype=old.dtype, device=old.device)


def keep_tables_on_host(model: Any, device: torch.device) -> str:
    """Before a model loaded on the CPU moves to `device`: its frozen input embedding and output
    head become `HostEmbedding` / `HostHead` (one table when tied, pinned for a CUDA device),
    whose `_apply` keeps them where they are, so the move takes everything else and the card
    never holds the tables, not even while the model loads. What was done, for the events."""
    hf = _causal_lm(model)
    get_in = getattr(hf, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    head = _output_head(hf)
    done = []
    table = None
    tied = head is not None and emb is not None and getattr(head, "weight", None) is \
        getattr(emb, "weight", None)
    if isinstance(emb, torch.nn.Embedding) and not emb.weight.requires_grad and \
            emb.weight.device.type == "cpu":
        host_emb = HostEmbedding(emb, device)
        set_input_embedding(hf, host_emb)
        table = host_emb.weight if tied else None
        done.append(f"input embedding ({_mib(emb.weight)} MiB)")
    if type(head) is torch.nn.Linear and not head.weight.requires_grad and \
            (head.bias is None or not head.bias.requires_grad) and head.weight.device.type == "cpu":
        hf.set_output_embeddings(HostHead(head, pin=device.type == "cuda", host_weight=table))
        done.append("output head" + (" (the same table)" if table is not None
                                     else f" ({_mib(head.weight)} MiB)"))
    if not done:
        return "nothing kept on the host (no frozen CPU tables)"
    return " and ".join(done) + " kept in host memory at load"


def _mib(t: torch.Tensor) -> int:
    return round(t.numel() * t.element_size() / 2**20)
