"""Peak GPU memory (or CPU RAM) of one QLoRA job, estimated from the model's config alone.

The scheduler places every queued job by this number, on every kind of node, so it must be
cheap (shapes are read once per model, then each estimate is arithmetic) and it must show its
parts: `MemoryEstimate.breakdown` names each term, so that a calibration run on a real GPU can
say which term is off.

How parameters are counted: the model is built from its config on the meta device
(accelerate's `init_empty_weights` + `AutoModelForCausalLM.from_config`): no weights are read,
and a 1B config costs well under a second. Tied input/output embeddings are counted once.

Assumptions (each is a named constant below, so calibration can change it in one place):

- Compute dtype: the spec's, or for "auto" bf16 iff CUDA with compute capability >= 8.0, else
  fp16 on CUDA and fp32 on the CPU (also when `spec.device == "cpu"`).
- Base weights: every `nn.Linear` except the output head is quantized. nf4/fp4: 4 bits plus a
  fp32 absmax per 64-block (4.5 bits), or with double quantization an 8-bit absmax per block plus
  a fp32 scale per 256 blocks (~4.13 bits). int8 (LLM.int8): 1 byte plus a fp32 scale per output
  row. "none": the compute dtype.
- Everything else (embeddings, the output head unless tied, norms, biases) stays unquantized, in
  fp32 when the base is quantized (peft's `prepare_model_for_kbit_training` upcasts them), in the
  compute dtype when it is not.
- LoRA: r * (in + out) parameters per targeted linear ("all-linear" = every linear but the output
  head, as in peft), held in fp32 (peft's default `autocast_adapter_dtype`), with fp32 grads. DoRA
  adds one magnitude per output feature.
- Optimizer: 8-bit AdamW keeps two 8-bit states (2 bytes/param plus a fp32 absmax per 256) for
  tensors of >= 4096 elements and two fp32 states (8 bytes) below that, as bitsandbytes does;
  the paged variant is counted like the plain one (conservative). adamw: 8 bytes/param.
- Activations (per token, per decoder layer, `a` = compute-dtype bytes), assuming SDPA attention
  (flash / memory-efficient kernels, so no seq^2 term besides the padding mask): the two RMSNorms'
  fp32 inputs (2 * 4h), the normed inputs (2 * a*h), q and k/v repeated to all heads (3 * a*q),
  the attention output and its contiguous copy (2 * a*q) with the fp32 log-sum-exp, and the MLP's
  gate, act, up and product (4 * a*i). Each LoRA-wrapped linear adds its fp32 input copy (and a
  1-byte dropout mask when dropout > 0) and its r-wide fp32 middle. An explicitly "eager" config
  adds the seq^2 scores (compute dtype + the fp32 softmax + its cast).
  With gradient checkpointing: one hidden state per layer boundary plus one layer's full
  activations (the one being recomputed); without: every layer's. A padded micro-batch (> 1) or
  a packed one (block-causal mask) adds a boolean micro * seq^2 mask. Sequences are counted at
  max_seq_len.
- Logits: tokens * vocab in the compute dtype (kept by the model output) + the loss' fp32 copy /
  log-softmax + its grad + the grad of the logits: (a + 12) bytes per token per vocab entry.
- Backward workspace: the grads of one layer's widest intermediates (3 * a*i + 2 * a*h per token)
  plus the dequantized copy of the largest quantized weight (forward and backward, 2 * a*in*out).
- Calibration: with a quantized base, the per-layer activations above are multiplied by
  `KBIT_ACTIVATION_FACTOR` (2.5, measured on an H100; see the constant). An unquantized base is
  not calibrated yet.
- CUDA context: 600 MiB on CUDA (measured 0.60 GiB with CUDA 13 and cuBLAS workspace).
- On the CPU (`_cpu_estimate`) the same tensor terms live in the process's RAM, plus the
  Python/torch runtime, tokenizer and data, and the stored weights as loaded (RSS-calibrated).
- Allocator slack: 10 % of everything but the CUDA context (the caching allocator's rounding and
  fragmentation).

The scheduler adds its own safety margin on top (`Placer(safety_margin=...)`).
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .resolve import resolve_dtype_name
from .spec import DeviceInfo, TrainSpec, cuda_graphs_unsupported

MiB = 1024**2
GiB = 1024**3

# -- the assumptions, named (see the module docstring) -------------------------------------------
NF4_BITS = 4 + 32 / 64  # 4-bit codes + fp32 absmax per block of 64
NF4_BITS_DOUBLE_QUANT = 4 + 8 / 64 + 32 / (64 * 256)  # 8-bit absmax + fp32 per 256 blocks
INT8_ROW_SCALE_BYTES = 4  # LLM.int8: one fp32 scale per output row
LORA_PARAM_BYTES = 4  # peft keeps adapters in fp32 (autocast_adapter_dtype=True)
UPCAST_UNQUANTIZED_TO_FP32 = True  # prepare_model_for_kbit_training
OPTIM_8BIT_MIN_SIZE = 4096  # bitsandbytes' min_8bit_size: smaller tensors get 32-bit state
OPTIM_8BIT_BYTES = 2 + 2 * 4 / 256  # two 8-bit states + a fp32 absmax per 256 each
ADAMW_BYTES = 8  # two fp32 states
LOGITS_EXTRA_BYTES = 12  # fp32 copy / log-softmax, its grad, the logits' grad (per element)
# Until a node has measured its own (DeviceInfo.context_bytes, service/train/context_probe.py).
# Measured at the end of runs: 0.60 GiB on an H100, 0.82 GiB on an H200 (CUDA 13, torch 2.11).
CUDA_CONTEXT_BYTES = 600 * MiB
ALLOCATOR_SLACK = 0.10
# Measured on an H100 (bench/gpu_memory.py, Llama-3.2-1B shape, seq 2048, all-linear r=16): a
# quantized base keeps this many times the analytic per-layer activations. The fp32 norms of
# `prepare_model_for_kbit_training` make each normed input and every LoRA-wrapped projection's
# output fp32, and bitsandbytes' 4-bit matmul saves its own compute-dtype copy of the input.
KBIT_ACTIVATION_FACTOR = 2.5

_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def cuda_context_bytes(device: DeviceInfo) -> int:
    """The CUDA context a job's process adds on `device`: the node's measurement, else the
    constant (the reference and the fast path's estimates both count it this way)."""
    return device.context_bytes or CUDA_CONTEXT_BYTES


@dataclass(frozen=True)
class LinearShape:
    """One `nn.Linear` of the model (as built on the meta device)."""

    name: str
    in_features: int
    out_features: int
    bias: bool
    layer: int | None  # decoder-layer index parsed from the name; None outside the stack
    is_output_head: bool


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a model, read from its config once."""

    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    attn_implementation: str  # "sdpa" unless the config says otherwise
    linears: tuple[LinearShape, ...]
    total_params: int  # tied weights once
    other_params: int  # everything but the (non-head) linears' weights
    tied_embeddings: bool = False  # the output head shares the input embedding's table
    _targets_cache: dict = field(default_factory=dict, compare=False, repr=False, hash=False)

    @property
    def quantizable_linears(self) -> tuple[LinearShape, ...]:
        return tuple(lin for lin in self.linears if not lin.is_output_head)

    @property
    def largest_quantizable(self) -> int:
        """Elements of the largest quantized weight (its dequantized copy is a workspace)."""
        hit = self._targets_cache.get("largest")
        if hit is None:
            hit = max((lin.in_features * lin.out_features for lin in self.quantizable_linears),
                      default=0)
            self._targets_cache["largest"] = hit
        return hit

    def targets(self, target_modules: Any) -> tuple[LinearShape, ...]:
        """The linears peft would wrap for `target_modules` ("all-linear" or a list of names)."""
        key = target_modules if isinstance(target_modules, str) else tuple(target_modules)
        hit = self._targets_cache.get(key)
        if hit is None:
            if key == "all-linear":
                hit = self.quantizable_linears
            else:
                names = set(key)
                hit = tuple(
                    lin for lin in self.linears
                    if lin.name in names or lin.name.rsplit(".", 1)[-1] in names
                    or any(lin.name.endswith("." + n) for n in names)
                )
            self._targets_cache[key] = hit
        return hit


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak memory of one job on one device, term by term (bytes)."""

    breakdown: dict[str, int]
    total: int
    compute_dtype: str = "bf16"
    device_kind: str = "cuda"
    host_head: bool = False  # the fast path's output head in host memory (fast/host_head.py)

    @property
    def graphs(self) -> bool:
        """Whether this configuration replays CUDA graphs (it then counts their pool)."""
        return "cuda_graphs_pool" in self.breakdown

    def __int__(self) -> int:
        return self.total

    def gib(self) -> float:
        return self.total / GiB

    def describe(self) -> str:
        """A small plain-text table: one row per term, then the total."""
        width = max(len(k) for k in self.breakdown) if self.breakdown else 5
        rows = [f"{k:<{width}}  {v / MiB:>10.1f} MiB" for k, v in self.breakdown.items()]
        rows.append("-" * (width + 16))
        rows.append(f"{'total':<{width}}  {self.total / MiB:>10.1f} MiB  "
                    f"({self.gib():.2f} GiB, {self.compute_dtype} on {self.device_kind})")
        return "\n".join(rows)


# -- shapes -------------------------------------------------------------------------------------
_shape_lock = threading.Lock()
_shape_cache: dict[tuple, tuple[Any, int | None, float, ModelShape]] = {}
_shape_build_locks: dict[tuple, threading.Lock] = {}
_SHAPE_CACHE_MAX = 256


_MTIME_RECHECK_S = 2.0  # how often a cached path's mtime is looked at again


def _mtime(spec: TrainSpec) -> int | None:
    """The mtime of the file that defines the model (config.json or the .gguf): a model replaced
    in place gets re-read."""
    path = Path(spec.base_model)
    probe = path
    if path.is_dir():
        probe = path / spec.gguf_file if spec.gguf_file else path / "config.json"
    try:
        return os.stat(probe).st_mtime_ns
    except OSError:
        return None


_IMPORT_LOCK = threading.Lock()


def _hf() -> tuple[Any, Any, Any]:
    """(AutoConfig, AutoModelForCausalLM, init_empty_weights), imported under a lock.

    The API estimates in worker threads; transformers' lazy module is not safe to import from
    several threads at once (a concurrent first `from transformers import AutoConfig` can fail
    with ImportError, which bench/api_load.py's submit storm turned into 500s)."""
    with _IMPORT_LOCK:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

    return AutoConfig, AutoModelForCausalLM, init_empty_weights


def load_config(spec: TrainSpec) -> Any:
    """The transformers config of `spec.base_model`: a local folder or a .gguf file, offline."""
    AutoConfig, _, _ = _hf()

    path = Path(spec.base_model)
    kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code,
                              "local_files_only": True}
    if path.is_file() and path.suffix == ".gguf":
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
    if not path.is_dir():
        raise FileNotFoundError(f"base_model {spec.base_model!r}: no such folder or .gguf file")
    if spec.gguf_file:
        return AutoConfig.from_pretrained(str(path), gguf_file=spec.gguf_file, **kwargs)
    return AutoConfig.from_pretrained(str(path), **kwargs)


