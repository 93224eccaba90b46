"""Data-parallel training under any `torch.distributed` launcher (torchrun, Ray Train, spawn).

Free of Ray: the trainer only needs a process group. `DistContext.from_environment()` finds
one — already initialised by the launcher (Ray Train does that), or described by the
`RANK`/`WORLD_SIZE`/`MASTER_ADDR` variables torchrun sets, in which case it initialises it
itself (NCCL on CUDA, gloo on the CPU) — and returns None for a single process, so the
single-process path does not change at all.

What makes an N-worker step equal to the 1-worker step (to float rounding):

- every rank draws the SAME global order (the seeded shuffle in loop.py) and takes its own
  contiguous share of each step's `batch_size` rows (`shard`). Shares follow `rows_per_rank`
  weights (a fast card takes more rows), split by largest remainder so they always add up;
- the loss of each micro-batch is divided by the label tokens of the WHOLE step, summed over
  all ranks (`sum_int` before any backward), so the gradients of all ranks add up to the
  1-worker gradient;
- the LoRA gradients are all-reduced with SUM (`reduce_gradients`) before unscaling,
  clipping and the optimizer step, so every rank applies the identical update.

Gradients travel in flat buckets (`BUCKET_BYTES`) of the reduce dtype: bf16 on NCCL (half the
bytes on an office network; the step is normalised by Adam's second moment, so bf16's 8-bit
mantissa on the gradient moves the update by well under its own noise), fp32 on gloo (the
CPU has no bf16 speed to gain, and the CPU tests check exact equality with one worker).
`LORAPOOL_GRAD_REDUCE_DTYPE=fp32|bf16` overrides the choice.

Checkpoints, events and the adapter come from rank 0 only; `should_stop` is a logical OR over
ranks; RunState's position is global, so a run resumes with any world size.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["BUCKET_BYTES", "DistContext", "reduce_dtype_for", "split_counts"]

BUCKET_BYTES = 25 * 2**20  # per all-reduce call; DDP's default bucket size


def split_counts(n: int, weights: Sequence[float]) -> list[int]:
    """`n` rows split in proportion to `weights` (largest remainder; ties go to lower ranks).

    Always sums to `n`; a rank may get 0 rows (a short last step): it still joins every
    collective with zero gradients.
    """
    if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"rows_per_rank weights must be >= 0 with a positive sum, not {weights}")
    total = float(sum(weights))
    exact = [n * w / total for w in weights]
    counts = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def reduce_dtype_for(backend: str) -> torch.dtype:
    """bf16 on NCCL, fp32 elsewhere (see the module docstring), unless the env var says."""
    forced = os.environ.get("LORAPOOL_GRAD_REDUCE_DTYPE", "").lower()
    if forced in ("fp32", "float32"):
        return torch.float32
    if forced in ("bf16", "bfloat16"):
        return torch.bfloat16
    return torch.bfloat16 if backend == "nccl" else torch.float32


@dataclass
class DistContext:
    """This process's place in a data-parallel run."""

    rank: int
    world_size: int
    backend: str
    local_rank: int = 0
    # Relative share of each step's rows per rank (None: equal shares).
    rows_per_rank: list[float] | None = None
    # This rank's own micro-batch (a card of its own size); None: the spec's.
    micro_batch_size: int | None = None
    reduce_dtype: torch.dtype = torch.float32
    group: object | None = None
    bytes_reduced: int = field(default=0)  # gradient bytes this rank sent to all-reduce, total

    @classmethod
    def from_environment(cls, *, device_kind: str = "auto",
                         rows_per_rank: Sequence[float] | None = None,
                         micro_batch_size: int | None = None) -> "DistContext | None":
        """The running process group, or one built from torchrun's env; None for one process.

        `device_kind` ("cuda", "cpu" or "auto") picks the backend when this call creates the
        group. On CUDA the process's GPU becomes `LOCAL_RANK`.
        """
        if not dist.is_available():
            return None
        if not dist.is_initialized():
            if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
                return None
            cuda = torch.cuda.is_available() and device_kind != "cpu"
            if cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if cuda else "gloo",
                                    timeout=datetime.timedelta(minutes=30))
        world = dist.get_world_size()
        if world <= 1:
            return None
        backend = str(dist.get_backend())
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if backend == "nccl" and torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        ctx = cls(rank=dist.get_rank(), world_size=world, backend=backend, local_rank=local_rank,
                  micro_batch_size=micro_batch_size, reduce_dtype=reduce_dtype_for(backend))
        ctx.set_rows_per_rank(rows_per_rank)
        return ctx

    # -- agreement ------------------------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _device(self) -> torch.device:
        # NCCL moves only CUDA tensors; gloo only CPU ones.
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" \
            else torch.device("cpu")

    def set_rows_per_rank(self, weights: Sequence[float] | None) -> None:
        """Use `weights` (one per rank, or this rank's own single weight, gathered from all)."""
        if weights is None:
            self.rows_per_rank = None
            return
        weights = [float(w) for w in weights]
        if len(weights) == 1 and self.world_size > 1:
            gathered = torch.zeros(self.world_size, dtype=torch.float64, device=self._device())
            gathered[self.rank] = weights[0]
            dist.all_reduce(gathered, group=self.group)
            weights = gathered.tolist()
        if len(weights) != self.world_size:
            raise ValueError(f"rows_per_rank has {len(weights)} weights for "
                             f"{self.world_size} ranks")
        split_counts(1, weights)  # validates
        self.rows_per_rank = weights

    def shard(self, indices: list[int]) -> list[int]:
        """This rank's contiguous share of one step's global row indices."""
        counts = split_counts(len(indices), self.rows_per_rank or [1.0] * self.world_size)
        start = sum(counts[: self.rank])
        return indices[start:start + counts[self.rank]]

    def counts(self, n: int) -> list[int]:
        return split_counts(n, self.rows_per_rank or [1.0] * self.world_size)

    def sum_float(self, *values: float) -> list[float]:
        """Element-wise sum over ranks (fp64, so label counts stay exact)."""
        t = torch.tensor(values, dtype=torch.float64, device=self._device())
        dist.all_reduce(t, group=self.group)
        return t.tolist()

    def sum_int(self, value: int) -> int:
        return int(round(self.sum_float(float(value))[0]))

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any (a stop, an out-of-memory retry)."""
        return self.sum_float(1.0 if flag else 0.0)[0] > 0

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    # -- gradients ------------------------------------------------------------------------------

    def reduce_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum every parameter's gradient over ranks, in flat buckets of `reduce_dtype`.

        A parameter without a gradient (a rank that got no rows this step) joins with zeros,
        so every rank sends the same layout. The result is written back in the grad's dtype.
        """
        params = [p for p in params if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        device = self._device()
        elem = torch.tensor([], dtype=self.reduce_dtype).element_size()
        bucket: list[torch.nn.Parameter] = []
        size = 0
        for p in params:
            bucket.append(p)
            size += p.numel() * elem
            if size >= BUCKET_BYTES:
                self._reduce_bucket(bucket, device)
                bucket, size = [], 0
        if bucket:
            self._reduce_bucket(bucket, device)

    def _reduce_bucket(self, bucket: list[torch.nn.Parameter], device: torch.device) -> None:
        flat = torch.cat([p.grad.detach().reshape(-1).to(device=device, dtype=self.reduce_dtype)
                          for p in bucket])
        self.bytes_reduced += flat.numel() * flat.element_size()
        dist.all_reduce(flat, group=self.group)
        offset = 0
        for p in bucket:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad).to(p.grad.dtype))
            offset += n


