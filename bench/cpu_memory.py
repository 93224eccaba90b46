"""CPU RAM of a training job: the CPU estimate (`estimate_memory` on a CPU device) against the peak
RSS psutil measures while the real trainer runs, each run in a fresh process.

    python bench/cpu_memory.py            # tiny and a SmolLM2-135M-shaped model, a few steps

Prints one row per run: the estimate, the measured peak RSS (and the process's RSS right after
importing the trainer, the baseline every job pays), and their ratio. This is how the CPU
constants in service/train/memory.py were set; rerun it after changing them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

MiB = 1024**2

# SmolLM2-135M's shape (HuggingFaceTB/SmolLM2-135M config.json); random weights, char tokenizer.
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                    )  # untied here (make_random_llama unties): ~28M more params

CHILD = r"""
import json, os, sys, threading, time
import psutil
proc = psutil.Process()
peak = [proc.memory_info().rss]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
from lorapool.service.train import train, TrainSpec
import torch
torch.set_num_threads(1)
baseline = proc.memory_info().rss
args = json.loads(sys.argv[1])
spec = TrainSpec(base_model=args["model"], device="cpu", **args["spec"])
res = train(spec, args["data"], args["out"])
stop.set()
peak[0] = max(peak[0], proc.memory_info().rss)
print(json.dumps({"peak": peak[0], "baseline": baseline, "status": res.status}))
"""


def _data(path: Path, n: int, chars: int) -> Path:
    lines = [json.dumps({"messages": [{"role": "user", "content": "x" * chars},
                                      {"role": "assistant", "content": "y" * chars}]})
             for _ in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    from lorapool.service.train.memory import estimate_memory
    from lorapool.service.train.spec import DeviceInfo, TrainSpec
    from lorapool.service.train.tiny import make_random_llama, make_tiny_llama

    root = Path(tempfile.mkdtemp(prefix="cpu-mem-"))
    models = {"tiny": make_tiny_llama(root / "tiny"),
              "smollm2-135m-shape": make_random_llama(root / "smol", "tiny", **SMOLLM2_135M)}
    runs = [("tiny", dict(max_seq_len=128, batch_size=4, micro_batch_size=2, max_steps=2)),
            ("smollm2-135m-shape", dict(max_seq_len=256, batch_size=2, micro_batch_size=2,
                                        max_steps=2))]
    cpu = DeviceInfo(kind="cpu", name="cpu", total_memory=64 * 1024**3)
    print(f"{'model':<20} {'seq':>5} {'micro':>5} {'estimate':>10} {'measured':>10} "
          f"{'baseline':>10} {'est/meas':>8}")
    for name, spec in runs:
        data = _data(root / f"{name}.jsonl", 8, spec["max_seq_len"] // 2)
        args = {"model": str(models[name]), "spec": spec, "data": str(data),
                "out": str(root / f"out-{name}")}
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], check=True,
                             capture_output=True, text=True).stdout.strip().splitlines()[-1]
        got = json.loads(out)
        est = estimate_memory(TrainSpec(base_model=str(models[name]), device="cpu", **spec), cpu)
        print(f"{name:<20} {spec['max_seq_len']:>5} {spec['micro_batch_size']:>5} "
              f"{est.total / MiB:>8.0f}Mi {got['peak'] / MiB:>8.0f}Mi "
              f"{got['baseline'] / MiB:>8.0f}Mi {est.total / got['peak']:>8.2f}")
        for k, v in est.breakdown.items():
            print(f"    {k:<26} {v / MiB:>9.1f} MiB")


if __name__ == "__main__":
    main()
