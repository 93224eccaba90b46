"""One optimizer step over a LoRA's tensors: one call per tensor, or packed (flat_optimizer).

The fast path's `flat_optimizer` piece (service/train/fast/flat_params.py) packs the trainable
tensors into one buffer so that bitsandbytes' 8-bit AdamW makes one call (one kernel, one
device sync) per step instead of one per tensor. This bench times both on the same tensors, on
the device it runs on, for the LoRA of the Llama-3.x shapes that bench/train_speed.py trains
(r 16 on all seven projections), and checks that both end with the same weights:

    python bench/optimizer_step.py                       # CUDA if present, else the CPU
    python bench/optimizer_step.py --shapes 8b --optimizers adamw_8bit,paged_adamw_8bit

It prints, per shape and optimizer, the tensors, the median step time of each layout, the
ratio, and the largest weight difference after the timed steps (0 means bit for bit, as it
must be for 8-bit AdamW where every tensor has at least 4,096 elements: bitsandbytes keeps
smaller ones' state in 32 bits per tensor, and packed they get 8-bit state). Only
the optimizer runs: the gradients are fixed random tensors, so this is the step's own cost,
not a training speed (bench/train_speed.py measures that).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_speed  # noqa: E402 - the shapes it trains, from its folder

from lorapool.service.train.tiny import PRESETS  # noqa: E402


def _dims(shape: str) -> tuple[int, int, int, int, int]:
    """(hidden, intermediate, layers, heads, kv heads) of bench/train_speed.py's `shape`."""
    c = {**PRESETS["1b"], **train_speed.SHAPES[shape]}
    return (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"],
            c["num_attention_heads"], c["num_key_value_heads"])


# Llama-3.2-1B/3B and Llama-3.1-8B, as bench/train_speed.py trains them.
SHAPES = {name: _dims(name) for name in train_speed.SHAPES}


def lora_shapes(shape: str, r: int) -> list[tuple[int, int]]:
    """The (rows, cols) of every LoRA A and B matrix on all seven projections, layer order."""
    hidden, inter, layers, heads, kv = SHAPES[shape]
    kv_dim = hidden // heads * kv
    projections = [(hidden, hidden), (hidden, kv_dim), (hidden, kv_dim), (hidden, hidden),
                   (hidden, inter), (hidden, inter), (inter, hidden)]  # (in, out)
    out = []
    for _ in range(layers):
        for fan_in, fan_out in projections:
            out += [(r, fan_in), (fan_out, r)]
    return out


def make_optimizer(name: str, params: list, device: torch.device) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-4)
    import bitsandbytes as bnb

    if name == "paged_adamw_8bit" and device.type == "cuda":
        return bnb.optim.PagedAdamW8bit(params, lr=1e-4)
    return bnb.optim.AdamW8bit(params, lr=1e-4)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], device: torch.device, steps: int,
               warmup: int) -> float:
    """Median seconds of one call of `step` (after `warmup` untimed ones)."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(shape: str, optimizer: str, r: int, device: torch.device, steps: int,
        warmup: int) -> dict:
    from lorapool.service.train.fast.flat_params import FlatParams

    shapes = lora_shapes(shape, r)
    g = torch.Generator(device="cpu").manual_seed(0)
    weights = [torch.randn(s, generator=g) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    per_tensor = [torch.nn.Parameter(w.to(device)) for w in weights]
    for p, gr in zip(per_tensor, grads):
        p.grad = gr.to(device)
    packed = [torch.nn.Parameter(w.to(device)) for w in weights]
    flat = FlatParams(packed)
    for p, gr in zip(flat.members, grads):
        p.grad.copy_(gr)
    opt_a = make_optimizer(optimizer, per_tensor, device)
    opt_b = make_optimizer(optimizer, flat.params, device)
    t_a = time_steps(opt_a.step, device, steps, warmup)
    t_b = time_steps(opt_b.step, device, steps, warmup)
    diff = max(float((a.detach() - b.detach()).abs().max()) for a, b in zip(per_tensor, packed))
    return {"shape": shape, "optimizer": optimizer, "tensors": len(shapes),
            "params_m": sum(a * b for a, b in shapes) / 1e6, "per_tensor_ms": t_a * 1e3,
            "flat_ms": t_b * 1e3, "max_diff": diff}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="1b,3b,8b")
    ap.add_argument("--optimizers", default="adamw_8bit")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args(argv)
    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"optimizer step, LoRA r{args.r} on all 7 projections; {where}; torch {torch.__version__}; "
          f"median of {args.steps} steps after {args.warmup}")
    header = f"{'shape':5} {'optimizer':17} {'tensors':>7} {'params':>8} " \
             f"{'per-tensor ms':>13} {'flat ms':>8} {'speed-up':>8} {'max |diff|':>10}"
    print(header)
    print("-" * len(header))
    for shape in args.shapes.split(","):
        for optimizer in args.optimizers.split(","):
            row = run(shape, optimizer, args.r, device, args.steps, args.warmup)
            print(f"{row['shape']:5} {row['optimizer']:17} {row['tensors']:7d} "
                  f"{row['params_m']:7.1f}M {row['per_tensor_ms']:13.2f} {row['flat_ms']:8.2f} "
                  f"{row['per_tensor_ms'] / row['flat_ms']:7.2f}x {row['max_diff']:10.2g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