def gradient_bytes(params: Iterable[torch.nn.Parameter], dtype: torch.dtype) -> int:
    """Bytes one rank all-reduces per optimizer step for `params` in `dtype`."""
    elem = torch.tensor([], dtype=dtype).element_size()
    return sum(p.numel() for p in params if p.requires_grad) * elem


# -- a local launcher: N processes of this machine (tests; a multi-GPU box without torchrun) ----


def _spawned(rank: int, world_size: int, init_file: str, backend: str,
             kwargs: dict, rows_per_rank: list[float] | None,
             micro_batch_sizes: list[int] | None) -> None:
    from .loop import train

    torch.set_num_threads(1)  # N processes share this machine's cores
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    try:
        ctx = DistContext.from_environment(
            rows_per_rank=rows_per_rank,
            micro_batch_size=micro_batch_sizes[rank] if micro_batch_sizes else None)
        train(**kwargs, dist=ctx)
    finally:
        dist.destroy_process_group()


def launch_local(world_size: int, *, rows_per_rank: list[float] | None = None,
                 micro_batch_sizes: list[int] | None = None, backend: str = "gloo",
                 **train_kwargs) -> None:
    """Run `train(**train_kwargs)` in `world_size` spawned processes of this machine.

    Rank 0 writes `output_dir` (checkpoints, adapter); `on_event` is not supported here (it
    would run in a child process): read the output folder instead.
    """
    import tempfile

    import torch.multiprocessing as mp

    if "on_event" in train_kwargs or "should_stop" in train_kwargs:
        raise ValueError("launch_local runs train() in child processes: no callbacks")
    with tempfile.TemporaryDirectory(prefix="lorapool-dist-") as tmp:
        mp.spawn(_spawned, nprocs=world_size, join=True,
                 args=(world_size, f"{tmp}/init", backend, train_kwargs, rows_per_rank,
                       micro_batch_sizes))