def _shape_from_config(config: Any, trust_remote_code: bool) -> ModelShape:
    from torch import nn

    _, AutoModelForCausalLM, init_empty_weights = _hf()

    attn = getattr(config, "_attn_implementation", None) or "sdpa"
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    # init_empty_weights leaves tied embeddings untied; tie them so they are counted once.
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    head = model.get_output_embeddings()
    linears = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            m = _LAYER_INDEX.search(name)
            linears.append(LinearShape(
                name=name, in_features=module.in_features, out_features=module.out_features,
                bias=module.bias is not None, layer=int(m.group(1)) if m else None,
                is_output_head=module is head,
            ))
    total = sum(p.numel() for p in model.parameters())  # dedups tied parameters
    quantizable = sum(lin.in_features * lin.out_features for lin in linears
                      if not lin.is_output_head)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(text.hidden_size)
    heads = int(getattr(text, "num_attention_heads", 1) or 1)
    layers = int(getattr(text, "num_hidden_layers", 0) or
                 len({lin.layer for lin in linears if lin.layer is not None}) or 1)
    return ModelShape(
        model_type=str(getattr(config, "model_type", "unknown")),
        num_layers=layers,
        hidden_size=hidden,
        intermediate_size=int(getattr(text, "intermediate_size", None) or 4 * hidden),
        num_heads=heads,
        num_kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(text, "head_dim", None) or hidden // heads),
        vocab_size=int(text.vocab_size),
        attn_implementation=str(attn),
        linears=tuple(linears),
        total_params=int(total),
        other_params=int(total - quantizable),
        tied_embeddings=bool(getattr(text, "tie_word_embeddings",
                                     getattr(config, "tie_word_embeddings", False))),
    )


