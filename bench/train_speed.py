"""QLoRA training speed and memory: lorapool vs the plain HF recipe, Liger and Unsloth.

Issue 9's yardstick. On one CUDA GPU, in one process tree and one call, for Llama-3.x shapes
(1B = Llama-3.2-1B, 3B = Llama-3.2-3B, 8B = Llama-3.1-8B, all with the 128,256-token
vocabulary) at seq 2048 and micro-batch 1 and 4, it trains the same LoRA (r16/alpha 32 on all
seven projections, dropout 0, gradient checkpointing, 8-bit AdamW, one micro-batch per
optimizer step, constant lr 1e-4, grad-norm clip 1.0) on the same random model folders (bf16
safetensors, built once on the GPU and shared) and the same random tokens, with each runner:

- `plain`: the seeds' recipe by hand: `from_pretrained` with NF4 double-quant bf16-compute
  `BitsAndBytesConfig`, `prepare_model_for_kbit_training`, `get_peft_model`, non-reentrant
  gradient checkpointing, `bnb.optim.AdamW8bit`, the model's own full-logits cross-entropy;
- `liger`: the same after `apply_liger_kernel_to_llama` (RoPE, RMSNorm, SwiGLU, fused
  linear cross-entropy);
- `unsloth`: `FastLanguageModel.from_pretrained(load_in_4bit=True)` + `get_peft_model(
  use_gradient_checkpointing="unsloth", lora_dropout=0)`, same hand loop (says why when
  Unsloth cannot be imported);
- `lorapool`: `lorapool.service.train.train()` with `fast="auto"` (when `TrainSpec` has it);
  `lorapool-ref`: the same with `fast="off"` (the reference path).

Every (runner, shape, micro-batch) runs in its own subprocess so its peak memory is its own:
`torch.cuda.max_memory_allocated`, `max_memory_reserved` over the training steps, and the
driver-visible peak = CUDA context (measured at the end, after the kernels were loaded) +
peak reserved. tok/s counts the tokens of the steps after `--warmup`. A subprocess that hangs
is killed at its timeout; the whole grid stops launching runs at `--budget-s`, so the table
always prints inside one 10-minute device call. The table gives ratios to `plain` and the
issue's floor (lorapool >= 2.2x plain tok/s, <= 0.55x plain peak; 8B within 6.5 GiB and 3B
within 3.5 GiB driver-visible at mb 1) and goal (lorapool >= Unsloth tok/s, <= its peak).

    python bench/train_speed.py [--shapes 1b,3b,8b] [--mb 1,4] [--steps 5] [--warmup 2]
        [--runners plain,liger,unsloth,lorapool] [--out DIR] [--budget-s 520]
    python bench/train_speed.py --check-same [--out DIR]   # lorapool fast vs reference, 20 steps
    python bench/train_speed.py --cpu-smoke [--out DIR]    # tiny model on the CPU: the harness
    python bench/train_speed.py --card-gib 8 --shapes 8b --mb 1   # as on an 8 GB card

Run `bash bench/device_setup.sh` first on the GPU machine (it installs the carried wheels).
Nothing is downloaded: models are random, data is made here.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

GiB = 1024**3
RESULT_TAG = "@@RESULT "
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RUNNERS = ["plain", "liger", "unsloth", "lorapool", "lorapool-ref"]
DEFAULT_RUNNERS = ["plain", "liger", "unsloth", "lorapool"]
LR = 1e-4

# Llama-3.x shapes on top of tiny.py's "1b" preset (which holds the 128,256 vocabulary).
SHAPES: dict[str, dict[str, Any]] = {
    "1b": {},
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
               num_attention_heads=24, num_key_value_heads=8),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8),
}
SHAPE_TIMEOUT_S = {"tiny": 120, "1b": 150, "3b": 210, "8b": 300}  # one subprocess, load included
SHAPE_BF16_GB = {"tiny": 0.0, "1b": 3.0, "3b": 7.3, "8b": 16.1}  # untied lm_head, as tiny.py

# Issue 9's bars.
FLOOR_SPEED, FLOOR_MEM = 2.2, 0.55
FLOOR_DRIVER_GIB = {"8b": 6.5, "3b": 3.5}


# ------------------------------------------------------------------------------------------------
# model folders and data (shared by every runner)


def models_root(requested: Path | None, shapes: list[str]) -> Path:
    """Where the random model folders live: /dev/shm when it has room (loads at memory speed,
    and the folders survive between calls while the machine stays warm), else /tmp."""
    if requested is not None:
        return requested
    need = sum(SHAPE_BF16_GB.get(s, 0) for s in shapes) * 1e9 * 1.1 + 2e9
    shm = Path("/dev/shm")
    try:
        if shm.is_dir() and shutil.disk_usage(shm).free > need:
            return shm / "lorapool-bench-models"
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / "lorapool-bench-models"


def build_model(dest: Path, shape: str, device: str) -> Path:
    """A random Llama of `shape` as a bf16 safetensors folder (built once; reused after)."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    from lorapool.service.train.tiny import make_random_llama

    marker = dest / "BUILT"
    if marker.exists():
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    if shape == "tiny":
        make_random_llama(dest, "tiny", seed=0)
        marker.write_text("tiny\n")
        return dest
    make_random_llama(dest, "1b", write_weights=False, **SHAPES[shape])
    config = AutoConfig.from_pretrained(dest)
    config.max_position_embeddings = 16384  # room for gpu_memory.py's seq 8192 points
    config.rope_theta = 500000.0  # Llama 3's
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # init straight in bf16: half the bytes, no cast
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    model.save_pretrained(dest, safe_serialization=True)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    marker.write_text(f"{shape}\n")
    return dest


