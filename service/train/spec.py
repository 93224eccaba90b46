"""What one training run is: the pydantic spec the trainer takes and the device it runs on.

`TrainSpec` is everything `train()` needs besides the data and an output folder; it is plain
data (JSON-serialisable), so the service can store it, send it to a node and record it next to
the adapter it produced. Paths in it are paths on the machine that trains.

The fast path's names live here too, so that the API, the memory estimate, the trainer and
`service/train/fast` share one list: `FastSpec` (the per-piece switches a job asks for), its
field names `FAST_PIECES`, and `FastPlan` (what runs on one device, as `fast.resolve_fast`
decides; recorded in the run's events and in lorapool.json under "fast").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

Quantization = Literal["nf4", "fp4", "int8", "none"]
ComputeDtype = Literal["auto", "bf16", "fp16", "fp32"]
Switch = Literal["auto", "on", "off"]


class LoraSpec(BaseModel):
    """The LoRA adapter to attach (peft's `LoraConfig`, the parts lorapool exposes)."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, ge=1, le=1024)
    alpha: float = Field(32.0, gt=0, le=1e5)
    # 0 by default, as in peft and Unsloth: with dropout on, the fast path can neither share one
    # input's LoRA work across sibling projections nor replay the step as a CUDA graph (the
    # recompute would need the same mask), which costs ~3x at micro-batch 1.
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False


class FastSpec(BaseModel):
    """Per-piece switches of the fast path (issue 9). "auto" lets `resolve_fast` decide per
    device (CUDA: on where it can run; CPU: off, except chunked_loss); "on" forces a piece
    wherever it can run at all; "off" keeps the reference path for it. The resolved plan is
    recorded in the run's events and in lorapool.json under "fast"."""

    model_config = ConfigDict(extra="forbid")

    fused_lora: Switch = "auto"  # fused NF4-dequant + base matmul + LoRA autograd fn (fast/lora.py)
    offload_activations: Switch = "auto"  # checkpointed layer inputs to pinned CPU (fast/offload.py)
    kernels: Switch = "auto"  # Liger RMSNorm/SwiGLU/RoPE (CUDA + triton + liger-kernel only)
    padding_free: Switch = "auto"  # flat packed rows, position_ids restart, doc-masked attention
    chunked_loss: Switch = "auto"  # linear+CE without full logits (service/train/loss.py)
    host_embeddings: Switch = "auto"  # frozen input embeddings in pinned host memory (fast/)
    # the frozen output head in pinned host memory, streamed block by block into the loss
    # (fast/host_head.py); "auto": only where the job would not fit the card (or the scheduler's
    # reservation) with the head on the GPU; no CUDA graphs then
    host_head: Switch = "auto"
    # q/k/v and gate/up as one fused node each (fast/lora_group.py); needs fused_lora, dropout 0
    grouped_lora: Switch = "auto"
    # a micro-batch's forward + backward replayed as a CUDA graph (fast/graphs.py): no launch
    # overhead at micro-batch 1; CUDA bf16 only, needs lora.dropout 0, padding_free, chunked_loss
    cuda_graphs: Switch = "auto"
    # the trainable tensors packed into one buffer, so the optimizer steps it in one call
    # (fast/flat_params.py); bitsandbytes otherwise launches and syncs once per tensor
    flat_optimizer: Switch = "auto"


FAST_PIECES: tuple[str, ...] = tuple(FastSpec.model_fields)


@dataclass(frozen=True)
class FastPlan:
    """What the fast path does on one device: `plan.<piece>` is whether it runs,
    `plan.reasons[piece]` says why it is on or off. One field per FastSpec switch, same order
    (tests/train/test_fast_plan.py checks it), so events and lorapool.json list the pieces as a job names them."""

    fused_lora: bool = False
    offload_activations: bool = False
    kernels: bool = False
    padding_free: bool = False
    chunked_loss: bool = False
    host_embeddings: bool = False
    host_head: bool = False
    grouped_lora: bool = False
    cuda_graphs: bool = False
    flat_optimizer: bool = False
    reasons: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for events and lorapool.json: every piece's bool, then "reasons"."""
        return asdict(self)

    @property
    def any_on(self) -> bool:
        return any(getattr(self, piece) for piece in FAST_PIECES)


class TrainSpec(BaseModel):
    """One QLoRA run. Defaults are the QLoRA paper's recipe scaled to a small GPU."""

    model_config = ConfigDict(extra="forbid")

    # Base model: a local HF folder, or a .gguf file (dequantised once and cached).
    base_model: str
    base_model_id: Optional[str] = None  # a name for metadata; defaults to base_model
    gguf_file: Optional[str] = None  # file name inside base_model when it is a folder
    trust_remote_code: bool = False
    quantization: Quantization = "nf4"
    double_quant: bool = True
    compute_dtype: ComputeDtype = "auto"

    lora: LoraSpec = Field(default_factory=LoraSpec)
    # A PEFT adapter folder to start the LoRA modules from instead of peft's init (a federated
    # round's global adapter); same rank and modules as `lora`. Ignored when resuming.
    init_adapter: Optional[str] = None

    # Data.
    max_seq_len: int = Field(1024, ge=8, le=131072)
    overlong: Literal["truncate", "drop"] = "truncate"
    packing: bool = False
    loss_on: Literal["assistant", "all"] = "assistant"

    # Loop.
    n_epochs: int = Field(1, ge=1, le=1000)
    max_steps: Optional[int] = Field(None, ge=1)  # optimizer steps; overrides n_epochs
    batch_size: int = Field(8, ge=1, le=65536)  # effective: micro_batch_size * accumulation
    micro_batch_size: int = Field(1, ge=1, le=4096)
    learning_rate: float = Field(2e-4, gt=0, le=1.0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    max_grad_norm: Optional[float] = Field(1.0, gt=0)
    optimizer: Literal["adamw_8bit", "paged_adamw_8bit", "adamw"] = "adamw_8bit"
    gradient_checkpointing: bool = True
    seed: int = 42

    checkpoint_every: Optional[int] = Field(None, ge=1)  # optimizer steps
    eval_every: Optional[int] = Field(None, ge=1)  # optimizer steps
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # The fast path: "auto" (every piece "auto"), "off" (the reference path), or per piece.
    fast: Union[Literal["auto", "off"], FastSpec] = "auto"

    @model_validator(mode="after")
    def _micro_divides_batch(self) -> "TrainSpec":
        if self.micro_batch_size > self.batch_size:
            raise ValueError(
                f"micro_batch_size ({self.micro_batch_size}) exceeds batch_size ({self.batch_size})"
            )
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size "
                f"({self.micro_batch_size})"
            )
        return self

    @property
    def grad_accum_steps(self) -> int:
        return self.batch_size // self.micro_batch_size

    def fast_spec(self) -> FastSpec:
        """`fast` as per-piece switches: "auto" -> all "auto", "off" -> all "off"."""
        if isinstance(self.fast, FastSpec):
            return self.fast
        if self.fast == "off":
            return FastSpec(**{name: "off" for name in FAST_PIECES})
        return FastSpec()


def cuda_graphs_unsupported(spec: "TrainSpec",
                            compute_capability: tuple[int, int]) -> Optional[str]:
    """Why the fast path cannot replay CUDA graphs (fast/graphs.py) for `spec` on a card of
    `compute_capability`, memory aside; None when it can. The one rule the trainer's plan
    (fast/__init__.py) and the memory estimate (memory.py) both apply, so they agree."""
    if tuple(compute_capability) < (8, 0):
        return "CUDA graphs run the bf16 path only (compute capability >= 8.0)"
    if spec.compute_dtype not in ("auto", "bf16"):
        return f"CUDA graphs run the bf16 path only (spec has {spec.compute_dtype!r})"
    if spec.lora.dropout > 0:
        return ("a checkpointed layer's recompute must redraw its dropout mask, which reads "
                "the RNG state and cannot be captured (set lora.dropout to 0)")
    if not spec.gradient_checkpointing:
        return "CUDA graphs are built for the checkpointed step"
    if spec.packing:
        # A packed row holds several documents, whose attention is shaped by the data.
        return "packed rows hold several documents; graphs replay one-document rows"
    return None


class MemoryBudget(BaseModel):
    """The GPU memory the scheduler reserved for one job attempt: its estimate on the chosen
    node (`total`, bytes) and the CUDA context that estimate counted. The trainer stays within
    it: a piece that costs memory beyond the eager fast path (CUDA graphs' pool) runs only if
    the reservation included it."""

    model_config = ConfigDict(extra="forbid")

    total: int = Field(ge=0)
    context_bytes: Optional[int] = Field(None, ge=0)


class SplitSpec(BaseModel):
    """Run one job's model split layer-wise over several local devices of one machine (one
    worker holding several GPUs): contiguous decoder-layer ranges per device, in `devices`
    order; the input embedding goes where the fast path's rules put it (host memory or the
    first device), the final norm, output head and loss to the last device (model_split.py).

    `layers`: decoder layers per device (summing to the model's); None sizes them by what each
    device holds (memory_split.py, from each card's free memory and `budgets`, the bytes the
    scheduler reserved on each). Not part of `TrainSpec`: where a job runs is not what it
    trains, and a single-GPU job's spec and adapter metadata stay as they were."""

    model_config = ConfigDict(extra="forbid")

    devices: list[str] = Field(min_length=1)  # "cuda:0", "cuda:1" ("cpu" in CPU tests)
    layers: Optional[list[int]] = None
    budgets: Optional[list[int]] = None

    @model_validator(mode="after")
    def _lengths(self) -> "SplitSpec":
        for name in ("layers", "budgets"):
            value = getattr(self, name)
            if value is not None and len(value) != len(self.devices):
                raise ValueError(f"split.{name} has {len(value)} entries for "
                                 f"{len(self.devices)} devices")
        if self.layers is not None and min(self.layers) < 1:
            raise ValueError("split.layers: every device holds at least one decoder layer")
        return self


class DeviceInfo(BaseModel):
    """The GPU (or CPU) a job would run on, as a NodeAgent reports it."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["cuda", "cpu"] = "cuda"
    name: str = "unknown"
    total_memory: int = 0  # bytes
    free_memory: Optional[int] = None  # bytes; None when unknown
    compute_capability: tuple[int, int] = (8, 0)
    # What a CUDA context takes on this card (driver, cuBLAS workspaces), measured by the node;
    # None: the estimate's constant.
    context_bytes: Optional[int] = None

    @property
    def supports_bf16(self) -> bool:
        return self.kind == "cuda" and self.compute_capability >= (8, 0)