def model_shape(spec: TrainSpec, *, config: Any = None) -> ModelShape:
    """The model's shape: from `config` when given, else from `spec.base_model`. Cached per
    config object, or per path (re-read when its file's mtime changes), so that repeated calls
    cost microseconds."""
    now = time.monotonic()
    if config is not None:
        key: tuple = ("config", id(config), spec.trust_remote_code)
    else:
        key = ("path", spec.base_model, spec.gguf_file, spec.trust_remote_code)
    with _shape_lock:
        hit = _shape_cache.get(key)
    if hit is not None:
        owner, mtime, checked, shape = hit
        if config is not None:
            # Cached by identity; the entry keeps the config alive, so its id() is not reused.
            if owner is config:
                return shape
        elif now - checked < _MTIME_RECHECK_S:
            return shape
        elif _mtime(spec) == mtime:
            with _shape_lock:
                _shape_cache[key] = (owner, mtime, now, shape)
            return shape
    # One thread reads a given model at a time: a burst of submits for a model not cached yet
    # (100 at once in bench/api_load.py's storm) would otherwise build it 100 times over.
    with _shape_build_locks.setdefault(key, threading.Lock()):
        with _shape_lock:
            again = _shape_cache.get(key)
        if again is not None and again is not hit and (config is None or again[0] is config):
            return again[3]
        mtime = None if config is not None else _mtime(spec)
        cfg = config if config is not None else load_config(spec)
        shape = _shape_from_config(cfg, spec.trust_remote_code)
        with _shape_lock:
            if len(_shape_cache) >= _SHAPE_CACHE_MAX:
                _shape_cache.clear()
                _shape_build_locks.clear()
            _shape_cache[key] = (config, mtime, now, shape)
    return shape


# -- the estimate -------------------------------------------------------------------------------
def resolve_compute_dtype(spec: TrainSpec, device: DeviceInfo) -> str:
    """"bf16" / "fp16" / "fp32": the spec's choice, or what "auto" picks on this device
    (the trainer's own rule, resolve.py, so estimate and run agree)."""
    kind = "cpu" if spec.device == "cpu" else device.kind
    return resolve_dtype_name(spec.compute_dtype, device_kind=kind, bf16_ok=device.supports_bf16)


def _quantized_weight_bytes(spec: TrainSpec, shape: ModelShape, a: int) -> int:
    key = ("weights", spec.quantization, spec.double_quant, a)
    hit = shape._targets_cache.get(key)
    if hit is not None:
        return hit
    n = 0
    for lin in shape.quantizable_linears:
        numel = lin.in_features * lin.out_features
        if spec.quantization in ("nf4", "fp4"):
            bits = NF4_BITS_DOUBLE_QUANT if spec.double_quant else NF4_BITS
            n += int(numel * bits / 8)
        elif spec.quantization == "int8":
            n += numel + INT8_ROW_SCALE_BYTES * lin.out_features
        else:
            n += numel * a
    shape._targets_cache[key] = n
    return n