def make_rows(n: int, seq: int, seed: int = 0) -> list[dict]:
    """`n` {"text"} rows of random lowercase letters, each longer than `seq` characters: with
    the per-character tokenizer every row is exactly `seq` tokens after truncation."""
    rng = random.Random(seed)
    alphabet = string.ascii_lowercase + " "
    return [{"text": "".join(rng.choice(alphabet) for _ in range(seq + 16))} for _ in range(n)]


def token_batches(tokenizer, rows: list[dict], seq: int, mb: int):
    """The rows as (input_ids, labels) micro-batches, tokenized the way lorapool does a text
    row (no BOS with this tokenizer; truncated to `seq`; the first label ignored)."""
    import torch

    ids = [tokenizer(r["text"], add_special_tokens=True)["input_ids"][:seq] for r in rows]
    if any(len(x) != seq for x in ids):
        raise RuntimeError("a row tokenized to fewer than seq tokens")
    out = []
    for i in range(0, len(ids) - mb + 1, mb):
        t = torch.tensor(ids[i:i + mb], dtype=torch.long)
        labels = t.clone()
        labels[:, 0] = -100
        out.append((t, labels))
    return out


# ------------------------------------------------------------------------------------------------
# the child: one runner on one (shape, mb)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _hand_loop(model, batches, steps: int, device: str, on_step) -> list[float]:
    """The loop every hand-written runner shares: forward with labels (the model's own loss),
    backward, clip 1.0, 8-bit AdamW step; one micro-batch per optimizer step."""
    import bitsandbytes as bnb
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = bnb.optim.AdamW8bit(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    model.train()
    losses = []
    for i in range(steps):
        ids, labels = batches[i % len(batches)]
        out = model(input_ids=ids.to(device), labels=labels.to(device), use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
        del out
        _sync(device)
        on_step(i)
    return losses


def _load_hf_4bit(folder: Path, device: str):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=q, dtype=dtype, local_files_only=True,
        device_map={"": 0 if device == "cuda" else "cpu"}, attn_implementation="sdpa")
    for m in model.modules():  # bitsandbytes' CPU inference repacking breaks autograd
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    model.config.use_cache = False
    return model


def _peft_wrap(model):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                     bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def run_hand(job: dict, clock) -> dict:
    """plain / liger / unsloth: load, wrap, and train with `_hand_loop`."""
    import torch

    runner, device, folder = job["runner"], job["device"], Path(job["model"])
    rows = json.loads(Path(job["rows"]).read_text())
    if runner == "unsloth":
        try:
            import unsloth  # noqa: F401  (first, so its patches see transformers/peft)
            from unsloth import FastLanguageModel
        except Exception as exc:  # noqa: BLE001 - any import failure means "cannot compare"
            return {"status": "unavailable", "reason": f"{type(exc).__name__}: {exc}"[:500]}
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=str(folder), max_seq_length=job["seq"], dtype=torch.bfloat16,
            load_in_4bit=True, fix_tokenizer=False)  # the char tokenizer needs no fixing
        model = FastLanguageModel.get_peft_model(
            model, r=16, lora_alpha=32, lora_dropout=0, target_modules=TARGETS, bias="none",
            use_gradient_checkpointing="unsloth", random_state=job["seed"])
        FastLanguageModel.for_training(model)
    else:
        from transformers import AutoTokenizer

        if runner == "liger":
            try:
                from liger_kernel.transformers import apply_liger_kernel_to_llama
            except Exception as exc:  # noqa: BLE001
                return {"status": "unavailable", "reason": f"{type(exc).__name__}: {exc}"[:500]}
            apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True,
                                        cross_entropy=False, fused_linear_cross_entropy=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = _peft_wrap(_load_hf_4bit(folder, device))
    # lorapool visits an epoch's rows in `randperm(n, Generator().manual_seed(seed))` order;
    # the hand runners take the same order, so step i sees the same tokens in every runner.
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(job["seed"]))
    batches = token_batches(tokenizer, [rows[i] for i in order.tolist()], job["seq"], job["mb"])
    clock.loaded()
    prof = _profiler(job)
    on_step = clock.step
    if prof is not None:
        prof.start()

        def on_step(i: int) -> None:
            clock.step(i)
            prof.step()
    losses = _hand_loop(model, batches, job["steps"], device, on_step)
    if prof is not None:
        prof.stop()
        Path(job["profile"]).write_text(_profile_tables(prof, device))
    return {"status": "ok", "losses": losses}


