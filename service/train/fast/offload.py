"""Offloaded activation checkpointing for the decoder layers.

Plain activation checkpointing keeps one tensor per decoder layer alive between forward and
backward: the layer's input. At long sequences those inputs (layers x tokens x hidden) are the
largest thing left on the GPU. `OffloadedCheckpoint` runs a layer under `no_grad`, copies its
input to pinned host memory on a side CUDA stream (overlapping the next layers' compute) and
frees the GPU copy; in backward it brings the input back, recomputes the layer with the same
RNG and autocast state and backpropagates through it. While one layer recomputes, the input of
the layer before it is already copying back (the layers run backward in reverse order), so the
transfer hides behind compute.

Like the reentrant checkpoint of `torch.utils.checkpoint`, the layer's own parameters (the LoRA
A/B inside it) receive their gradients from an inner `torch.autograd.backward` call, which is
what `loss.backward()` needs (not `torch.autograd.grad`). On the CPU the "offload" keeps the
tensor where it is, so the same code path is exercised by the CPU tests.

`install_offloaded_checkpointing(model)` points every checkpointed transformers
`GradientCheckpointingLayer` at `offloaded_checkpoint`.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from typing import Any, Callable, Iterator, Optional

import torch

__all__ = ["HostSlots", "OffloadedCheckpoint", "capture_slots", "install_offloaded_checkpointing",
           "offloaded_checkpoint"]


@contextlib.contextmanager
def _forward_rng(cpu_rng: Optional[torch.Tensor], cuda_rng: Optional[torch.Tensor],
                 device: torch.device) -> Iterator[None]:
    """The RNG state the layer's forward saw, for its recompute (LoRA dropout draws the same
    mask); nothing to restore where none was saved (a captured forward: no dropout there)."""
    if cpu_rng is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, device)
        yield


class HostSlots:
    """Pinned host buffers that outlive one step, for the offloads of a captured CUDA graph.

    A graph replays its copies into the host addresses it saw at capture, so those buffers must
    stay owned for the graph's life: the caching host allocator would hand a freed one to
    someone else. Slot i holds the input of the i-th checkpointed layer of a forward; every
    graph of a run (each micro-batch shape) views the same slots, which is safe because graphs
    replay one at a time and a slot's contents only live from a layer's forward to its backward.
    """

    def __init__(self, max_numel: int) -> None:
        self.max_numel = int(max_numel)
        self._slots: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        self._next = 0

    def restart(self) -> None:
        """A new forward begins: its first layer takes slot 0."""
        self._next = 0

    def take(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        if numel > self.max_numel:
            raise RuntimeError(f"a checkpointed layer input of {numel} values exceeds the "
                               f"{self.max_numel} its host slot was sized for")
        key = (self._next, dtype)
        self._next += 1
        if key not in self._slots:
            self._slots[key] = torch.empty(self.max_numel, dtype=dtype, pin_memory=True)
        return self._slots[key][:numel].view(shape)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._slots.values())


# Set by fast/graphs.py while it captures: offloads then go to these persistent buffers.
_CAPTURE_SLOTS: Optional[HostSlots] = None


def capture_slots(slots: Optional[HostSlots]) -> None:
    """Route the offloads of the forward about to be captured to `slots` (None: stop)."""
    global _CAPTURE_SLOTS
    _CAPTURE_SLOTS = slots
    if slots is not None:
        slots.restart()


class _Stash:
    """One layer's saved input: on the device, or in pinned host memory while offloaded.

    No `record_stream`: the side stream's copy out is waited for by the compute stream before
    the device copy is dropped (`settle`, called when the next layer stashes, so the copy
    overlaps that layer's forward), and the copy back is written into memory allocated on the
    compute stream after the side stream waited for it. Every cross-stream use is an event
    wait, which is also what lets a CUDA graph capture the whole scheme.
    """

    def __init__(self, tensor: torch.Tensor, stream: Optional["torch.cuda.Stream"],
                 host: Optional[torch.Tensor] = None):
        self.device = tensor.device
        self.dtype = tensor.dtype
        self.requires_grad = tensor.requires_grad
        self.stream = stream
        self.done = False
        self.prev: Optional[weakref.ReferenceType] = None  # the stash of the layer before
        self._event = None
        self._back: Optional[torch.Tensor] = None
        self._device_copy: Optional[torch.Tensor] = None
        self._copied = None
        if stream is None:  # CPU: nothing to move
            self._host = tensor.detach()
            return
        current = torch.cuda.current_stream(tensor.device)
        self._host = host if host is not None else torch.empty(
            tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=True)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            self._host.copy_(tensor.detach(), non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record(stream)
        # Kept until `settle`: the allocator must not reuse it while the side stream reads it.
        self._device_copy = tensor.detach()

    def settle(self) -> None:
        """Drop the device copy once the compute stream has waited for the copy out."""
        if self._device_copy is None:
            return
        torch.cuda.current_stream(self.device).wait_event(self._copied)
        self._device_copy = None

    def prefetch(self) -> None:
        """Start copying the input back to the device on the side stream (idempotent)."""
        if self.stream is None or self._back is not None or self.done:
            return
        if self._device_copy is not None:  # never left the device (the last layer's input)
            self._back, self._device_copy = self._device_copy, None
            return
        current = torch.cuda.current_stream(self.device)
        # Allocated on the compute stream, where it is used and freed; the side stream first
        # waits for that stream, so it cannot write while earlier work still uses the memory.
        back = torch.empty(self._host.shape, dtype=self.dtype, device=self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            back.copy_(self._host, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(self.stream)
        self._back = back

    def fetch(self) -> torch.Tensor:
        """The input on its device, ready for use on the current stream."""
        if self.stream is None:
            return self._host
        self.prefetch()
        if self._event is not None:
            torch.cuda.current_stream(self.device).wait_event(self._event)
        return self._back

    def release(self) -> None:
        self.done = True
        self._back = None
        self._host = None
        self._device_copy = None


# The stash made by the most recent offloaded forward, so the next one can link to it: the
# backward of layer i prefetches the input of layer i-1.
_LAST: Optional[weakref.ReferenceType] = None
_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}


def _side_stream(device: torch.device) -> Optional["torch.cuda.Stream"]:
    if device.type != "cuda":
        return None
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


class OffloadedCheckpoint(torch.autograd.Function):
    """Checkpoint `run(hidden, *rest)` keeping only `hidden`, offloaded to pinned host memory."""

    @staticmethod
    def forward(ctx, run: Callable, hidden: torch.Tensor, *rest: Any):
        global _LAST
        device = hidden.device
        ctx.run = run
        ctx.rest = rest
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        # RNG (LoRA dropout) and autocast must be the same when the layer is replayed. Reading
        # the RNG state cannot be captured; graphs run only without dropout (fast/__init__.py).
        ctx.cpu_rng = None if capturing else torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(device) \
            if device.type == "cuda" and not capturing else None
        ctx.autocast = [(dt, torch.get_autocast_dtype(dt)) for dt in ("cuda", "cpu")
                        if torch.is_autocast_enabled(dt)]
        with torch.no_grad():
            out = run(hidden, *rest)
        prev = _LAST() if _LAST is not None else None
        slots = _CAPTURE_SLOTS if capturing else None
        host = slots.take(hidden.shape, hidden.dtype) if slots is not None else None
        stash = _Stash(hidden, _side_stream(device), host)
        if prev is not None and not prev.done:
            prev.settle()  # its copy out overlapped this layer's forward
            stash.prev = weakref.ref(prev)
        _LAST = weakref.ref(stash)
        ctx.stash = stash
        ctx.tuple_out = isinstance(out, tuple)
        return out

    @staticmethod
    def backward(ctx, *grads):
        stash: _Stash = ctx.stash
        hidden = stash.fetch()
        prev = stash.prev() if stash.prev is not None else None
        if prev is not None:
            prev.prefetch()  # overlaps with this layer's recompute and backward
        hidden = hidden.detach().requires_grad_(stash.requires_grad)
        with _forward_rng(ctx.cpu_rng, ctx.cuda_rng, stash.device), torch.enable_grad(), \
                _autocast(ctx.autocast):
            out = ctx.run(hidden, *ctx.rest)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads)
                 if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        stash.release()
        ctx.run = None  # drop the closure (and the layer kwargs it holds) early
        grad_hidden = hidden.grad if stash.requires_grad else None
        return (None, grad_hidden) + (None,) * len(ctx.rest)


class _autocast:
    """Re-enter the autocast regions that were active in forward."""

    def __init__(self, states: list[tuple[str, torch.dtype]]):
        self._ctxs = [torch.autocast(device_type=dt, dtype=dtype) for dt, dtype in states]

    def __enter__(self):
        for c in self._ctxs:
            c.__enter__()

    def __exit__(self, *exc):
        for c in reversed(self._ctxs):
            c.__exit__(*exc)
        return False


def offloaded_checkpoint(function: Callable, *args: Any, **kwargs: Any):
    """Drop-in for transformers' `_gradient_checkpointing_func(function, *args)`.

    The first argument is the layer input (hidden states). When it does not require grad the
    custom function would cut the graph to the layer's LoRA parameters, so that case (and any
    unexpected call shape) goes through torch's non-reentrant checkpoint instead.
    """
    if kwargs:
        function = _bind(function, kwargs)
    plain = not args or not isinstance(args[0], torch.Tensor) or not args[0].requires_grad
    # Only the first input is handed a gradient: any other input needing one takes torch's path.
    plain = plain or any(isinstance(a, torch.Tensor) and a.requires_grad for a in args[1:])
    if plain:
        from torch.utils.checkpoint import checkpoint

        return checkpoint(function, *args, use_reentrant=False)
    return OffloadedCheckpoint.apply(function, *args)


def _bind(function: Callable, kwargs: dict) -> Callable:
    def bound(*a):
        return function(*a, **kwargs)
    return bound


def install_offloaded_checkpointing(model: torch.nn.Module) -> int:
    """Route every checkpointed decoder layer of `model` through `offloaded_checkpoint`.

    Returns the number of layers changed (0 when gradient checkpointing is not enabled).
    """
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - transformers < 4.52
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            module._gradient_checkpointing_func = offloaded_checkpoint
            n += 1
    return n
