"""The QLoRA training loop: `train(spec, data, output_dir, ...)`.

One optimizer step takes the next `spec.batch_size` examples of the epoch's shuffled order
(a `torch.Generator` seeded with `spec.seed + epoch`, so a resumed run can skip straight to its
position), splits them into micro-batches, and accumulates gradients. The loss of every
micro-batch is a *sum* over its label tokens divided by the label tokens of the whole step, so
the update is the same however the step is split: that is what lets the out-of-memory fallback
halve the micro-batch (and double the accumulation) mid-run without changing the result.

After each step the loop polls `should_stop` (preemption, cancel: checkpoint and return
"stopped"), evaluates every `eval_every` steps and checkpoints every `checkpoint_every` steps.
A finished run writes `output_dir/adapter/` (see output.py).

Data-parallel (distributed.py): under a `torch.distributed` launcher every rank runs this same
loop on its share of each step's rows; the hooks marked "dist:" below sum the step's label
count and the gradients over ranks, agree on stopping and out-of-memory retries, and leave
checkpoints, events and the adapter to rank 0. With one process `self.dist` is None and none
of them runs.

The recipe's parts come from builders, so the fast path plugs in instead of branching here:
`build_model` (model.py: model, tokenizer, fast plan — reported in a "status" event), the plan's
`Collator` (collate.py), `token_loss_sum` (loss.py, shared with evaluation), `RunState`
(runstate.py: the position and metrics, exactly what a checkpoint saves) and `LossScaler`
(scaling.py: fp16 compute scales the loss and skips overflowing steps, counted in
`metrics["skipped_steps"]`; bf16/fp32 run unscaled).
"""

from __future__ import annotations

import gc
import logging
import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from . import fastpath
from .collate import n_input_tokens
from .data import DataSource, TokenizedData, build_dataset
from .distributed import DistContext
from .errors import NonFiniteLossError, OutOfMemoryError, TrainError
from .events import EventSink, TrainEvent, TrainResult
from .fastpath import describe
from .init_adapter import load_init_adapter
from .loss import label_count, token_loss_sum
from .model import BuiltModel, build_model, select_device, trainable_parameters
from .output import ADAPTER_DIRNAME, save_adapter
from .runstate import RunState
from .scaling import LossScaler, needs_loss_scaling
from .spec import MemoryBudget, SplitSpec, TrainSpec

log = logging.getLogger(__name__)

KEEP_CHECKPOINTS = 3  # older step folders are deleted; each was already reported by its event


def _oom_probe(step: int, micro_batch_size: int) -> None:
    """Called before every training micro-batch forward; does nothing.

    It exists so tests can raise `torch.OutOfMemoryError` here (monkeypatch) and exercise the
    out-of-memory fallback on a CPU-only machine: a real CUDA OOM cannot be provoked here, nor
    deterministically on a GPU.
    """


