"""A micro-batch's forward, loss and backward replayed as one CUDA graph.

At micro-batch 1 a QLoRA step of a small model is bound by the host, not the GPU: an H200 runs
the 1B shape's kernels in ~55 ms of a ~190 ms step, the rest is Python and kernel launches
(thousands per step: dequantisation, matmuls, norms, the checkpointed recompute). A CUDA graph
records those launches once and replays them with a single call, so the host cost of the
forward and backward all but disappears; what is left on the host is the optimizer step and
the copy of the next batch into the graph's input buffers.

`GraphedSteps` owns the graphs of one run, one per micro-batch shape (rows x bucketed length):

- Only unpacked examples are graphed (rows from `FlatCollator` with padding_free; a flat row
  it made of several examples is split back into them). Every row is padded at its end to a
  length bucket (multiples of 64 tokens up to 512, then of 256) so a handful of graphs cover
  every length; the padding tokens carry no label and, attention being causal, no real token
  sees them: the loss and gradients are those of the unpadded rows. Packed data (several
  documents per row) runs eagerly: its per-document attention is shaped by the data.
- The run's first graphed batch runs eagerly on the capture stream (it warms up cuBLAS, cuDNN
  and Triton's compiled kernels); every later batch of a new shape is captured and replayed at
  once, and every batch of a known shape replays. A shape whose capture fails is warmed up
  eagerly and tried once more.
- The graph's inputs are static buffers the batch is copied into: the input embeddings (looked
  up outside the graph, so a host-resident embedding table works), position ids, shifted
  targets and the loss scale 1 / (label tokens of the optimizer step). Gradients accumulate in
  place into the LoRA parameters' `.grad` buffers, which must therefore stay the same tensors:
  `GraphedSteps` re-seats them before each replay if anything replaced them.
- What the capture cannot contain is kept out of it: the loss is the chunked cross-entropy
  without Liger (whose kernel reads the label count on the host), the documents are declared
  rather than read from the device (fast/attention.py), activation offload writes to pinned host
  buffers that live as long as the graphs (fast/offload.py `HostSlots`), and the fused LoRA
  modules' per-step weight casts are dropped before and after every capture so that a graph
  never reads a cast made outside it.
- A capture that fails again after a warm-up turns graphs off for the rest of the run
  (`disabled` says why; the trainer reports it as an event) and the batch runs eagerly;
  nothing is lost.

All graphs share one memory pool (they never run at the same time), so the graphs of several
lengths cost about what the longest one needs.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ..loss import head_loss_sum, shifted_targets, small_chunk
from ..resolve import IGNORE_INDEX
from . import attention, offload

log = logging.getLogger(__name__)

MAX_GRAPHS = 16  # shapes beyond this many run eagerly


def bucket_length(n: int, cap: int) -> int:
    """The graphed length of an n-token row: n rounded up to a multiple of 64 up to 512 tokens
    and of 256 beyond, never past `cap` (the run's longest row) unless n itself is."""
    step = 64 if n <= 512 else 256
    return max(n, min(int(math.ceil(n / step) * step), cap))


def single_document_rows(position_ids: torch.Tensor) -> bool:
    """Whether every row of a (B, T) host tensor is one document: positions 0, 1, ..., T-1."""
    ramp = torch.arange(position_ids.shape[1], dtype=position_ids.dtype)
    return bool((position_ids == ramp).all())


def pad_batch(batch: dict[str, torch.Tensor], length: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """A one-document-per-row host batch padded at the end to `length`: positions keep
    counting, labels are IGNORE_INDEX, so no real token's loss or gradient changes."""
    ids, labels = batch["input_ids"], batch["labels"]
    b, t = ids.shape
    if t == length:
        return batch
    extra = length - t
    return {
        "input_ids": torch.cat([ids, ids.new_full((b, extra), pad_id)], dim=1),
        "labels": torch.cat([labels, labels.new_full((b, extra), IGNORE_INDEX)], dim=1),
        "position_ids": torch.arange(length, dtype=torch.long).expand(b, length).contiguous(),
    }


def split_flat_row(batch: dict[str, torch.Tensor]) -> Optional[dict[str, torch.Tensor]]:
    """A (1, T) flat row of several one-document examples as a (k, L) batch, each example
    padded at its end to the longest (positions counting on, labels IGNORE_INDEX); None when
    it is not such a row."""
    pos = batch["position_ids"]
    if pos.shape[0] != 1:
        return None
    row = pos[0]
    starts = (row == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        return None
    ends = starts[1:] + [int(row.shape[0])]
    length = max(e - s for s, e in zip(starts, ends))
    pieces = []
    for s, e in zip(starts, ends):
        if not bool((row[s:e] == torch.arange(e - s, dtype=row.dtype)).all()):
            return None  # not one document counting from 0: leave it to the eager path
        one = {"input_ids": batch["input_ids"][:, s:e], "labels": batch["labels"][:, s:e],
               "position_ids": row[None, s:e]}
        pieces.append(pad_batch(one, length))
    return {k: torch.cat([p[k] for p in pieces]) for k in ("input_ids", "labels",
                                                             "position_ids")}


class _EagerRunner:
    """Runs `fn` directly: the stand-in used where no CUDA graph can exist (the CPU tests of
    this module's bookkeeping: padding, static buffers, gradient accumulation, fallback).
    A CUDA graph replays exactly the work `fn` did at capture, on the same buffers."""

    def __init__(self, fn: Callable[[], torch.Tensor]) -> None:
        self.fn = fn

    def replay(self) -> torch.Tensor:
        return self.fn()


class _OnStream:
    """Run on `stream`, ordered after and before the current stream's work."""

    def __init__(self, stream: "torch.cuda.Stream", device: torch.device) -> None:
        self.stream, self.device = stream, device
        self._ctx: Any = None

    def __enter__(self) -> None:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        self._ctx = torch.cuda.stream(self.stream)
        self._ctx.__enter__()

    def __exit__(self, *exc: Any) -> bool:
        self._ctx.__exit__(*exc)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return False


@dataclass
class _Graph:
    runner: Any  # torch.cuda.CUDAGraph, or _EagerRunner on the CPU
    embeds: torch.Tensor  # (B, L, H) leaf that requires grad, so checkpointed layers get one
    position_ids: torch.Tensor
    target: torch.Tensor
    scale: torch.Tensor  # () fp32: 1 / label tokens of the optimizer step
    loss: Optional[torch.Tensor] = None  # the graph's static output


class GraphedSteps:
    """The CUDA graphs of one run's micro-batches (see the module docstring).

    `model` is the peft-wrapped causal LM with the fast path applied, `params` its trainable
    parameters, `max_tokens` the most tokens a micro-batch can hold (rows x max_seq_len).
    """

    def __init__(self, model: Any, params: list[torch.nn.Parameter], device: torch.device, *,
                 max_tokens: int, hidden_size: int, max_graphs: int = MAX_GRAPHS,
                 use_cuda_graphs: Optional[bool] = None) -> None:
        self.model = model
        self.params = list(params)
        self.device = torch.device(device)
        self.max_tokens = int(max_tokens)
        self.hidden_size = int(hidden_size)
        self.max_graphs = max_graphs
        self.cuda = self.device.type == "cuda" if use_cuda_graphs is None else use_cuda_graphs
        self.disabled: Optional[str] = None
        self.captured = 0
        self.replays = 0
        self._warmed: set[tuple[int, int]] = set()  # shapes that ran eagerly on the capture stream
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._grads: Optional[list[torch.Tensor]] = None
        self._pool = None
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.slots = offload.HostSlots(self.max_tokens * self.hidden_size) if self.cuda else None
        self._flat: dict[str, torch.Tensor] = {}
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._decoder = lm.get_decoder()
        self._embedding = lm.get_input_embeddings()
        # The loss' chunk is sized for the longest micro-batch (the size the memory estimate
        # allows), not for each bucket: a short row then takes a few chunks instead of
        # ceil(vocab / hidden) of them, each reading the whole output head.
        head = lm.get_output_embeddings()
        vocab = head.weight.shape[0] if head is not None else 1
        self._chunk = small_chunk(self.max_tokens, vocab, self.hidden_size)

    # -- which batches --------------------------------------------------------------------------

    def prepare(self, batch: dict[str, torch.Tensor]) -> Optional[dict[str, torch.Tensor]]:
        """The host batch padded to its bucket, or None when it is not graphed (eagerly run).

        A flat row that `FlatCollator` made of several unpacked examples (graphs never run on
        packed data) is split back into its examples, each padded to the bucket of the
        longest: the micro-batches hold examples of similar length (the loop sorts them), so
        the padding is small next to the launches the graph saves."""
        if self.disabled is not None or "attention_mask" in batch or "position_ids" not in batch:
            return None
        pos = batch["position_ids"]
        if pos.device.type != "cpu" or pos.dim() != 2:
            return None
        if not single_document_rows(pos):
            batch = split_flat_row(batch)
            if batch is None:
                return None
            pos = batch["position_ids"]
        rows, n = pos.shape
        cap = max(n, self.max_tokens // max(1, rows))
        length = bucket_length(n, cap)
        if rows * length > self.max_tokens:
            return None
        return pad_batch(batch, length)

    # -- running --------------------------------------------------------------------------------

    def run(self, batch: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        """Forward, loss and backward of a `prepare`d batch with the loss scaled by `scale`;
        gradients accumulate into the parameters' `.grad`. Returns the unscaled summed loss
        (a device scalar of its own)."""
        key = tuple(batch["input_ids"].shape)
        graph = self._graphs.get(key)
        if graph is None:
            if self.disabled is not None or len(self._graphs) >= self.max_graphs:
                return self._eager(batch, scale, warmup=False)
            if not self._graphs and not self._warmed:
                # What outlives the warm-up is allocated before it, so the blocks the warm-up
                # frees are whole segments that can go back before the capture.
                self._seat_grads()
                self._buffers(key, self._dtype())
                # Nothing captured yet: one eager run first warms up cuBLAS, cuDNN and
                # Triton's kernels on the capture stream. Later shapes are captured at once,
                # so no eager step's working memory sits next to the graphs' pool.
                self._warmed.add(key)
                return self._eager(batch, scale, warmup=True)
            try:
                graph = self._capture(key, batch)
            except Exception as exc:  # noqa: BLE001 - a capture failure must not stop the run
                why = (f"capture failed ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0][:300] if str(exc) else ''})")
                if key in self._warmed:
                    self._disable(why)
                else:  # perhaps a first-use initialisation: warm this shape up, then retry once
                    self._warmed.add(key)
                    self._reset_after_failure()
                    log.info("CUDA graph for %s x %s: %s; retrying after a warm-up", *key, why)
                return self._eager(batch, scale, warmup=True)
        self._seat_grads()
        self._fill(graph, batch, scale)
        if self.cuda:
            graph.runner.replay()
            out = graph.loss
        else:
            out = graph.loss = graph.runner.replay()
        self.replays += 1
        return out.detach().clone()

    def _reset_after_failure(self) -> None:
        from . import lora, lora_group

        lora.drop_step_caches()
        lora_group.reset_groups(self.model)
        attention.set_known_bounds(None)
        offload.capture_slots(None)
        if self.cuda:
            self._repair_rng()

    def _repair_rng(self) -> None:
        """A capture that failed never ran its end: the device's default generator still
        believes it is being captured, and every later random draw on the card raises
        ("Offset increment outside graph capture"). A clone of its state (same seed and
        offset) is not in capture; put it back in place."""
        try:
            index = self.device.index if self.device.index is not None else \
                torch.cuda.current_device()
            gen = torch.cuda.default_generators[index]
            gen.graphsafe_set_state(gen.clone_state())
        except Exception as exc:  # noqa: BLE001 - older torch: nothing more to do
            log.warning("could not reset the CUDA generator after a failed capture: %s", exc)

    def eager_stream(self) -> Any:
        """A context that runs an ungraphed micro-batch on the graphs' stream (a no-op on the
        CPU): the accumulate-grad nodes an eager backward leaves behind then belong to the
        stream the next capture runs on, which a capture requires."""
        if not self.cuda:
            return contextlib.nullcontext()
        return _OnStream(self._stream, self.device)

    def _disable(self, why: str) -> None:
        self.disabled = why
        self._graphs.clear()
        self._reset_after_failure()
        log.warning("CUDA graphs off for this run: %s", why)

    @staticmethod
    @contextlib.contextmanager
    def _documents(rows: int, length: int) -> Any:
        """Declare one document per row to the attention while the block runs (a capture
        cannot read them from the device)."""
        attention.set_known_bounds([[(0, length)] for _ in range(rows)])
        try:
            yield
        finally:
            attention.set_known_bounds(None)

    def _forward_backward(self, embeds: torch.Tensor, position_ids: torch.Tensor,
                          target: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """What a graph holds: decoder, chunked loss, scaled backward; the loss (detached)."""
        hidden = self._decoder(inputs_embeds=embeds, position_ids=position_ids,
                               use_cache=False).last_hidden_state
        loss = head_loss_sum(self.model, hidden, target, graph_safe=True, chunk=self._chunk)
        (loss * scale).backward()
        return loss.detach()

    @torch.no_grad()
    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        weight = getattr(self._embedding, "weight", None)
        on_host = weight is not None and weight.device.type == "cpu"
        ids = input_ids if on_host else input_ids.to(self.device, non_blocking=True)
        return self._embedding(ids)

    def _eager(self, batch: dict[str, torch.Tensor], scale: float, *, warmup: bool) -> torch.Tensor:
        """The same computation without a graph (a shape's first batch, or after a failure)."""
        rows, length = batch["input_ids"].shape
        embeds = self._embed(batch["input_ids"]).detach().requires_grad_(True)
        pos = batch["position_ids"].to(self.device, non_blocking=True)
        target = shifted_targets(batch["labels"]).to(self.device, non_blocking=True)
        scale_t = torch.tensor(scale, dtype=torch.float32, device=self.device)
        # A warm-up runs on the capture stream: cuBLAS workspaces and the like are per stream.
        on_stream = _OnStream(self._stream, self.device) if self.cuda and warmup \
            else contextlib.nullcontext()
        with self._documents(rows, length), on_stream:
            return self._forward_backward(embeds, pos, target, scale_t)

    # -- capture --------------------------------------------------------------------------------

    def _static(self, name: str, shape: tuple[int, ...], per_token: int,
                dtype: torch.dtype) -> torch.Tensor:
        """A view of the run's flat buffer `name`, sized for the longest micro-batch and shared
        by every graph (they replay one at a time)."""
        flat = self._flat.get(name)
        if flat is None:
            flat = self._flat[name] = torch.zeros(self.max_tokens * per_token, dtype=dtype,
                                                  device=self.device)
        numel = math.prod(shape)
        return flat[:numel].view(shape)

    def _buffers(self, key: tuple[int, int], dtype: torch.dtype) -> _Graph:
        rows, length = key
        embeds = self._static("embeds", (rows, length, self.hidden_size), self.hidden_size, dtype)
        embeds.requires_grad_(True)
        return _Graph(runner=None, embeds=embeds,
                      position_ids=self._static("position_ids", key, 1, torch.long),
                      target=self._static("target", key, 1, torch.long),
                      scale=torch.zeros((), dtype=torch.float32, device=self.device))

    def _seat_grads(self) -> None:
        """Make every parameter's `.grad` the buffer the graphs accumulate into, keeping what
        it held (an optimizer's zero_grad(set_to_none=True) or an eager backward replaces it)."""
        if self._grads is None:
            # Grads that already stay put (flat_params.py's views of one buffer) are the
            # buffers; a parameter without one gets its own.
            self._grads = [p.grad if p.grad is not None else torch.zeros_like(p)
                           for p in self.params]
        for p, buf in zip(self.params, self._grads):
            g = p.grad
            if g is buf:
                continue
            if g is None:
                buf.zero_()
            else:
                buf.copy_(g)
            p.grad = buf

    @torch.no_grad()
    def _fill(self, graph: _Graph, batch: dict[str, torch.Tensor], scale: float) -> None:
        graph.embeds.copy_(self._embed(batch["input_ids"]))
        graph.position_ids.copy_(batch["position_ids"], non_blocking=True)
        graph.target.copy_(shifted_targets(batch["labels"]), non_blocking=True)
        graph.scale.fill_(scale)

    def _dtype(self) -> torch.dtype:
        weight = getattr(self._embedding, "weight", None)
        return weight.dtype if weight is not None else torch.bfloat16

    def _capture(self, key: tuple[int, int], batch: dict[str, torch.Tensor]) -> _Graph:
        from . import lora, lora_group

        graph = self._buffers(key, self._dtype())
        self._seat_grads()
        self._fill(graph, batch, 1.0)
        fn = lambda: self._forward_backward(graph.embeds, graph.position_ids,  # noqa: E731
                                            graph.target, graph.scale)
        if not self.cuda:
            graph.runner = _EagerRunner(self._with_documents(fn, key))
            self._graphs[key] = graph
            self.captured += 1
            return graph
        # Nothing made outside the graph may be read inside it: every cast is recomputed.
        lora.drop_step_caches()
        # The warm-up's freed blocks would stay reserved next to the graph's own pool: hand
        # them back first, so the card holds one step's working memory, not two.
        torch.cuda.empty_cache()
        lora_group.reset_groups(self.model)
        cuda_graph = torch.cuda.CUDAGraph()
        offload.capture_slots(self.slots)
        try:
            with self._documents(*key), torch.cuda.graph(
                    cuda_graph, pool=self._pool, stream=self._stream,
                    capture_error_mode="thread_local"):
                graph.loss = fn()
        finally:
            offload.capture_slots(None)
            # The casts cached during capture live in the graph's pool, which other graphs
            # reuse: nothing outside the graph may keep reading them.
            lora.drop_step_caches()
            lora_group.reset_groups(self.model)
        if self._pool is None:
            self._pool = cuda_graph.pool()
        graph.runner = cuda_graph
        self._graphs[key] = graph
        self.captured += 1
        log.info("captured a CUDA graph for micro-batches of %d x %d tokens", *key)
        return graph

    def _with_documents(self, fn: Callable[[], torch.Tensor],
                        key: tuple[int, int]) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with self._documents(*key):
                return fn()
        return run

    def summary(self) -> dict[str, Any]:
        """For the run's metrics: graphs captured, replays, and why graphs went off (if so)."""
        out: dict[str, Any] = {"graphs": self.captured, "replays": self.replays}
        if self.disabled:
            out["disabled"] = self.disabled
        if self.slots is not None:
            out["host_slot_bytes"] = self.slots.nbytes
        return out