def _adapter_terms(shape: ModelShape, spec: TrainSpec, a: int
                   ) -> tuple[int, int, dict[int | None, int]]:
    """LoRA parameter count, optimizer-state bytes and per-layer LoRA activation bytes per token;
    cached on the shape (the scheduler asks for the same few adapters over and over)."""
    lora = spec.lora
    tm = lora.target_modules
    key = ("adapter", tm if isinstance(tm, str) else tuple(tm), lora.r, lora.use_dora,
           lora.dropout > 0, spec.optimizer, a)
    hit = shape._targets_cache.get(key)
    if hit is not None:
        return hit
    r = lora.r
    lora_params = 0
    optim = 0
    # The input copy each LoRA module keeps: a fp32 cast (dropout output) + a bool dropout mask.
    lora_in_bytes = (4 + 1) if lora.dropout > 0 else (4 if a != 4 else 0)
    per_layer: dict[int | None, int] = {}
    for lin in shape.targets(tm):
        tensors = [r * lin.in_features, r * lin.out_features]
        if lora.use_dora:
            tensors.append(lin.out_features)
        for numel in tensors:
            lora_params += numel
            if spec.optimizer == "adamw" or numel < OPTIM_8BIT_MIN_SIZE:
                optim += ADAMW_BYTES * numel
            else:
                optim += int(OPTIM_8BIT_BYTES * numel)
        b = lora_in_bytes * lin.in_features + LORA_PARAM_BYTES * r
        if lora.use_dora:
            b += a * lin.out_features  # the base result DoRA rescales
        per_layer[lin.layer] = per_layer.get(lin.layer, 0) + b
    hit = (lora_params, optim, per_layer)
    shape._targets_cache[key] = hit
    return hit


def reference_layer_bytes(shape: ModelShape, a: int, seq: int) -> int:
    """Bytes per token of one decoder layer's activations on the reference path (`a`: bytes
    of the compute dtype), before LoRA's and the k-bit calibration factor. Shared by the
    one-card estimate and the split one (memory_split.py)."""
    h, i = shape.hidden_size, shape.intermediate_size
    q = shape.num_heads * shape.head_dim
    layer_base = (
        2 * 4 * h  # both RMSNorms save their fp32 input
        + 2 * a * h  # normed inputs of attention and MLP
        + 3 * a * q  # q, and k/v repeated to all heads, as SDPA saves them
        + 2 * a * q + 4 * shape.num_heads  # attention output, its contiguous copy, fp32 LSE
        + 4 * a * i  # gate, act(gate), up, act*up
    )
    if shape.attn_implementation == "eager":
        # scores (compute dtype), fp32 softmax, its cast back: heads * seq per token.
        layer_base += shape.num_heads * seq * (a + 4 + a)
    return layer_base


def estimate_memory(spec: TrainSpec, device: DeviceInfo, *, config: Any = None,
                    graphs: bool = False) -> MemoryEstimate:
    """Peak memory (bytes, with a per-term breakdown) of training `spec` on `device`.

    See the module docstring for every assumption. `config` is an already-loaded transformers
    config; without it the config is read from `spec.base_model` (folder or .gguf), once per path.
    The estimate depends on the device only through its kind, compute capability and CUDA
    context (placement caches it per device class).

    By default this is the job's minimum: on the fast path, the output head in host memory where
    it may go (fast/host_head.py) and no CUDA graphs. `graphs=True` is what a run on this card
    alone will take: the richest configuration (`fast_variants`: head on the GPU, with graphs)
    that the card's free (else total) memory holds.
    """
    if not graphs:
        return _estimates(spec, device, config, minimum_only=True)[-1]
    variants = fast_variants(spec, device, config=config)
    room = device.free_memory if device.free_memory is not None else device.total_memory
    return first_fit(variants, room if room else 1 << 62)


def fast_variants(spec: TrainSpec, device: DeviceInfo, *, config: Any = None
                  ) -> list[MemoryEstimate]:
    """Every memory configuration the trainer may pick for `spec` on `device`, richest first,
    the last being the minimum (`estimate_memory`); a single estimate where the fast path does
    not run. Placement fits a job by the minimum and reserves, on the node it chose, the first
    one that node holds (`Placer.best_fit`); the trainer picks the same one from its reservation
    (`fit_to_room`), so the two agree by construction."""
    return _estimates(spec, device, config, minimum_only=False)