def run_lorapool(job: dict, clock) -> dict:
    """lorapool / lorapool-ref through the public `train()`."""
    from lorapool.service.train import LoraSpec, TrainSpec, train

    device = job["device"]
    kw: dict[str, Any] = dict(
        base_model=job["model"], base_model_id=f"random-llama-{job['shape']}",
        lora=LoraSpec(r=job.get("r", 16), alpha=2 * job.get("r", 16), dropout=0.0),
        max_seq_len=job["seq"], micro_batch_size=job["mb"], batch_size=job["mb"],
        max_steps=job["steps"], gradient_checkpointing=True, learning_rate=LR,
        lr_scheduler="constant", warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0,
        optimizer="adamw_8bit", device=device, seed=job["seed"], quantization="nf4",
        compute_dtype="bf16" if device == "cuda" else "auto", packing=job.get("packing", False))
    fast = job.get("fast") or ("off" if job["runner"] == "lorapool-ref" else "auto")
    has_fast = "fast" in TrainSpec.model_fields
    if has_fast:
        kw["fast"] = fast
    spec = TrainSpec(**kw)
    predicted = _predict(spec, job.get("context_bytes")) if job.get("predict") else {}
    losses: list[float] = []
    notes: list[str] = []

    def on_event(ev) -> None:
        if ev.type == "status" and ev.message.startswith("training"):
            clock.loaded(reset=False)  # the loop's last word before its first step
        if ev.type == "step":
            clock.loaded(reset=False)  # no-op unless the status message above changed
            losses.append(ev.loss)
            clock.step(len(losses) - 1)
        elif ev.type in ("status", "warning") and ev.message:
            notes.append(ev.message)
        if ev.data and any(k in ev.data for k in ("fast", "fast_plan", "plan")):
            notes.append(json.dumps(ev.data, default=str)[:400])

    out = Path(job["scratch"]) / "lorapool-out"
    prof = _profiler(job)
    if prof is not None:
        prof.start()
        inner = on_event

        def on_event(ev) -> None:  # noqa: F811 - the same sink, stepping the profiler too
            inner(ev)
            if ev.type == "step":
                prof.step()
    trace = job.get("memory_trace") if device == "cuda" else None
    if trace:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import memory_trace

        memory_trace.start()
    kwargs: dict[str, Any] = {}
    if job.get("card_gib") and device == "cuda":
        from lorapool.service.train import MemoryBudget

        # What a scheduler reserves on such a card at most: all of it, with the context the
        # node's probe measured (the estimate counts it).
        kwargs["memory_budget"] = MemoryBudget(total=int(job["card_gib"] * 2**30),
                                               context_bytes=job.get("context_bytes"))
    result = train(spec, job["rows_jsonl"], out, on_event=on_event,
                   cache_dir=Path(job["scratch"]) / "cache", **kwargs)
    if trace:
        memory_trace.stop_and_report(trace)
    if prof is not None:
        prof.stop()
        Path(job["profile"]).write_text(_profile_tables(prof, device))
    return {"status": "ok", "losses": losses, "adapter_dir": str(result.adapter_dir),
            "fast_plan": _recorded_fast(result.adapter_dir),
            "fast_requested": fast if has_fast else "n/a (TrainSpec has no `fast`)",
            "micro_batch_used": result.metrics.get("micro_batch_size"),
            "cuda_graphs": result.metrics.get("cuda_graphs"),
            "load_peak_reserved": result.metrics.get("load_peak_reserved_bytes"),
            "notes": notes[-12:], **predicted}


def _profiler(job: dict):
    """A torch profiler over steps 3-4 of this run when --profile asked for it (else None)."""
    if not job.get("profile"):
        return None
    from torch.profiler import ProfilerActivity, profile, schedule

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if job["device"] == "cuda" else [])
    # Input shapes, so the second table can tell the ops apart by what they ran on; kernels
    # replayed from a CUDA graph have no launching op (profile a run with cuda_graphs off).
    return profile(activities=acts, schedule=schedule(wait=2, warmup=1, active=2, repeat=1),
                   record_shapes=True)


def _profile_tables(prof, device: str) -> str:
    """The profile as two tables: everything by total time (kernels and annotated ranges),
    then the ops by their input shapes, by their own device time (which op on which tensors:
    an (N, vocab) elementwise op is the loss, an (N, intermediate) one the MLP)."""
    by = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    own = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    kernels = prof.key_averages().table(sort_by=by, row_limit=40, max_name_column_width=60)
    shapes = prof.key_averages(group_by_input_shape=True).table(
        sort_by=own, row_limit=40, max_name_column_width=60, max_shapes_column_width=80)
    return f"{kernels}\n\nby op and input shapes:\n{shapes}"


def _recorded_fast(adapter_dir) -> Any:
    """What the run recorded about its fast path in the adapter's lorapool.json, if anything."""
    for name in ("lorapool.json", "lorapool_meta.json"):
        meta = Path(adapter_dir or "") / name
        if meta.is_file():
            data = json.loads(meta.read_text())
            found = {k: v for k, v in data.items() if "fast" in k.lower()}
            for v in data.values():
                if isinstance(v, dict):
                    found.update({k: x for k, x in v.items()
                                  if "fast" in k.lower() and k not in found})
            return found or None
    return None


def probe_context(device: str, log, gpu: Any = None) -> int | None:
    """The CUDA context a training process takes on this GPU, as a node measures it at join
    (service/train/context_probe.py), in a subprocess: the parent keeps no CUDA context."""
    if device != "cuda":
        return None
    cmd = [sys.executable, "-m", "lorapool.service.train.context_probe"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env_for(gpu))
        log.write(f"==== context probe (rc {p.returncode})\n{p.stdout}\n{p.stderr[-3000:]}\n")
        return json.loads(p.stdout.strip().splitlines()[-1])["context_bytes"]
    except Exception as exc:  # noqa: BLE001 - the estimate then keeps its constant
        log.write(f"==== context probe failed: {exc}\n")
        return None


def _predict(spec, context_bytes: int | None = None) -> dict:
    """lorapool's own estimate for `spec` on this GPU (gpu_memory.py compares it), with the
    CUDA context the node measured (`probe_context`) when given, as placement has it."""
    import torch

    from lorapool.service.train import DeviceInfo, estimate_memory

    try:
        if spec.device == "cpu":  # the CPU smoke test of the plumbing
            dev = DeviceInfo(kind="cpu", name="cpu", total_memory=0)
        else:
            p = torch.cuda.get_device_properties(0)
            dev = DeviceInfo(kind="cuda", name=p.name, total_memory=p.total_memory,
                             compute_capability=(p.major, p.minor), context_bytes=context_bytes)
        # graphs=True: the card alone, as this run has it (placement adds the graphs' pool on
        # the node it chooses when that node has room, as here).
        est = estimate_memory(spec, dev, graphs=True)
        return {"predicted": est.total, "breakdown": est.breakdown}
    except Exception as exc:  # noqa: BLE001 - report, the measurement still counts
        return {"predict_error": f"{type(exc).__name__}: {exc}"[:300]}


