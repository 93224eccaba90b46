"""bench/optimizer_step.py on the CPU: the LoRA shapes it steps, and both layouts ending equal
(the GPU timings come from the device)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "optimizer_step.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_optimizer_step", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


bench = _load()


def test_lora_shapes_are_the_seven_projections_of_every_layer():
    shapes = bench.lora_shapes("1b", 16)
    assert len(shapes) == 16 * 7 * 2  # layers x projections x (A, B)
    # Llama-3.2-1B: q/o 2048->2048, k/v 2048->512, gate/up 2048->8192, down 8192->2048.
    assert shapes[:4] == [(16, 2048), (2048, 16), (16, 2048), (512, 16)]
    assert sum(a * b for a, b in shapes) == 16 * 16 * (4 * 2048 + 2 * 2560 + 3 * 10240)


def test_both_layouts_step_to_the_same_weights(monkeypatch):
    # Every tensor of at least 4,096 elements (bitsandbytes keeps 32-bit state for smaller
    # ones per tensor, 8-bit packed), so the two must agree bit for bit.
    monkeypatch.setitem(bench.SHAPES, "t", (256, 512, 2, 4, 4))
    row = bench.run("t", "adamw_8bit", 16, torch.device("cpu"), steps=2, warmup=1)
    assert row["tensors"] == 2 * 7 * 2
    assert row["max_diff"] == 0.0
    assert row["per_tensor_ms"] > 0 and row["flat_ms"] > 0