def _estimates(spec: TrainSpec, device: DeviceInfo, config: Any, *,
               minimum_only: bool) -> list[MemoryEstimate]:
    """`fast_variants`, or only its last (the minimum) with `minimum_only`: placement estimates
    every queued job per device class, and needs just that one there."""
    shape = model_shape(spec, config=config)
    dtype = resolve_compute_dtype(spec, device)
    a = _DTYPE_BYTES[dtype]
    kind = "cpu" if (spec.device == "cpu" or device.kind == "cpu") else "cuda"
    quantized = spec.quantization != "none"
    lora = spec.lora
    h, i, L = shape.hidden_size, shape.intermediate_size, shape.num_layers
    seq, micro = spec.max_seq_len, spec.micro_batch_size
    tokens = micro * seq

    # Weights.
    base = _quantized_weight_bytes(spec, shape, a)
    other_bytes = 4 if (quantized and UPCAST_UNQUANTIZED_TO_FP32) else a
    unquantized = shape.other_params * other_bytes

    # Adapters, their grads and optimizer state.
    lora_params, optim, per_layer_lora = _adapter_terms(shape, spec, a)
    lora_param_bytes = lora_params * LORA_PARAM_BYTES
    lora_grad_bytes = lora_params * LORA_PARAM_BYTES

    # Activations, per token.
    layer_base = reference_layer_bytes(shape, a, seq)
    lora_all = sum(per_layer_lora.values())
    lora_max_layer = max((v for k, v in per_layer_lora.items() if k is not None), default=0)
    boundary = a * h + (4 * h + a * h)  # embeddings' output; final norm and head input
    factor = KBIT_ACTIVATION_FACTOR if quantized else 1.0
    if spec.gradient_checkpointing:
        per_token = L * a * h + factor * (layer_base + lora_max_layer) + boundary
    else:
        per_token = factor * (L * layer_base + lora_all) + boundary
    activations = tokens * per_token
    if micro > 1 or spec.packing:
        # A padded micro-batch, or packed examples (the collator builds a block-causal 4D mask):
        # a materialised (micro, 1, seq, seq) mask, bool for SDPA, compute dtype for eager.
        activations += micro * seq * seq * (1 if shape.attn_implementation != "eager" else a)

    logits = tokens * shape.vocab_size * (a + LOGITS_EXTRA_BYTES)

    largest = shape.largest_quantizable
    workspace = tokens * a * (3 * i + 2 * h)
    if quantized:
        workspace += 2 * a * largest
    if lora.use_dora:
        workspace += (a + 8) * largest  # dequantized W, B@A and their sum, one layer at a time

    breakdown = {
        "base_weights_quantized": int(base),
        "unquantized_params": int(unquantized),
        "lora_params": int(lora_param_bytes),
        "lora_grads": int(lora_grad_bytes),
        "optimizer_state": int(optim),
        "activations": int(activations),
        "logits": int(logits),
        "backward_workspace": int(workspace),
    }
    if kind == "cpu":
        return [_cpu_estimate(spec, shape, breakdown, dtype)]
    pieces = fast_pieces(spec, device)
    if pieces["fused_lora"]:
        variants = _variant_pieces(spec, device, pieces)
        return [_fast_estimate(spec, shape, device, dtype, v, breakdown)
                for v in (variants[-1:] if minimum_only else variants)]
    breakdown["cuda_context"] = cuda_context_bytes(device)
    breakdown["allocator_slack"] = int(ALLOCATOR_SLACK * sum(
        v for k, v in breakdown.items() if k != "cuda_context"))
    return [MemoryEstimate(breakdown=breakdown, total=sum(breakdown.values()),
                           compute_dtype=dtype, device_kind=kind)]


# -- the fast path (service/train/fast) on CUDA --------------------------------------------------
# What `fast.resolve_fast` turns on for "auto" on a GPU, decided here without torch (the scheduler
# estimates in the API process). Liger's kernels depend on the node's software, not its memory,
# so they are not part of the decision.
FAST_CHUNKED_LOSS_GRAD_BYTES = 2  # Liger's fused linear CE keeps grad wrt the hidden states
FAST_RESIDENT_LAYER_INPUTS = 2  # offloaded: the layer being recomputed + the one prefetched
# Calibration: bench/gpu_memory.py over the whole grid (1B/3B/8B x seq 512/2048/8192 x mb 1/4 x
# r 16/64 x packed or not) on an H200 (bench/results/h200x4-2026-11-27d). The peak *allocated*
# memory of the run (grid-before-expandable.json) is, to within -2.4 / +1.4 % on every point,
#   FAST_WEIGHT_FACTOR x the resident terms (weights, adapters, their grads and optimizer state;
#     the excess is the dequantised copy of the widest layer and cuBLAS's workspace)
#   + FAST_TOKEN_FACTOR x the per-token terms as written below (activations, loss chunk,
#     backward workspace; the recompute frees activations while the backward's buffers grow)
#   + where CUDA graphs run, the graphs' terms below.
# The trainer runs with expandable segments (allocator.py), so the allocator reserves what is
# allocated plus page rounding: ALLOCATOR_PAGE_SLACK of it plus FAST_FIXED_SLACK. (Without them
# the same grid reserved 0.05 to 3.4 GiB more than it allocated, unpredictably: fragmentation.)
# Checked on the grid again with expandable segments (grid.json): predicted / driver-visible
# peak of training 1.00 - 1.08 on every point (before the loading term below was added).
FAST_WEIGHT_FACTOR = 1.05
FAST_TOKEN_FACTOR = 0.67
ALLOCATOR_PAGE_SLACK = 0.05
FAST_FIXED_SLACK = 128 * MiB