class Clock:
    """Load time, per-step end times, and CUDA peaks reset at the training start."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.t0 = time.perf_counter()
        self.t_loaded: float | None = None
        self.steps: list[float] = []
        self.reserved_after_load: int | None = None
        self.load_peak_reserved: int | None = None  # the allocator's peak while loading

    def loaded(self, reset: bool = True) -> None:
        """The model is loaded and training starts now. `reset`: start the CUDA peaks here
        (the hand runners; lorapool's loop resets them itself where its training starts), so
        every runner's peak covers its training steps, weights included."""
        import torch

        if self.t_loaded is None:
            self.t_loaded = time.perf_counter()
            if self.device == "cuda":
                self.reserved_after_load = torch.cuda.memory_reserved()
                if reset:
                    self.load_peak_reserved = torch.cuda.max_memory_reserved()
                    torch.cuda.reset_peak_memory_stats()

    def step(self, i: int) -> None:
        self.steps.append(time.perf_counter())


def child_main(job: dict) -> dict:
    # Every runner alike: no compute kernels fetched from the Hub (bitsandbytes asks for one as
    # it is imported on AVX512-BF16 CPUs), as in lorapool's own processes. Imports nothing of
    # transformers or torch, so Unsloth still comes first.
    from lorapool.service.hub_guard import refuse_hub_kernels

    refuse_hub_kernels()
    if job["runner"] == "unsloth":
        # Unsloth sets its allocator options and patches at import: import it before torch
        # touches the GPU (and before transformers/peft), as its users do.
        try:
            import unsloth  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - any import failure means "cannot compare"
            return {"status": "unavailable", "reason": f"{type(exc).__name__}: {exc}"[:500],
                    "runner": "unsloth", "shape": job["shape"], "mb": job["mb"]}
    import torch

    device = job["device"]
    if device == "cuda":
        torch.cuda.init()
        torch.zeros(1, device="cuda")
        if job.get("card_gib"):
            # A smaller card on a big one: the allocator may hold what such a card leaves
            # after this process's CUDA context (measured now), no more.
            free, total = torch.cuda.mem_get_info()
            context = (total - free) - torch.cuda.memory_reserved()
            room = int(job["card_gib"] * 2**30) - context
            torch.cuda.set_per_process_memory_fraction(max(0.01, min(1.0, room / total)))
    torch.manual_seed(job["seed"])
    clock = Clock(device)
    runner = job["runner"]
    res = run_lorapool(job, clock) if runner.startswith("lorapool") else run_hand(job, clock)
    res.update(runner=runner, shape=job["shape"], mb=job["mb"], seq=job["seq"],
               steps=job["steps"], warmup=job["warmup"], device_name=device_line())
    if res["status"] != "ok":
        return res
    n_timed = len(clock.steps) - job["warmup"]
    tokens = job["mb"] * job["seq"]
    if n_timed >= 1 and job["warmup"] >= 1:
        res["tok_s"] = n_timed * tokens / (clock.steps[-1] - clock.steps[job["warmup"] - 1])
    elif clock.steps and clock.t_loaded:
        res["tok_s"] = len(clock.steps) * tokens / (clock.steps[-1] - clock.t_loaded)
    res["load_s"] = (clock.t_loaded or clock.t0) - clock.t0
    res["final_loss"] = res["losses"][-1] if res["losses"] else None
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        context = (total - free) - torch.cuda.memory_reserved()
        if job.get("shared_gpu") and job.get("context_bytes"):
            # Other runs share this GPU, so what the card has in use is not ours alone: count
            # the context a training process takes here, as the node's probe measured it.
            context = int(job["context_bytes"])
        # The card must hold loading too: its peak, from before the counters restart for
        # training (lorapool's trainer reports it; the hand runners' clock kept it).
        loading = res.get("load_peak_reserved") or clock.load_peak_reserved or 0
        res.update(peak_alloc=torch.cuda.max_memory_allocated(),
                   peak_reserved=torch.cuda.max_memory_reserved(),
                   reserved_after_load=clock.reserved_after_load, context=context,
                   driver_peak=context + max(torch.cuda.max_memory_reserved(), loading),
                   driver_peak_training=context + torch.cuda.max_memory_reserved())
    return res


# ------------------------------------------------------------------------------------------------
# the parent: subprocesses, budget, table


class LockedLog:
    """A log file that several lane threads write to, a whole entry at a time."""

    def __init__(self, log) -> None:
        import threading

        self._log, self._lock = log, threading.Lock()

    def write(self, text: str) -> None:
        with self._lock:
            self._log.write(text)

    def flush(self) -> None:
        with self._lock:
            self._log.flush()


def _env_for(gpu: Any) -> dict | None:
    """The environment of a child pinned to one GPU (None: inherit, all GPUs visible)."""
    if gpu is None:
        return None
    return {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}


def run_child(job: dict, timeout_s: float, log, gpu: Any = None) -> dict:
    """Run one job in a fresh Python (its own process group, killed whole on timeout)."""
    scratch = Path(job["scratch"])
    scratch.mkdir(parents=True, exist_ok=True)
    job_file = scratch / "job.json"
    job_file.write_text(json.dumps(job))
    errf = open(scratch / "stderr.txt", "w+")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--_child", str(job_file)],
                            stdout=subprocess.PIPE, stderr=errf, text=True,
                            start_new_session=True, env=_env_for(gpu))
    try:
        stdout, _ = proc.communicate(timeout=timeout_s)
        status = None
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, _ = proc.communicate()
        status = "timeout"
    wall = time.perf_counter() - t0
    errf.seek(0)
    err = errf.read()
    errf.close()
    head = f"==== {job['runner']} {job['shape']} mb{job['mb']} seq{job['seq']} " \
           f"(rc {proc.returncode}, {wall:.0f} s)"
    chatter = "\n".join(x for x in stdout.splitlines() if not x.startswith(RESULT_TAG))
    log.write(f"{head}\n-- stdout --\n{chatter[-3000:]}\n-- stderr --\n{err[-6000:]}\n")
    log.flush()
    res = None
    for line in stdout.splitlines():
        if line.startswith(RESULT_TAG):
            res = json.loads(line[len(RESULT_TAG):])
    if res is None:
        tail = " | ".join(x for x in err.strip().splitlines()[-4:])
        res = {"status": status or "error",
               "reason": (f"killed after {timeout_s:.0f} s" if status else
                          f"exit {proc.returncode}: {tail}")[-600:]}
    res.update(runner=job["runner"], shape=job["shape"], mb=job["mb"], seq=job["seq"],
               wall_s=wall)
    return res


