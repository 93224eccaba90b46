"""Measured vs predicted peak GPU memory, and tokens/s, for a 1B-shaped QLoRA run.

`estimate_memory` is what the scheduler places jobs by. This runs the real trainer on a random
model of Llama-3.2-1B's shape (vocabulary included, so logits are full size) at sequence length
2048 on a CUDA GPU, a few configurations in turn, and prints for each the prediction next to what
the GPU saw:

- `torch peak alloc`: `torch.cuda.max_memory_allocated` over the run (weights included);
- `driver peak`: CUDA context + `torch.cuda.max_memory_reserved`, i.e. what NVML / another
  process on the card sees at the worst moment; this is what the estimate must cover;
- `tokens/s`: trained (non-padding) tokens per second over the optimizer steps after the first.

The last row asks for micro-batch 8 under a memory cap (`torch.cuda.set_per_process_memory_fraction`
at 1.3x the micro-batch-1 prediction): a real CUDA OOM, which the trainer's fallback must absorb
by halving the micro-batch, so `mb used` shows where it settled.

    python bench/gpu_memory.py [--steps 6] [--out DIR] [--json FILE]

Needs a CUDA device; nothing is downloaded (the model is random, the data made here).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

GiB = 1024**3

# (label, max_seq_len, micro_batch_size, gradient_checkpointing, quantization)
CONFIGS = [
    ("seq2048 mb1 ckpt", 2048, 1, True, "nf4"),
    ("seq2048 mb4 ckpt", 2048, 4, True, "nf4"),
    ("seq2048 mb1 no-ckpt", 2048, 1, False, "nf4"),
    ("seq512 mb1 ckpt", 512, 1, True, "nf4"),
    ("seq2048 mb1 ckpt bf16", 2048, 1, True, "none"),
    ("seq2048 mb1 no-ckpt bf16", 2048, 1, False, "none"),
    ("seq2048 mb8 capped", 2048, 8, True, "nf4"),
]


def make_model(dest: Path) -> Path:
    """A random Llama-3.2-1B-shaped model saved in bf16 (the trainer quantises it on load)."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    from lorapool.service.train.tiny import make_random_llama

    if (dest / "model.safetensors").exists() or (dest / "model.safetensors.index.json").exists():
        return dest
    make_random_llama(dest, "1b", write_weights=False)
    config = AutoConfig.from_pretrained(dest)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(dest, safe_serialization=True)
    del model
    torch.cuda.empty_cache()
    return dest


def make_rows(n: int, chars: int, seed: int = 0) -> list[dict]:
    """Chat rows whose answers alone exceed `chars` tokens (the tokenizer is per character)."""
    import random
    import string

    rng = random.Random(seed)
    alphabet = string.ascii_lowercase + " "
    rows = []
    for _ in range(n):
        answer = "".join(rng.choice(alphabet) for _ in range(chars + 64))
        rows.append({"messages": [{"role": "user", "content": "write"},
                                  {"role": "assistant", "content": answer}]})
    return rows


def context_bytes() -> int:
    """What this process holds on the GPU beyond PyTorch's allocator: the CUDA context."""
    import torch

    torch.cuda.init()
    torch.zeros(1, device="cuda")
    free, total = torch.cuda.mem_get_info()
    return (total - free) - torch.cuda.memory_reserved()


def run_one(model: Path, label: str, seq: int, micro: int, ckpt: bool, quant: str, steps: int,
            out: Path, context: int, cap: int | None = None) -> dict:
    import torch

    from lorapool.service.train import DeviceInfo, LoraSpec, TrainSpec, estimate_memory, train

    batch = max(micro, 4)
    spec = TrainSpec(base_model=str(model), base_model_id="random-llama-1b-shape",
                     lora=LoraSpec(r=16, alpha=32), max_seq_len=seq, micro_batch_size=micro,
                     batch_size=batch, max_steps=steps, gradient_checkpointing=ckpt,
                     learning_rate=1e-4, device="cuda", seed=0, quantization=quant)
    props = torch.cuda.get_device_properties(0)
    device = DeviceInfo(kind="cuda", name=props.name, total_memory=props.total_memory,
                        compute_capability=(props.major, props.minor))
    est = estimate_memory(spec, device)

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total) if cap else 1.0)
    rates: list[float] = []

    def on_event(ev) -> None:
        if ev.type == "step" and ev.step > 1 and ev.tokens_per_s:
            rates.append(ev.tokens_per_s)

    t0 = time.perf_counter()
    result = train(spec, make_rows(batch * steps, seq), out / label.replace(" ", "_"),
                   on_event=on_event, cache_dir=out / "cache")
    wall = time.perf_counter() - t0
    torch.cuda.set_per_process_memory_fraction(1.0)
    row = {
        "config": label,
        "predicted": est.total,
        "breakdown": est.breakdown,
        "torch_peak_alloc": torch.cuda.max_memory_allocated(),
        "driver_peak": context + torch.cuda.max_memory_reserved(),
        "tokens_per_s": statistics.median(rates) if rates else result.metrics.get("tokens_per_s"),
        "final_loss": result.metrics.get("train_loss"),
        "wall_s": wall,
        "micro_batch_used": result.metrics.get("micro_batch_size"),
    }
    del result
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--only", default=None, help="run only configs whose label contains this")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_memory.py needs a CUDA GPU")

    out = args.out or Path(tempfile.mkdtemp(prefix="lorapool-gpu-"))
    context = context_bytes()
    model = make_model(out / "random-llama-1b")
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, {props.total_memory / GiB:.1f} GiB, cc {props.major}.{props.minor}; "
          f"torch {torch.__version__}; CUDA context {context / GiB:.2f} GiB")
    rows = []
    for label, seq, micro, ckpt, quant in CONFIGS:
        if args.only and args.only not in label:
            continue
        cap = None
        if "capped" in label:
            cap = int(1.3 * rows[0]["predicted"]) if rows else 8 * GiB
        rows.append(run_one(model, label, seq, micro, ckpt, quant, args.steps, out, context,
                            cap))
        r = rows[-1]
        print(f"  done {label}: {r['wall_s']:.0f} s", flush=True)

    head = (f"{'config':<26}{'predicted':>11}{'driver peak':>13}{'pred/meas':>11}"
            f"{'torch alloc':>13}{'tokens/s':>10}{'loss':>8}{'mb used':>9}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['config']:<26}{r['predicted'] / GiB:>9.2f}Gi{r['driver_peak'] / GiB:>11.2f}Gi"
              f"{r['predicted'] / r['driver_peak']:>11.2f}{r['torch_peak_alloc'] / GiB:>11.2f}Gi"
              f"{r['tokens_per_s'] or 0:>10.0f}{r['final_loss'] or float('nan'):>8.3f}"
              f"{r['micro_batch_used'] or 0:>9}")
    print("\nbreakdown of the first config's prediction (MiB):")
    for k, v in rows[0]["breakdown"].items() if rows else []:
        print(f"  {k:<24}{v / 2**20:>10.1f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