# CUDA graphs (fast/graphs.py) add their static inputs and a private pool whose blocks the eager
# allocator cannot reuse: 0.07 x the per-token terms in the fit above (10.5 % of the eager
# share), raised to 12.5 % so that the largest graphed point, 8B at 32k tokens, is covered too,
# plus a fixed part for the graphs themselves. Graphs run only where that fits; on a card too
# small for it the trainer runs the same fast path without them (`fit_to_room`).
GRAPHS_FIXED = 64 * MiB
GRAPHS_PER_WORKING_BYTE = 0.125


def fast_pieces(spec: TrainSpec, device: DeviceInfo) -> dict[str, bool]:
    """Which memory-relevant fast-path pieces run for `spec` on `device` (a CUDA node): the
    subset of spec.FAST_PIECES that `_fast_estimate` models, each on unless switched "off" or
    impossible for the spec (the rules of `fast.resolve_fast`'s `_can_run`). `cuda_graphs` here
    means "possible"; whether the card has room for them is `fit_to_room`'s decision."""
    switches = spec.fast_spec()
    possible = {
        "fused_lora": spec.quantization in ("nf4", "fp4") and not spec.lora.use_dora,
        "offload_activations": spec.gradient_checkpointing,
        "padding_free": True,
        "chunked_loss": True,
        "host_embeddings": True,
        "host_head": True,
        "cuda_graphs": cuda_graphs_unsupported(spec, device.compute_capability) is None,
    }
    out = {piece: can and getattr(switches, piece) != "off" for piece, can in possible.items()}
    out["host_head"] = out["host_head"] and out["chunked_loss"]
    out["cuda_graphs"] = out["cuda_graphs"] and out["padding_free"] and out["chunked_loss"]
    # The minimum (what placement fits a job by): the head in host memory where it may go, and
    # then no graphs (the streamed head's copies are paced by the host).
    if out["host_head"]:
        out["cuda_graphs"] = False
    return out


def _straight_load_allocated(base_quantized: int, shape: ModelShape, a: int,
                             host_embeddings: bool) -> int:
    """Allocated bytes at the peak of loading onto the GPU: the quantised layers, every
    unquantised table (but the input embedding where the fast path keeps it in host memory: the
    loader reads it there, model.py), and one layer arriving unquantised."""
    on_card = shape.other_params
    if host_embeddings and not shape.tied_embeddings:
        on_card -= shape.vocab_size * shape.hidden_size
    return base_quantized + on_card * a + shape.largest_quantizable * a


def straight_load_bytes(spec: TrainSpec, device: DeviceInfo, *, config: Any = None) -> int:
    """Driver-visible bytes of loading `spec`'s model straight onto the GPU (every table there
    but a host-kept input embedding, quantised layers arriving one at a time), context and page
    slack included. The trainer loads on the CPU instead (host_head only) where the room is
    smaller than this."""
    shape = model_shape(spec, config=config)
    a = _DTYPE_BYTES[resolve_compute_dtype(spec, device)]
    allocated = _straight_load_allocated(_quantized_weight_bytes(spec, shape, a), shape, a,
                                         fast_pieces(spec, device)["host_embeddings"])
    return int(allocated * (1 + ALLOCATOR_PAGE_SLACK) + FAST_FIXED_SLACK
               + cuda_context_bytes(device))


def loss_chunk_rows(tokens: int, vocab: int, hidden: int) -> int:
    """Rows of logits per chunk of the fast path's loss: Liger's rule, the next power of two of
    tokens / ceil(vocab / hidden). Here because it is arithmetic the estimate needs without
    torch; loss.py's `small_chunk` (the CUDA graphs' loss) is this function."""
    rows = math.ceil(tokens / max(1, math.ceil(vocab / max(1, hidden))))
    return 1 << max(0, math.ceil(math.log2(max(1, rows))))


# fast/host_head.py's default block (its `default_block_rows`), restated without torch.
HOST_HEAD_LOGITS_BLOCK_BYTES = 64 * MiB
HOST_HEAD_WEIGHT_BLOCK_BYTES = 16 * MiB
HOST_HEAD_MIN_BLOCK_ROWS = 512


def host_head_block_rows(tokens: int, vocab: int, hidden: int, elem: int) -> int:
    """Vocabulary rows per block of the streamed head's loss (fast/host_head.py)."""
    by_logits = HOST_HEAD_LOGITS_BLOCK_BYTES // (4 * max(1, tokens))
    by_weight = HOST_HEAD_WEIGHT_BLOCK_BYTES // max(1, hidden * elem)
    return max(1, min(vocab, max(HOST_HEAD_MIN_BLOCK_ROWS, min(by_logits, by_weight))))


def _variant_pieces(spec: TrainSpec, device: DeviceInfo,
                    minimum: dict[str, bool]) -> list[dict[str, bool]]:
    """The fast path's memory configurations, richest (fastest) first, ending with `minimum`:
    the head on the GPU with CUDA graphs, then without them, then the head in host memory. A
    switch set "on" pins its piece; "off" removes the configurations that need it."""
    switches = spec.fast_spec()
    graphs_ok = (cuda_graphs_unsupported(spec, device.compute_capability) is None
                 and switches.cuda_graphs != "off" and minimum["padding_free"]
                 and minimum["chunked_loss"])
    out = []
    if switches.host_head != "on":
        head_on_gpu = {**minimum, "host_head": False}
        if graphs_ok:
            out.append({**head_on_gpu, "cuda_graphs": True})
        out.append({**head_on_gpu, "cuda_graphs": False})
    if minimum["host_head"]:
        out.append(minimum)
    return out