class _PeerOutOfMemory(Exception):
    """dist: another rank ran out of memory in this step; every rank retries it."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _scheduler(spec: TrainSpec, optimizer, total_steps: int):
    from transformers import get_scheduler

    warmup = math.ceil(spec.warmup_ratio * total_steps)
    name = spec.lr_scheduler
    if name == "constant":
        name = "constant_with_warmup" if warmup else "constant"
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def _optimizer(spec: TrainSpec, params: list[torch.nn.Parameter], device: torch.device):
    kw = {"lr": spec.learning_rate, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": spec.weight_decay}
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(params, **kw)
    import bitsandbytes as bnb

    # Paged state lives in CUDA unified memory and spills to the host under pressure; there is
    # nothing to page on the CPU, where the plain 8-bit optimizer is the same algorithm.
    if spec.optimizer == "paged_adamw_8bit" and device.type == "cuda":
        return bnb.optim.PagedAdamW8bit(params, **kw)
    return bnb.optim.AdamW8bit(params, **kw)


class Trainer:
    """One run of `train()`. Kept as an object so tests can inspect `model` after `run()`."""

    def __init__(self, spec: TrainSpec, data: DataSource, output_dir: str | Path, *,
                 validation_data: DataSource | None = None,
                 on_event: Callable[[TrainEvent], None] | None = None,
                 resume_from: str | Path | None = None,
                 should_stop: Callable[[], bool] | None = None,
                 cache_dir: str | Path | None = None,
                 dist: DistContext | None = None,
                 memory_budget: MemoryBudget | None = None,
                 split: SplitSpec | None = None) -> None:
        self.spec = spec
        self.memory_budget = memory_budget
        # A model split layer-wise over several local devices (model_split.py); None: one.
        self.split = split if split is not None and len(split.devices) > 1 else None
        # dist: the process group a launcher set up (or torchrun's env describes); None alone.
        self.dist = dist if dist is not None else DistContext.from_environment(
            device_kind=spec.device)
        self.data_source = data
        self.validation_source = validation_data
        self.output_dir = Path(output_dir)
        self.resume_from = Path(resume_from) if resume_from is not None else None
        self.should_stop = should_stop or (lambda: False)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.device = select_device(spec) if self.split is None else \
            torch.device(self.split.devices[0])  # batches go in where the first layers are
        if self.split is not None and self.dist is not None:
            raise TrainError("a model split over devices runs as one process, not under a "
                             "distributed launcher", code="split_invalid")
        # dist: events (and so checkpoints and the adapter, below) come from rank 0 only.
        self.is_main = self.dist is None or self.dist.is_main
        self.events = EventSink(on_event if self.is_main else None, self.device)
        self.model = None
        self.tokenizer = None
        self.state = RunState(seed=spec.seed, micro_batch_size=spec.micro_batch_size)

    # The run's position lives in `self.state` (what a checkpoint saves); these read through.
    step = property(lambda self: self.state.step,
                    lambda self, v: setattr(self.state, "step", v))
    epoch = property(lambda self: self.state.epoch,
                     lambda self, v: setattr(self.state, "epoch", v))
    index_in_epoch = property(lambda self: self.state.index_in_epoch,
                              lambda self, v: setattr(self.state, "index_in_epoch", v))
    micro_batch_size = property(lambda self: self.state.micro_batch_size,
                                lambda self, v: setattr(self.state, "micro_batch_size", v))
    metrics = property(lambda self: self.state.metrics,
                       lambda self, v: setattr(self.state, "metrics", v))

    # -- setup ----------------------------------------------------------------------------------

    def _setup(self) -> None:
        if self.model is not None:  # already set up (tests inspect the model before run())
            return
        spec = self.spec
        seed_everything(spec.seed)
        self.events.emit("status", message=f"loading base model {spec.base_model_id or spec.base_model}")
        built: BuiltModel = build_model(spec, self.device, cache_dir=self.cache_dir,
                                        memory_budget=self.memory_budget, split=self.split)
        self.built = built
        self.model, self.tokenizer = built.model, built.tokenizer
        self.base_dir, self.base_sha256 = built.base_dir, built.base_sha256
        self.compute_dtype, self.mask_dtype = built.compute_dtype, built.mask_dtype
        self.plan = built.plan
        self.collator = built.collator()
        self.events.emit("status", message=f"{describe(self.plan)}; CUDA allocator: "
                         f"{built.allocator}" if built.allocator else describe(self.plan),
                         data={"fast": self.plan.as_dict(), "allocator": built.allocator})
        if built.split is not None:
            self.events.emit("status", message=f"{built.split.describe()} ({built.split.reason})",
                             data={"split": built.split.as_dict()})
        if spec.init_adapter and self.resume_from is None:
            # A resumed run's checkpoint already holds the adapter weights it reached.
            n = load_init_adapter(self.model, spec.init_adapter)
            self.events.emit("status", message=f"LoRA modules start from adapter "
                             f"{Path(spec.init_adapter).name} ({n} modules)")

        self.events.emit("status", message="tokenizing data")
        self.train_data: TokenizedData = build_dataset(self.data_source, self.tokenizer, spec,
                                                       cache_dir=self.cache_dir)
        self.val_data: TokenizedData | None = None
        if self.validation_source is not None:
            self.val_data = build_dataset(self.validation_source, self.tokenizer, spec,
                                          cache_dir=self.cache_dir)
        stats = self.train_data.stats
        if stats.n_truncated or stats.n_dropped:
            self.events.emit(
                "warning", message=f"{stats.n_truncated} example(s) truncated and "
                f"{stats.n_dropped} dropped at max_seq_len={spec.max_seq_len} "
                f"(overlong={spec.overlong!r})",
                data={"n_truncated": stats.n_truncated, "n_dropped": stats.n_dropped})

        self.n_rows = len(self.train_data.dataset)
        self.steps_per_epoch = math.ceil(self.n_rows / spec.batch_size)
        self.total_steps = spec.max_steps or spec.n_epochs * self.steps_per_epoch
        self.events.total_steps = self.total_steps

        self.params = list(trainable_parameters(self.model).values())
        # flat_optimizer: the tensors packed into one buffer (fast/flat_params.py); the
        # optimizer and the clipping then see the flat tensors (`step_params`).
        self.flat = fastpath.flat_params(self.plan, self.params)
        self.step_params = self.flat.params if self.flat is not None else self.params
        self.optimizer = _optimizer(spec, self.step_params, self.device)
        self.scheduler = _scheduler(spec, self.optimizer, self.total_steps)
        self.scaler = LossScaler(needs_loss_scaling(self.compute_dtype), self.device.type)
        # The plan's CUDA graphs (fast/graphs.py), None when off; they accumulate into .grad
        # buffers that stay put, so gradients are zeroed, not dropped, between steps.
        most_rows = max(spec.micro_batch_size, getattr(self.dist, "micro_batch_size", 0) or 0)
        self.graphs = fastpath.graphed_steps(self.model, self.plan, self.params, self.device,
                                             max_tokens=most_rows * spec.max_seq_len)
        self._graphs_off_reported = False

        self.state = RunState(
            total_steps=self.total_steps, micro_batch_size=spec.micro_batch_size,
            grad_accum=spec.grad_accum_steps, n_examples=self.n_rows, seed=spec.seed,
            base_model_sha256=self.base_sha256, spec=spec.model_dump(mode="json"),
            metrics={"trained_tokens": 0, "n_examples": stats.n_examples, "n_rows": self.n_rows,
                     "n_truncated": stats.n_truncated, "n_dropped": stats.n_dropped})
        if self.scaler.enabled:
            self.metrics["skipped_steps"] = 0
        self._orders: dict[int, torch.Tensor] = {}
        if self.resume_from is not None:
            self._resume(self.resume_from)
        if self.dist is not None and self.dist.micro_batch_size:
            # dist: each rank's micro-batch fits its own card; the step's rows do not change.
            self.micro_batch_size = self.dist.micro_batch_size

    def _resume(self, path: Path) -> None:
        from peft import set_peft_model_state_dict

        c = ckpt.load_checkpoint(path)
        st = c.state
        mismatches = [f"{name}: checkpoint {a}, now {b}" for name, a, b in (
            ("rows of training data", st.n_examples, self.n_rows),
            ("batch_size", st.spec.get("batch_size"), self.spec.batch_size),
            ("lora.r", st.spec.get("lora", {}).get("r"), self.spec.lora.r),
        ) if a != b]
        if mismatches:
            raise TrainError(f"cannot resume from {path}: " + "; ".join(mismatches),
                             code="checkpoint_mismatch")
        if st.base_model_sha256 and st.base_model_sha256 != self.base_sha256:
            raise TrainError(f"cannot resume from {path}: it was trained on base model "
                             f"{st.base_model_sha256[:12]}, this is {self.base_sha256[:12]}",
                             code="checkpoint_mismatch")
        result = set_peft_model_state_dict(self.model, c.adapter_weights)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise TrainError(f"checkpoint {path} has adapter weights this model lacks: "
                             f"{unexpected[:5]}", code="checkpoint_mismatch")
        optimizer_state = c.optimizer
        if self.flat is not None:  # checkpoints keep the per-tensor layout
            try:
                optimizer_state = self.flat.pack_state(optimizer_state)
            except ValueError as exc:
                raise TrainError(f"cannot resume from {path}: {exc}",
                                 code="checkpoint_mismatch") from exc
        ckpt.load_optimizer_state(self.optimizer, optimizer_state)
        self._check_packing(f"resuming from {path.name}")
        self.scheduler.load_state_dict(c.scheduler)
        ckpt.restore_rng(c.rng)
        self.scaler.load_state_dict(st.loss_scaler)
        self.step, self.epoch, self.index_in_epoch = st.step, st.epoch, st.index_in_epoch
        self.micro_batch_size = st.micro_batch_size
        self.state.skipped_steps = st.skipped_steps
        self.metrics.update({k: v for k, v in st.metrics.items() if k not in
                             ("n_examples", "n_rows", "n_truncated", "n_dropped")})
        self.events.emit("status", self.step, message=f"resumed from {path.name} at step {self.step}",
                         epoch=self._epoch_float(), path=str(path))

    # -- data order -------------------------------------------------------------------------------

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            g = torch.Generator().manual_seed(self.spec.seed + epoch)
            self._orders = {epoch: torch.randperm(self.n_rows, generator=g)}
        return self._orders[epoch]

    def _next_indices(self) -> list[int]:
        if self.index_in_epoch >= self.n_rows:
            self.epoch += 1
            self.index_in_epoch = 0
        order = self._order(self.epoch)
        return order[self.index_in_epoch:self.index_in_epoch + self.spec.batch_size].tolist()

    def _epoch_float(self) -> float:
        return self.epoch + self.index_in_epoch / max(1, self.n_rows)

    def _rows(self, data: TokenizedData, indices: list[int]) -> list[dict]:
        cols = data.dataset[indices]
        keys = [k for k in ("input_ids", "labels", "position_ids") if k in cols]
        return [dict(zip(keys, vals)) for vals in zip(*(cols[k] for k in keys))]

    def _micro_batches(self, rows: list[dict], size: int) -> list[dict[str, torch.Tensor]]:
        # Longest first, so each micro-batch holds similar lengths and pads little; the step's
        # update does not depend on the grouping (see the module docstring).
        rows = sorted(rows, key=lambda r: -len(r["input_ids"]))
        return [self.collator(rows[i:i + size]) for i in range(0, len(rows), size)]

    # -- one forward ------------------------------------------------------------------------------

    def _loss_sum(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Summed next-token cross-entropy over the label tokens of `batch`, and their count
        (loss.py's `token_loss_sum`, the same function evaluation uses)."""
        count = label_count(batch["labels"])  # counted on the host: no device sync
        batch = {k: v.to(self.device) for k, v in batch.items()}
        return token_loss_sum(self.model, batch, chunked=self.built.chunked_loss, count=count)

    # -- one optimizer step -----------------------------------------------------------------------

    def _optimizer_step(self, rows: list[dict]) -> dict[str, float]:
        batches = self._micro_batches(rows, self.micro_batch_size) if rows else []
        n_labels = sum(label_count(b["labels"]) for b in batches)
        n_tokens = sum(n_input_tokens(b) for b in batches)
        if self.dist is not None:  # dist: normalise by the label tokens of the GLOBAL step
            n_labels = self.dist.sum_int(n_labels)
        self._zero_grad(set_to_none=self.graphs is None)
        if self.dist is not None:
            loss_total = self._dist_backward(batches, n_labels)
        else:
            loss_total = self._backward(batches, n_labels)
        if self.dist is not None:  # dist: the 1-worker gradient is the sum over ranks
            # The members' grads, not the flat ones: they are views, written in place, and
            # reduce in buckets instead of one copy of the whole gradient.
            self.dist.reduce_gradients(self.params)
            loss_total, n_tokens = self.dist.sum_float(loss_total, float(n_tokens))
        self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        max_norm = self.spec.max_grad_norm if self.spec.max_grad_norm is not None else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.step_params, max_norm))
        if not math.isfinite(grad_norm) and not self.scaler.enabled:
            raise NonFiniteLossError(f"gradient norm became {grad_norm} at step {self.step + 1}")
        lr = self.scheduler.get_last_lr()[0]
        # fp16: an overflowing step is skipped and the scale lowered (scaling.py); the LR
        # schedule then waits too, as accelerate does.
        if self.scaler.step(self.optimizer):
            self.scheduler.step()
        else:
            self.state.skipped_steps += 1
            self.metrics["skipped_steps"] = self.state.skipped_steps
            self.events.emit("warning", self.step + 1, epoch=self._epoch_float(),
                             message=f"fp16 gradients overflowed at step {self.step + 1}: step "
                             f"skipped, loss scale now {self.scaler.scale_value:g}",
                             data={"skipped_steps": self.state.skipped_steps,
                                   "loss_scale": self.scaler.scale_value})
        self._zero_grad(set_to_none=self.graphs is None)
        return {"loss": loss_total / max(1, n_labels), "grad_norm": grad_norm, "lr": lr,
                "tokens": n_tokens}

    def _check_packing(self, when: str) -> None:
        """flat_optimizer: fail loudly if anything replaced a packed tensor's data or grad
        (the optimizer would go on stepping the flat copy, and the adapter would not learn)."""
        if self.flat is not None and not self.flat.intact():
            raise TrainError(f"a trainable tensor left the optimizer's packed buffer {when} "
                             "(fast/flat_params.py); set fast.flat_optimizer to \"off\"",
                             code="flat_optimizer_broken")

    def _zero_grad(self, *, set_to_none: bool) -> None:
        """Zero the gradients, or drop them (`set_to_none`) where nothing needs them to stay
        the same tensors; the flat buffers' views must stay the parameters' grads."""
        if self.flat is not None:
            self.flat.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=set_to_none)

    def _backward(self, batches: list[dict[str, torch.Tensor]], n_labels: int) -> float:
        """Forward and backward of every micro-batch, each loss scaled by the step's label
        count (`n_labels`, global under dist); the summed loss.

        The losses are read on the host once, after the last backward: a read per micro-batch
        would make the host wait for each forward before it could queue the backward. A
        non-finite loss still fails the step, naming its micro-batch.
        """
        where = f" on rank {self.dist.rank}" if self.dist is not None else ""
        scale = 1.0 / max(1, n_labels)
        losses: list[torch.Tensor] = []
        for batch in batches:
            _oom_probe(self.step + 1, self.micro_batch_size)
            graphed = self.graphs.prepare(batch) if self.graphs is not None else None
            if graphed is not None:  # fast/graphs.py: forward + backward as a CUDA graph
                loss_sum = self.graphs.run(graphed, scale)
            else:
                with self.graphs.eager_stream() if self.graphs is not None else nullcontext():
                    loss_sum, _ = self._loss_sum(batch)
                    self.scaler.scale(loss_sum / max(1, n_labels)).backward()
                # Detached at once: a live loss keeps its autograd graph's nodes, and a CUDA
                # graph captured next must not meet accumulate-grad nodes of another stream.
                loss_sum = loss_sum.detach()
            losses.append(loss_sum.float())
        values = torch.stack(losses).tolist() if losses else []
        for i, value in enumerate(values):
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"loss became {value} at step {self.step + 1} (micro-batch {i + 1} of "
                    f"{len(batches)}){where}; try a lower learning_rate (now "
                    f"{self.spec.learning_rate})")
        return float(sum(values))

    def _dist_backward(self, batches: list[dict[str, torch.Tensor]], n_labels: int) -> float:
        """dist: this rank's forwards and backwards; an out-of-memory error on any rank makes
        every rank retry the step (only the one that ran out halves its micro-batch), so no
        rank is left waiting in a collective the others never join."""
        loss_total, oom = 0.0, None
        try:
            loss_total = self._backward(batches, n_labels)
        except torch.OutOfMemoryError as exc:
            oom = exc
        if self.dist.any(oom is not None):
            raise oom if oom is not None else _PeerOutOfMemory()
        return loss_total

    def _step_with_oom_fallback(self, rows: list[dict]) -> dict[str, float]:
        while True:
            oom: str | None = None
            try:
                return self._optimizer_step(rows)
            except _PeerOutOfMemory:  # dist: another rank ran out; retry with the same size
                self._zero_grad(set_to_none=True)
                continue
            except torch.OutOfMemoryError as exc:
                oom = str(exc).splitlines()[0] if str(exc) else "CUDA out of memory"
            # Outside the except block: the exception's traceback pins the tensors of the failed
            # forward, and only once it is gone can their memory be given back.
            self._zero_grad(set_to_none=True)
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if self.micro_batch_size == 1:
                raise OutOfMemoryError(
                    f"out of memory at step {self.step + 1} even at micro_batch_size 1 "
                    f"(max_seq_len={self.spec.max_seq_len}): {oom}")
            old = self.micro_batch_size
            self.micro_batch_size = max(1, old // 2)
            accum = math.ceil(self.spec.batch_size / self.micro_batch_size)
            self.events.emit(
                "warning", self.step, epoch=self._epoch_float(),
                message=f"out of memory at micro_batch_size {old}: retrying step "
                f"{self.step + 1} with micro_batch_size {self.micro_batch_size}, "
                f"gradient accumulation {accum}",
                data={"micro_batch_size": self.micro_batch_size, "grad_accum": accum})

    # -- evaluation -------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean token loss over the whole validation set (None without one)."""
        if self.val_data is None:
            return None
        self.model.eval()
        total, count = 0.0, 0
        ds = self.val_data.dataset
        size = max(1, self.micro_batch_size)
        try:
            for start in range(0, len(ds), size):
                rows = self._rows(self.val_data, list(range(start, min(len(ds), start + size))))
                for batch in self._micro_batches(rows, size):
                    loss, n = self._loss_sum(batch)
                    total += float(loss)
                    count += n
        finally:
            self.model.train()
        return total / max(1, count)

    def _eval_event(self) -> float | None:
        loss = self.evaluate()
        if loss is not None:
            self.events.emit("eval", self.step, epoch=self._epoch_float(), loss=loss)
        return loss

    # -- checkpoints ------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path | None:
        if not self.is_main:  # dist: rank 0 writes; the weights are the same on every rank
            return None
        self.state.grad_accum = math.ceil(self.spec.batch_size / self.micro_batch_size)
        self.state.loss_scaler = self.scaler.state_dict()
        folder = self.output_dir / "checkpoints"
        optimizer_state = self.optimizer.state_dict()
        if self.flat is not None:  # the per-tensor layout, whichever way this run packed them
            optimizer_state = self.flat.unpack_state(optimizer_state)
        path = ckpt.save_checkpoint(folder / ckpt.checkpoint_name(self.step), model=self.model,
                                    optimizer_state=optimizer_state, scheduler=self.scheduler,
                                    state=self.state)
        self.last_checkpoint = path
        self.events.emit("checkpoint", self.step, epoch=self._epoch_float(), path=str(path),
                         loss=self.metrics.get("train_loss"),  # the service lists it per checkpoint
                         message=f"checkpoint at step {self.step}")
        ckpt.prune_checkpoints(folder, KEEP_CHECKPOINTS)
        return path

    # -- the run ----------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        self._setup()
        spec = self.spec
        self.last_checkpoint: Path | None = None
        session_start_step = self.step
        if self.device.type == "cuda":
            # What loading took (the card had to hold it too), before the peaks restart with
            # the training itself.
            self.metrics["load_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.resume_from is None and self.val_data is not None:
            self.metrics["initial_eval_loss"] = self._eval_event()
        self.events.emit("status", self.step, epoch=self._epoch_float(),
                         message=f"training: {self.n_rows} rows, {self.total_steps} steps of "
                         f"{spec.batch_size} (micro-batch {self.micro_batch_size})")
        self.model.train()
        started, session_tokens = time.perf_counter(), 0
        last_saved = -1
        while self.step < self.total_steps:
            stop = self.should_stop()
            if self.dist is not None:  # dist: all ranks stop at the same step
                stop = self.dist.any(stop)
            if stop:
                path = self.last_checkpoint if last_saved == self.step else self.save_checkpoint()
                return self._finish("stopped", path, started, session_tokens)
            t0 = time.perf_counter()
            indices = self._next_indices()
            # dist: this rank's share of the step's global rows (the position stays global).
            mine = indices if self.dist is None else self.dist.shard(indices)
            out = self._step_with_oom_fallback(self._rows(self.train_data, mine) if mine else [])
            self._report_graphs_off()
            if self.step == session_start_step:
                self._check_packing("after the first step")
            self.step += 1
            self.index_in_epoch += len(indices)
            dt = time.perf_counter() - t0
            session_tokens += int(out["tokens"])
            self.metrics["trained_tokens"] += int(out["tokens"])
            self.metrics["train_loss"] = out["loss"]
            self.events.emit("step", self.step, epoch=self._epoch_float(), loss=out["loss"],
                             lr=out["lr"], grad_norm=out["grad_norm"],
                             tokens_per_s=out["tokens"] / dt if dt > 0 else None)
            if spec.eval_every and self.step % spec.eval_every == 0 and self.step < self.total_steps:
                self.metrics["eval_loss"] = self._eval_event()
            if (spec.checkpoint_every and self.step % spec.checkpoint_every == 0
                    and self.step < self.total_steps):
                self.save_checkpoint()
                last_saved = self.step
        if self.val_data is not None:
            self.metrics["eval_loss"] = self._eval_event()
        return self._finish("completed", self.last_checkpoint, started, session_tokens)

    def _report_graphs_off(self) -> None:
        """One warning event when CUDA graphs turned themselves off (the run goes on eagerly)."""
        if self.graphs is None or self.graphs.disabled is None or self._graphs_off_reported:
            return
        self._graphs_off_reported = True
        self.events.emit("warning", self.step, epoch=self._epoch_float(),
                         message=f"CUDA graphs off: {self.graphs.disabled}; the run goes on "
                         "without them", data={"cuda_graphs": self.graphs.summary()})

    def _finish(self, status: str, checkpoint: Path | None, started: float,
                session_tokens: int) -> TrainResult:
        seconds = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        self.metrics.update({
            "peak_memory_bytes": peak,
            "tokens_per_s": session_tokens / seconds if seconds > 0 and session_tokens else None,
            "micro_batch_size": self.micro_batch_size,
            "steps": self.step,
            "train_seconds": seconds,
        })
        adapter_dir = None
        if self.dist is not None:
            self.metrics["world_size"] = self.dist.world_size
        if self.graphs is not None:
            self.metrics["cuda_graphs"] = self.graphs.summary()
        split = self.built.split
        if split is not None:
            from .model_split import split_peaks

            self.metrics["split_peak_memory_bytes"] = split_peaks(split.devices)
        if status == "completed" and self.is_main:
            adapter_dir = save_adapter(
                self.model, self.output_dir / ADAPTER_DIRNAME, self.spec,
                base_model_sha256=self.base_sha256, metrics=self.metrics,
                n_examples=self.train_data.stats.n_examples, fast=self.plan.as_dict(),
                split=split.as_dict() if split is not None else None)
        self.events.emit("done", self.step, epoch=self._epoch_float(), message=status,
                         loss=self.metrics.get("train_loss"),
                         path=str(adapter_dir) if adapter_dir else None,
                         data={"status": status, "metrics": self.metrics})
        return TrainResult(status=status, step=self.step, total_steps=self.total_steps,
                           adapter_dir=adapter_dir, last_checkpoint=checkpoint,
                           metrics=dict(self.metrics))


def train(spec: TrainSpec, data: DataSource, output_dir: str | Path, *,
          validation_data: DataSource | None = None,
          on_event: Callable[[TrainEvent], None] | None = None,
          resume_from: str | Path | None = None,
          should_stop: Callable[[], bool] | None = None,
          cache_dir: str | Path | None = None,
          dist: DistContext | None = None,
          memory_budget: MemoryBudget | None = None,
          split: SplitSpec | None = None) -> TrainResult:
    """Fine-tune a LoRA adapter on `spec.base_model` with `data`; see the module docstring.

    Returns status "completed" with `adapter_dir` (output_dir/adapter), or "stopped" (when
    `should_stop()` said so between steps) with `last_checkpoint` to resume from. Raises
    `DataError` for bad data, `ModelLoadError`, `NonFiniteLossError`, `OutOfMemoryError` (even
    micro-batch 1 does not fit), or `TrainError` for an unusable checkpoint. `memory_budget`:
    what the scheduler reserved on the card; the run stays within it (see spec.MemoryBudget).
    `split`: the model is split layer-wise over these local devices (spec.SplitSpec,
    model_split.py; one worker holding several GPUs).
    """
    return Trainer(spec, data, output_dir, validation_data=validation_data, on_event=on_event,
                   resume_from=resume_from, should_stop=should_stop, cache_dir=cache_dir,
                   dist=dist, memory_budget=memory_budget, split=split).run()