def build_models(shapes: list[str], root: Path, device: str, timeout_s: float, log,
                 gpu: Any = None) -> dict:
    """Build every missing model folder, each in its own subprocess (the parent keeps no CUDA
    context). Returns shape -> folder or an error string."""
    out: dict[str, Any] = {}
    for shape in shapes:
        dest = root / f"llama-{shape}"
        if (dest / "BUILT").exists():
            out[shape] = dest
            continue
        t0 = time.perf_counter()
        cmd = [sys.executable, os.path.abspath(__file__), "--_build", shape, str(dest), device]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                               env=_env_for(gpu))
            ok = p.returncode == 0 and (dest / "BUILT").exists()
            log.write(f"==== build {shape} (rc {p.returncode})\n{p.stderr[-4000:]}\n")
            out[shape] = dest if ok else f"build failed: {p.stderr.strip()[-300:]}"
        except subprocess.TimeoutExpired:
            out[shape] = f"build timed out after {timeout_s:.0f} s"
        print(f"  model {shape}: {out[shape]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return out


def build_models_parallel(shapes: list[str], root: Path, device: str, timeout_s: float, log,
                          gpus: list) -> dict:
    """`build_models` for every shape, one build per GPU at a time (each pinned to its GPU),
    largest first when there are several GPUs, so the lanes finish together."""
    import threading

    gpus = list(dict.fromkeys(gpus)) or [None]
    built: dict[str, Any] = {}
    order = sorted(shapes, key=lambda sh: -SHAPE_TIMEOUT_S.get(sh, 300)) if len(gpus) > 1 \
        else shapes
    threads = [threading.Thread(target=lambda sh=sh, g=gpus[i % len(gpus)]: built.update(
        build_models([sh], root, device, timeout_s, log, gpu=g))) for i, sh in enumerate(order)]
    for k in range(0, len(threads), len(gpus)):
        for t in threads[k:k + len(gpus)]:
            t.start()
        for t in threads[k:k + len(gpus)]:
            t.join()
    return built


def _f(x: float | None, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def checks(results: list[dict]) -> list[tuple[str, str, str]]:
    """Issue 9's floor and goal for every lorapool row: (check, verdict, detail)."""
    by = {(r["runner"], r["shape"], r["mb"]): r for r in results}
    out = []
    for r in results:
        if r["runner"] != "lorapool":
            continue
        key = f"{r['shape']} mb{r['mb']}"
        if r.get("status") != "ok":
            out.append((f"{key}: lorapool ran", "FAIL", r.get("reason", r.get("status", ""))))
            continue
        plain = by.get(("plain", r["shape"], r["mb"]))
        if plain and plain.get("status") == "ok":
            sp = r["tok_s"] / plain["tok_s"]
            out.append((f"{key}: floor tok/s >= {FLOOR_SPEED}x plain",
                        "PASS" if sp >= FLOOR_SPEED else "FAIL", f"{sp:.2f}x"))
            if r.get("peak_alloc") and plain.get("peak_alloc"):
                mr = r["peak_alloc"] / plain["peak_alloc"]
                out.append((f"{key}: floor peak alloc <= {FLOOR_MEM}x plain",
                            "PASS" if mr <= FLOOR_MEM else "FAIL", f"{mr:.2f}x"))
        else:
            out.append((f"{key}: floor vs plain", "n/a", "plain did not run"))
        limit = FLOOR_DRIVER_GIB.get(r["shape"])
        if limit and r["mb"] == 1 and r.get("driver_peak"):
            d = r["driver_peak"] / GiB
            out.append((f"{key}: floor driver-visible <= {limit} GiB",
                        "PASS" if d <= limit else "FAIL", f"{d:.2f} GiB"))
        uns = by.get(("unsloth", r["shape"], r["mb"]))
        if uns and uns.get("status") == "ok":
            out.append((f"{key}: goal tok/s >= unsloth", "PASS" if r["tok_s"] >= uns["tok_s"]
                        else "FAIL", f"{r['tok_s'] / uns['tok_s']:.2f}x"))
            if r.get("peak_alloc") and uns.get("peak_alloc"):
                out.append((f"{key}: goal peak alloc <= unsloth",
                            "PASS" if r["peak_alloc"] <= uns["peak_alloc"] else "FAIL",
                            f"{r['peak_alloc'] / uns['peak_alloc']:.2f}x"))
        else:
            out.append((f"{key}: goal vs unsloth", "n/a", (uns or {}).get("reason", "not run")))
    return out


def print_table(results: list[dict], header: str) -> None:
    by = {(r["runner"], r["shape"], r["mb"]): r for r in results}
    cols = (f"{'shape':<6}{'mb':>3} {'runner':<13}{'tok/s':>9}{'xplain':>8}{'alloc GiB':>11}"
            f"{'xplain':>8}{'resv GiB':>10}{'driver GiB':>12}{'loss':>9}{'load s':>8}  status")
    print(f"\n{header}\n{cols}\n{'-' * len(cols)}")
    for r in results:
        plain = by.get(("plain", r["shape"], r["mb"]), {})
        ok = r.get("status") == "ok"
        sp = (r["tok_s"] / plain["tok_s"] if ok and plain.get("status") == "ok"
              and r.get("tok_s") and plain.get("tok_s") else None)
        mr = (r["peak_alloc"] / plain["peak_alloc"] if ok and r.get("peak_alloc")
              and plain.get("peak_alloc") else None)
        status = "ok" if ok else f"{r.get('status')}: {r.get('reason', '')}"[:90]
        print(f"{r['shape']:<6}{r['mb']:>3} {r['runner']:<13}"
              f"{_f(r.get('tok_s'), ',.0f'):>9}{_f(sp, '.2f'):>8}"
              f"{_f(r.get('peak_alloc') and r['peak_alloc'] / GiB, '.2f'):>11}{_f(mr, '.2f'):>8}"
              f"{_f(r.get('peak_reserved') and r['peak_reserved'] / GiB, '.2f'):>10}"
              f"{_f(r.get('driver_peak') and r['driver_peak'] / GiB, '.2f'):>12}"
              f"{_f(r.get('final_loss'), '.4f'):>9}{_f(r.get('load_s'), '.0f'):>8}  {status}")


def _device_of(results) -> str:
    return next((r["device_name"] for r in results if r.get("device_name")), "device unknown")


def device_line() -> str:
    import torch

    if not torch.cuda.is_available():
        return f"CPU; torch {torch.__version__}"
    p = torch.cuda.get_device_properties(0)
    return (f"{p.name}, {p.total_memory / GiB:.1f} GiB, cc {p.major}.{p.minor}; "
            f"torch {torch.__version__} CUDA {torch.version.cuda}")


def _job_order(shapes: list[str], mbs: list[int], runners: list[str], lanes: int) -> list:
    """(shape, mb, runner) in launch order: the table's order on one GPU; with several lanes,
    the longest shapes first so that the lanes finish together (longest-processing-time first)."""
    order = [(shape, mb, runner) for shape in shapes for mb in mbs for runner in runners]
    if lanes > 1:
        order.sort(key=lambda t: -SHAPE_TIMEOUT_S.get(t[0], 300))
    return order


def grid(args, runners: list[str], shapes: list[str], mbs: list[int], device: str,
         deadline: float, log) -> list[dict]:
    """Build the models, then run every (shape, mb, runner) within the budget.

    With `--gpus 0,1,...` each GPU is a lane running one subprocess at a time (pinned with
    CUDA_VISIBLE_DEVICES): the same runs, in one process tree, in a fraction of the wall time.
    Every run still has a GPU to itself.
    """
    import queue
    import threading

    root = models_root(args.models_dir, shapes)
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lorapool-speed-"))
    lanes = args.gpu_list or [None]
    shared_log = LockedLog(log)  # the lanes share one log file
    t_build = min(300.0, max(30.0, deadline - time.perf_counter() - 30))
    built = build_models_parallel(shapes, root, device, t_build, shared_log, lanes)

    rows_dirs: dict[int, Path] = {}
    for mb in mbs:
        rows = make_rows(mb * args.steps, args.seq, seed=args.seed)
        rows_dir = rows_dirs[mb] = work / f"data-mb{mb}"
        rows_dir.mkdir(parents=True, exist_ok=True)
        (rows_dir / "rows.json").write_text(json.dumps(rows))
        (rows_dir / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    order = _job_order(shapes, mbs, runners, len(lanes))
    todo: "queue.Queue[tuple[int, tuple]]" = queue.Queue()
    for i, item in enumerate(order):
        todo.put((i, item))
    results: dict[int, dict] = {}

    card_context: dict[Any, int | None] = {}  # --card-gib: each GPU's probed CUDA context

    def one(shape: str, mb: int, runner: str, lane: Any) -> dict:
        base = dict(runner=runner, shape=shape, mb=mb, seq=args.seq)
        left = deadline - time.perf_counter()
        model = built.get(shape, "not built")
        if not isinstance(model, Path):
            return {**base, "status": "error", "reason": str(model)}
        full = args.timeout_s or SHAPE_TIMEOUT_S.get(shape, 300)
        if left < max(45.0, 0.4 * full):  # too little left to finish: say so instead
            return {**base, "status": "skipped",
                    "reason": f"budget --budget-s {args.budget_s:.0f} spent"}
        timeout = min(full, left - 20)
        variant = runner.split("@", 1)[1] if "@" in runner else None
        extra: dict[str, Any] = {"fast": args.variants[variant]} if variant else {}
        if runner in args.profile.split(",") and args.out:
            extra["profile"] = str(Path(args.out) / f"profile-{runner.replace('@', '-')}"
                                   f"-{shape}-mb{mb}.txt")
        if runner in args.memory_trace.split(",") and args.out:
            extra["memory_trace"] = str(Path(args.out) / f"memory-{runner.replace('@', '-')}"
                                        f"-{shape}-mb{mb}.txt")
        rows_dir = rows_dirs[mb]
        if args.card_gib:
            extra["card_gib"] = args.card_gib
            if lane not in card_context:  # once per GPU: what a node measures at join
                card_context[lane] = probe_context(device, shared_log, gpu=lane)
            extra["context_bytes"] = card_context[lane]
        job = dict(base, **extra, device=device, model=str(model), steps=args.steps,
                   warmup=args.warmup, seed=args.seed, rows=str(rows_dir / "rows.json"),
                   rows_jsonl=str(rows_dir / "rows.jsonl"),
                   scratch=str(work / f"{runner}-{shape}-mb{mb}"))
        r = run_child(job, timeout, shared_log, gpu=lane)
        if lane is not None:
            r["gpu_lane"] = lane
        print(f"  {runner:<13}{shape:<5}mb{mb}: {r.get('status')} "
              f"{_f(r.get('tok_s'), ',.0f')} tok/s, "
              f"{_f(r.get('peak_alloc') and r['peak_alloc'] / GiB, '.2f')} GiB alloc, "
              f"{r['wall_s']:.0f} s{'' if lane is None else f' (GPU {lane})'} "
              f"{r.get('reason', '')[:200]}", flush=True)
        shutil.rmtree(job["scratch"], ignore_errors=True)
        return r

    def lane_loop(lane: Any) -> None:
        while True:
            try:
                i, (shape, mb, runner) = todo.get_nowait()
            except queue.Empty:
                return
            results[i] = one(shape, mb, runner, lane)

    threads = [threading.Thread(target=lane_loop, args=(lane,)) for lane in lanes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    shutil.rmtree(work, ignore_errors=True)
    # The table's order, whatever order the lanes finished in.
    index = {item: i for i, item in enumerate(order)}
    return [results[index[(shape, mb, runner)]] for shape in shapes for mb in mbs
            for runner in runners]


def check_same(args, device: str, deadline: float, log) -> dict:
    """lorapool fast="auto" vs fast="off": per-step losses and the final adapters."""
    from safetensors.torch import load_file

    shape = "tiny" if args.cpu_smoke else "1b"
    steps = args.check_steps
    root = models_root(args.models_dir, [shape])
    root.mkdir(parents=True, exist_ok=True)
    built = build_models([shape], root, device, 240, log)[shape]
    if not isinstance(built, Path):
        return {"status": "error", "reason": built}
    work = Path(tempfile.mkdtemp(prefix="lorapool-same-"))
    rows = make_rows(steps, args.seq, seed=args.seed)
    (work / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = {}
    for runner in ("lorapool", "lorapool-ref"):
        job = dict(runner=runner, shape=shape, mb=1, seq=args.seq, device=device,
                   model=str(built), steps=steps, warmup=min(args.warmup, steps - 1),
                   seed=args.seed, rows_jsonl=str(work / "rows.jsonl"),
                   scratch=str(work / runner))
        left = deadline - time.perf_counter() - 10
        runs[runner] = run_child(job, min(args.timeout_s or 240, left), log)
    fast, ref = runs["lorapool"], runs["lorapool-ref"]
    out: dict[str, Any] = {"status": "ok", "steps": steps, "shape": shape, "runs": runs}
    if fast.get("status") != "ok" or ref.get("status") != "ok":
        out.update(status="error", reason=f"fast: {fast.get('reason', fast.get('status'))}; "
                   f"ref: {ref.get('reason', ref.get('status'))}")
        shutil.rmtree(work, ignore_errors=True)
        return out
    rel = [abs(a - b) / abs(b) for a, b in zip(fast["losses"], ref["losses"])]
    out["loss_rel_diff"] = rel
    out["loss_rel_diff_max"] = max(rel)
    a = load_file(str(Path(fast["adapter_dir"]) / "adapter_model.safetensors"))
    b = load_file(str(Path(ref["adapter_dir"]) / "adapter_model.safetensors"))
    out["adapter_keys_differ"] = sorted(set(a) ^ set(b))[:10]
    norm_rel, elem_rel = 0.0, 0.0
    for k in sorted(set(a) & set(b)):
        x, y = a[k].double(), b[k].double()
        norm_rel = max(norm_rel, float((x - y).norm() / y.norm().clamp_min(1e-30)))
        elem_rel = max(elem_rel, float((x - y).abs().max() / y.abs().max().clamp_min(1e-30)))
    out["adapter_rel_diff_norm"] = norm_rel
    out["adapter_rel_diff_max_elem"] = elem_rel
    out["pass"] = bool(max(rel) <= 0.01 and not out["adapter_keys_differ"])
    shutil.rmtree(work, ignore_errors=True)
    return out


def print_same(same: dict) -> None:
    print(f"\ncheck-same: lorapool fast='auto' vs fast='off' ({same.get('shape')}, "
          f"{same.get('steps')} steps, mb 1)")
    if same.get("status") != "ok":
        print(f"  could not compare: {same.get('reason')}")
        return
    for i, d in enumerate(same["loss_rel_diff"]):
        f, r = same["runs"]["lorapool"]["losses"][i], same["runs"]["lorapool-ref"]["losses"][i]
        print(f"  step {i + 1:>2}: fast {f:.5f}  ref {r:.5f}  rel diff {d:.2e}")
    print(f"  max per-step loss rel diff {same['loss_rel_diff_max']:.2e} (must be <= 1e-2): "
          f"{'PASS' if same['loss_rel_diff_max'] <= 0.01 else 'FAIL'}")
    print(f"  adapters: max relative difference {same['adapter_rel_diff_norm']:.2e} (norm-wise), "
          f"{same['adapter_rel_diff_max_elem']:.2e} (max |diff| / max |ref| per tensor)"
          + (f"; keys differ: {same['adapter_keys_differ']}" if same["adapter_keys_differ"]
             else ""))
    for name in ("lorapool", "lorapool-ref"):
        print(f"  {name} requested fast: {same['runs'][name].get('fast_requested')}")


def parse_args(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1b,3b,8b")
    ap.add_argument("--mb", default="1,4")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of tok/s")
    ap.add_argument("--runners", default=",".join(DEFAULT_RUNNERS),
                    help=f"comma-separated, of {','.join(RUNNERS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write train_speed.json and a log here")
    ap.add_argument("--models-dir", type=Path, default=None,
                    help="model folders (default /dev/shm/lorapool-bench-models when it fits)")
    ap.add_argument("--timeout-s", type=float, default=None,
                    help="per subprocess (default by shape: " + ", ".join(
                        f"{k} {v}" for k, v in SHAPE_TIMEOUT_S.items() if k != "tiny") + ")")
    ap.add_argument("--budget-s", type=float, default=520,
                    help="launch no run after this many seconds (the device call has 600)")
    ap.add_argument("--check-same", action="store_true",
                    help="only: lorapool fast vs reference, --check-steps steps on the 1B shape")
    ap.add_argument("--check-steps", type=int, default=20)
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny model on the CPU, 2 steps, plain + lorapool: tests the harness")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                    help="a lorapool fast-path variant, run as runner lorapool@NAME; e.g. "
                    "'nolora={\"fused_lora\": \"off\"}' (ablations)")
    ap.add_argument("--profile", default="", metavar="RUNNERS",
                    help="comma-separated runners to profile (two steps each; any runner, "
                    "e.g. unsloth beside lorapool); tables under --out")
    ap.add_argument("--memory-trace", default="", metavar="RUNNERS",
                    help="comma-separated lorapool runners whose CUDA allocations are traced: "
                    "what is live at the peak, by the code that allocated it "
                    "(bench/memory_trace.py; reports under --out)")
    ap.add_argument("--gpus", default="", metavar="0,1,...",
                    help="run on these GPUs at once, one run per GPU at a time (each pinned with "
                    "CUDA_VISIBLE_DEVICES); default: one run at a time on the default GPU")
    ap.add_argument("--card-gib", type=float, default=None, metavar="GIB",
                    help="behave as on a card of this size: every run's allocator is capped to "
                    "it less the CUDA context, and lorapool gets it as its memory reservation "
                    "(so its fast path decides CUDA graphs as on such a card)")
    ap.add_argument("--_child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--_build", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.gpu_list = [g.strip() for g in args.gpus.split(",") if g.strip()]
    args.variants = {}
    for item in args.variant:
        name, _, spec = item.partition("=")
        args.variants[name] = json.loads(spec)
    if args.cpu_smoke:
        args.shapes, args.mb, args.seq = "tiny", "1", 64
        args.steps, args.warmup = max(2, min(args.steps, 2)), 1
        args.check_steps = min(args.check_steps, 3)
        if args.runners == ",".join(DEFAULT_RUNNERS):
            args.runners = "plain,lorapool"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._child:
        job = json.loads(args._child.read_text())
        res = child_main(job)
        print(RESULT_TAG + json.dumps(res), flush=True)
        return 0
    if args._build:
        shape, dest, device = args._build
        build_model(Path(dest), shape, device)
        return 0

    start = time.perf_counter()
    deadline = start + args.budget_s
    import torch

    if args.cpu_smoke:
        device = "cpu"
    elif not torch.cuda.is_available():
        print("bench/train_speed.py needs a CUDA GPU (run it through the device tool after "
              "`bash bench/device_setup.sh`); use --cpu-smoke to test the harness on a CPU.",
              file=sys.stderr)
        return 2
    else:
        device = "cuda"
    runners = [r for r in args.runners.split(",") if r]
    unknown = [r for r in runners if r not in RUNNERS and not (
        r.startswith("lorapool@") and r.split("@", 1)[1] in args.variants)]
    shapes = [s for s in args.shapes.split(",") if s]
    bad_shapes = [s for s in shapes if s not in SHAPES and not (args.cpu_smoke and s == "tiny")]
    if unknown or bad_shapes:
        print(f"unknown runner(s) {unknown} / shape(s) {bad_shapes}; runners: {RUNNERS}, "
              f"shapes: {list(SHAPES)}", file=sys.stderr)
        return 2
    mbs = [int(x) for x in args.mb.split(",") if x]
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="lorapool-speed-out-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    # The parent never touches the GPU beyond is_available() (which creates no context), so
    # each child's free-memory reading is its own; the device's name comes from the children.
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    with open(out_dir / "train_speed.log", "a") as log:
        if args.check_same:
            same = check_same(args, device, deadline, log)
            report["check_same"] = same
            report["device"] = _device_of(same.get("runs", {}).values())
            print(report["device"])
            (out_dir / "train_speed.json").write_text(json.dumps(report, indent=1, default=str))
            print_same(same)
            return 0 if same.get("pass") else 1
        results = grid(args, runners, shapes, mbs, device, deadline, log)
    report["results"] = results
    report["checks"] = checks(results)
    report["device"] = _device_of(results)
    (out_dir / "train_speed.json").write_text(json.dumps(report, indent=1, default=str))
    print_table(results, f"seq {args.seq}, {args.steps} steps ({args.warmup} warm-up), "
                f"LoRA r16 all 7 projections, 8-bit AdamW, grad ckpt; {report['device']}")
    plans = {json.dumps(r.get("fast_plan"), sort_keys=True, default=str) for r in results
             if r.get("runner") == "lorapool" and r.get("status") == "ok"}
    for plan in sorted(plans):
        print(f"lorapool's recorded fast path: {plan}")
    if report["checks"]:
        print("\nissue 9 checks (lorapool rows):")
        for name, verdict, detail in report["checks"]:
            print(f"  {verdict:<5}{name}  ({detail})")
    print(f"\n{len(results)} runs in {time.perf_counter() - start:.0f} s; JSON: "
          f"{out_dir / 'train_speed.json'}")
    return 0 if all(r.get("status") in ("ok", "unavailable") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