def first_fit(variants: list["MemoryEstimate"], room: int) -> "MemoryEstimate":
    """The first (richest) of `variants` within `room` bytes; the last (the minimum) if none."""
    return next((v for v in variants if v.total <= room), variants[-1])


def fit_to_room(spec: TrainSpec, device: DeviceInfo, room: int, *, config: Any = None
                ) -> "MemoryEstimate":
    """The richest configuration of `fast_variants` within `room` bytes (the minimum if none
    is): whether the output head stays on the GPU and CUDA graphs run (`.host_head`,
    `.graphs`)."""
    return first_fit(fast_variants(spec, device, config=config), room)


def fast_layer_bytes(spec: TrainSpec, shape: ModelShape, a: int,
                     pieces: dict[str, bool]) -> int:
    """Bytes per token of one decoder layer's activations on the fast path (`a`: bytes of the
    compute dtype), before the calibration factor: what a layer being recomputed holds. Shared
    by the one-card estimate and the split one (memory_split.py), so they count alike."""
    h, i = shape.hidden_size, shape.intermediate_size
    q = shape.num_heads * shape.head_dim
    kv = shape.num_kv_heads * shape.head_dim
    layer = (2 * a * h  # RMSNorm inputs (Liger keeps them in the compute dtype)
             + 2 * a * h  # normed inputs of attention and MLP (shared by q/k/v, gate/up)
             + a * (q + 2 * kv)  # q, k, v after RoPE
             + 2 * a * q + 4 * shape.num_heads  # attention output, its copy, fp32 LSE
             + 3 * a * i)  # gate, up, and down's input
    if shape.attn_implementation == "eager" and not pieces["padding_free"]:
        layer += shape.num_heads * spec.max_seq_len * (a + 4 + a)  # scores, fp32 softmax, cast
    return layer


def fast_loss_bytes(shape: ModelShape, a: int, pieces: dict[str, bool], tokens: int) -> float:
    """Bytes of the fast path's loss for `tokens` tokens, before the calibration factor: the
    streamed host head's, the chunked loss', or full logits. Held by the card the head's loss
    runs on (the last one of a split model)."""
    h, V = shape.hidden_size, shape.vocab_size
    if pieces.get("host_head"):
        # The streamed loss: its fp32 gradient wrt the hidden states and its cast, one block's
        # fp32 logits and their softmax, two weight blocks in flight. Not scaled by
        # FAST_TOKEN_FACTOR below (not calibrated on the grid: the head stays on a big card).
        rows = host_head_block_rows(tokens, V, h, a)
        return (tokens * h * (4 + a) + 2 * tokens * rows * 4
                + 2 * rows * h * a) / FAST_TOKEN_FACTOR
    if pieces["chunked_loss"]:
        chunk = loss_chunk_rows(tokens, V, h)
        return tokens * h * FAST_CHUNKED_LOSS_GRAD_BYTES + chunk * V * (a + 4)
    return tokens * V * (a + LOGITS_EXTRA_BYTES)


def _fast_estimate(spec: TrainSpec, shape: ModelShape, device: DeviceInfo, dtype: str,
                   pieces: dict[str, bool], terms: dict[str, int]) -> MemoryEstimate:
    """Peak GPU memory of the fast path: bf16 embeddings and norms (no fp32 upcast), LoRA
    inputs saved once per shared input and no r-wide intermediates, layer inputs in pinned host
    memory while offloaded, no logits beyond one chunk, no padding mask."""
    a = _DTYPE_BYTES[dtype]
    h, i, L = shape.hidden_size, shape.intermediate_size, shape.num_layers
    V = shape.vocab_size
    tokens = spec.micro_batch_size * spec.max_seq_len
    lora_params = terms["lora_params"] // LORA_PARAM_BYTES
    # The input table in host memory (fast/embeddings.py) unless the head shares it; the head
    # (and a table tied to it) there too where host_head is on (fast/host_head.py).
    host_rows = V * h if pieces.get("host_embeddings") and not shape.tied_embeddings else 0
    if pieces.get("host_head"):
        host_rows += V * h

    layer = fast_layer_bytes(spec, shape, a, pieces)
    if spec.gradient_checkpointing:
        resident = FAST_RESIDENT_LAYER_INPUTS if pieces["offload_activations"] else L
        per_token = resident * a * h + layer
    else:
        per_token = L * layer
    per_token += 2 * a * h  # embeddings' output, final norm output
    logits = fast_loss_bytes(shape, a, pieces, tokens)
    workspace = tokens * a * (3 * i + 2 * h)
    activations = tokens * per_token
    breakdown = {
        "base_weights_quantized": terms["base_weights_quantized"],
        "unquantized_params": (shape.other_params - host_rows) * a,
        "lora_params": terms["lora_params"],
        "lora_grads": terms["lora_grads"],
        "lora_compute_copies": lora_params * a,
        "optimizer_state": terms["optimizer_state"],
    }
    resident = sum(breakdown.values())
    breakdown.update({
        "weight_workspace": int((FAST_WEIGHT_FACTOR - 1) * resident),
        "activations": int(FAST_TOKEN_FACTOR * activations),
        "logits": int(FAST_TOKEN_FACTOR * logits),
        "token_workspace": int(FAST_TOKEN_FACTOR * workspace),
    })
    if pieces.get("cuda_graphs"):
        working = breakdown["activations"] + breakdown["logits"] + breakdown["token_workspace"]
        breakdown["cuda_graphs_pool"] = int(GRAPHS_FIXED + GRAPHS_PER_WORKING_BYTE * working)
    allocated = sum(breakdown.values())
    if not pieces.get("host_head"):
        # Loading straight to the GPU puts the head (and every table the fast path does not
        # keep in host memory) there in the compute dtype, and one layer arrives unquantised at
        # a time. With a small micro-batch that, not training, can be the peak. (With host_head
        # the model is loaded on the CPU where that would not fit, and only what stays moves:
        # model.py, `straight_load_bytes`.)
        loading = _straight_load_allocated(terms["base_weights_quantized"], shape, a,
                                           bool(pieces.get("host_embeddings")))
        if loading > allocated:
            breakdown["loading_peak"] = int(loading - allocated)
            allocated = loading
    breakdown["cuda_context"] = cuda_context_bytes(device)
    breakdown["allocator_slack"] = int(ALLOCATOR_PAGE_SLACK * allocated + FAST_FIXED_SLACK)
    return MemoryEstimate(breakdown=breakdown, total=sum(breakdown.values()),
                          compute_dtype=dtype, device_kind="cuda",
                          host_head=bool(pieces.get("host_head")))


