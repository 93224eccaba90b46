"""Federated rounds: what starting each round from a re-factorised `exact` aggregate costs.

Three departments with clearly different tasks (each answers every question its own way)
train one LoRA adapter together for a few rounds, in-process: the same trainer, the same pure
round logic (`merge.federation.aggregate_round`) the service's driver uses, no Ray. Two ways to
start the next round are compared:

- **exact → SVD (lorapool's choice)**: the exact weighted average Σ wᵢ·Bᵢ·Aᵢ (rank n·r) is
  truncated back to rank r by SVD. Reported per round: the relative reconstruction error
  ‖ΔW − ΔW_r‖/‖ΔW‖, and the held-out loss of the rank-r global next to that of the untruncated
  exact aggregate (what the truncation costs in loss);
- **naive FedAvg**: mean of the A's and mean of the B's (rank r, no truncation, inexact).
  Reported: its deviation from the exact average, and its held-out loss.

    python bench/federated_rounds.py [--rounds 3] [--steps 4] [--model PATH] [--r 4]

Default model: the tiny random Llama (`make_tiny_llama`), CPU, about two minutes; `--model`
takes any local HF folder or .gguf (e.g. SmolLM2-135M) for a quotable run.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

DEPARTMENTS = {  # name → what its assistant answers (a different task each)
    "sales": lambda q: "yes, in stock",
    "support": lambda q: "reboot it",
    "legal": lambda q: q.split()[0].upper(),  # echo the first word, uppercased
}
WORDS = ["cat", "sun", "map", "red", "box", "sky", "pen", "cup", "owl", "fig"]


def records(dept: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
        out.append({"messages": [{"role": "user", "content": q},
                                 {"role": "assistant", "content": DEPARTMENTS[dept](q)}]})
    return out


def write(path: Path, recs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="local optimizer steps per round")
    ap.add_argument("--r", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--model", default=None, help="HF folder or .gguf (default: tiny Llama)")
    args = ap.parse_args()

    from lorapool.service.merge.federation import aggregate_round
    from lorapool.service.train import LoraSpec, TrainSpec, train
    from lorapool.service.train.evaluation import evaluate

    tmp = Path(tempfile.mkdtemp(prefix="lorapool-fedbench-"))
    cache = tmp / "cache"
    if args.model is None:
        from lorapool.service.train.tiny import make_tiny_llama

        model = str(make_tiny_llama(tmp / "tiny"))
    else:
        model = args.model
    data = {d: write(tmp / f"{d}.jsonl", records(d, 32, 1)) for d in DEPARTMENTS}
    held = {d: write(tmp / f"{d}-heldout.jsonl", records(d, 16, 99)) for d in DEPARTMENTS}
    base = dict(base_model=model, device="cpu", max_seq_len=64, batch_size=8,
                micro_batch_size=8, learning_rate=args.lr, max_steps=args.steps,
                lora=LoraSpec(r=args.r, alpha=2 * args.r, dropout=0.0), warmup_ratio=0.0)
    eval_spec = TrainSpec(**{**base, "max_steps": None})

    def loss(adapter: Path | None) -> dict[str, float]:
        return {d: evaluate(eval_spec, adapter, p, cache_dir=cache)["loss"]
                for d, p in held.items()}

    started = time.time()
    base_loss = loss(None)
    rows = []
    for strategy, method in (("exact->svd", "exact"), ("naive", "naive")):
        glob: Path | None = None
        for k in range(1, args.rounds + 1):
            outs = []
            for d, path in data.items():
                spec = TrainSpec(**base, seed=10 + k, init_adapter=str(glob) if glob else None)
                res = train(spec, path, tmp / strategy / f"r{k}" / d, cache_dir=cache)
                outs.append((d, res.adapter_dir))
            agg = aggregate_round(outs, method=method, rank=args.r,
                                  output_dir=tmp / strategy / f"r{k}" / "global")
            row = {"strategy": strategy, "round": k, "refactor_error": agg.refactor_error,
                   "deviation_from_exact": agg.deviation_from_exact, "loss": loss(agg.path)}
            if method == "exact":  # the untruncated aggregate, for what truncation costs
                exact = aggregate_round(outs, method="exact", rank=args.r * len(outs),
                                        output_dir=tmp / strategy / f"r{k}" / "exact")
                row["exact_loss"] = loss(exact.path)
            rows.append(row)
            glob = agg.path

    depts = list(DEPARTMENTS)
    exact_col = f"exact r={3 * args.r}"
    head = (f"{'strategy':<11} {'rnd':>3} {'refactor err':>12} {'dev. exact':>10} "
            + " ".join(f"{d:>8}" for d in depts) + f" {'mean':>7} {exact_col:>10}")
    print("\nheld-out loss per department (base model: "
          + ", ".join(f"{d} {base_loss[d]:.3f}" for d in depts)
          + f"; mean {statistics.mean(base_loss.values()):.3f})")
    print(head)
    print("-" * len(head))
    for row in rows:
        ex = row.get("exact_loss")
        print(f"{row['strategy']:<11} {row['round']:>3} "
              f"{_f(row['refactor_error']):>12} {_f(row['deviation_from_exact']):>10} "
              + " ".join(f"{row['loss'][d]:>8.3f}" for d in depts)
              + f" {statistics.mean(row['loss'].values()):>7.3f}"
              + (f" {statistics.mean(ex.values()):>10.3f}" if ex else f" {'-':>10}"))
    print(f"\n{args.rounds} rounds x {args.steps} local steps x {len(depts)} departments, "
          f"r={args.r}; {time.time() - started:.0f} s; model {args.model or 'tiny random Llama'}")


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


if __name__ == "__main__":
    main()