# -- the CPU branch ------------------------------------------------------------------------------
# A job that trains on the CPU holds its tensors in the runner process's RAM, next to everything
# the process itself is. Measured with psutil RSS (bench/cpu_memory.py, torch 2.13 CPU,
# transformers 5.24, peft 0.21, bitsandbytes 0.50): a runner that has imported the trainer and
# trained the 0.1M-parameter tiny model peaks at ~577 MiB, i.e. the runtime alone; a
# SmolLM2-135M-shaped model (fp32 safetensors, 652 MB, seq 256, micro-batch 2) at ~1.9 GiB. The
# estimate below is 1.03x and 1.12x those peaks (conservative, as a placement bound should be).
CPU_RUNTIME_BYTES = 512 * MiB  # python + torch + transformers + peft + bitsandbytes + Ray worker
CPU_TOKENIZER_DATA_BYTES = 64 * MiB  # tokenizer, the tokenized data set and its collator
CPU_ALLOCATOR_SLACK = 0.10  # glibc malloc keeps freed arenas; the fp32 CPU path copies more

_ckpt_lock = threading.Lock()
_ckpt_cache: dict[tuple, int] = {}


def _checkpoint_bytes(spec: TrainSpec, shape: ModelShape) -> int:
    """Bytes of the base model's weights as stored (what loading reads into RAM before they are
    quantized, and what the allocator keeps afterwards): the .safetensors / .gguf files' sizes,
    or for a config-only folder the parameter count at the config's dtype (fp32 if unnamed)."""
    path = Path(spec.base_model)
    key = (str(path), spec.gguf_file, _mtime(spec))
    with _ckpt_lock:
        hit = _ckpt_cache.get(key)
    if hit is not None:
        return hit
    n = 0
    if path.is_file():
        n = path.stat().st_size
    elif path.is_dir():
        files = [path / spec.gguf_file] if spec.gguf_file else list(path.glob("*.safetensors"))
        n = sum(f.stat().st_size for f in files if f.is_file())
        if not n:
            dtype = None
            try:
                import json

                cfg = json.loads((path / "config.json").read_text())
                dtype = cfg.get("dtype") or cfg.get("torch_dtype")
            except (OSError, ValueError):
                pass
            n = shape.total_params * {"bfloat16": 2, "float16": 2}.get(str(dtype), 4)
    with _ckpt_lock:
        if len(_ckpt_cache) >= _SHAPE_CACHE_MAX:
            _ckpt_cache.clear()
        _ckpt_cache[key] = n
    return n


def _cpu_estimate(spec: TrainSpec, shape: ModelShape, terms: dict[str, int],
                  dtype: str) -> MemoryEstimate:
    """Peak RAM of a job training on the CPU: the analytic tensor terms (as on a GPU, minus the
    CUDA context) plus what the process and the load cost on the CPU: the Python/torch runtime,
    the tokenizer and data, and the stored weights read in to be quantized."""
    breakdown = dict(terms)
    breakdown["checkpoint_load"] = int(_checkpoint_bytes(spec, shape))
    breakdown["tokenizer_and_data"] = CPU_TOKENIZER_DATA_BYTES
    breakdown["allocator_slack"] = int(CPU_ALLOCATOR_SLACK * sum(breakdown.values()))
    breakdown["python_torch_runtime"] = CPU_RUNTIME_BYTES
    return MemoryEstimate(breakdown=breakdown, total=sum(breakdown.values()),
                          compute_dtype=dtype, device_kind="cpu")


__all__ = [
    "LinearShape",
    "MemoryEstimate",
    "ModelShape",
    "estimate_memory",
    "fast_variants",
    "first_fit",
    "fit_to_room",
    "straight_load_bytes",
    "load_config",
    "loss_chunk_rows",
    "model_shape",
    "resolve_compute_dtype",
]
