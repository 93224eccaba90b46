"""Data-parallel QLoRA speed: one worker vs two, and what the gradients would cost on a LAN.

Issue 10's yardstick, for a 2-GPU machine with no Ray: for each shape (Llama-3.2-1B and
Llama-3.1-8B, the 128,256-token vocabulary, random bf16 weights built once by
bench/train_speed.py's `build_model`) it launches `torch.distributed.run` (torchrun) with
1 and then 2 processes on the same global batch (`--batch` rows of `--seq` tokens per optimizer
step, micro-batch `--mb`, so 1 worker accumulates batch/mb micro-batches and each of 2 workers
half of them), trains `--steps` optimizer steps of lorapool's `train()` on the fast path
(`fast="auto"`, NF4, bf16, 8-bit AdamW, r16 on all seven projections) and reports tokens/s of
the whole job over the steps after `--warmup`. It prints, per shape:

- tok/s with 1 worker, with 2, and the ratio (issue 10: >= 1.8x);
- the LoRA gradient bytes each rank all-reduces per optimizer step (bf16 on NCCL) and the time
  a ring all-reduce of them takes on a 1 Gbit/s office network (2(N-1)/N x bytes x 8 / 1e9 s
  per step, N = 2) next to the measured step time.

    bash bench/device_setup.sh && python bench/distributed_speed.py --shapes 1b,8b --out $OUT
    python bench/distributed_speed.py --cpu-smoke        # tiny model, 2 gloo processes: the harness

The child (`--child JSON`) is what torchrun runs; do not call it by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_speed  # noqa: E402 — the shared model builder and data (same folder)

RESULT_TAG = "@@DIST "
LAN_BITS_PER_S = 1e9
GOAL_RATIO = 1.8


def child(job: dict[str, Any]) -> None:
    """One torchrun process: train, and rank 0 prints the measured numbers."""
    import torch

    from lorapool.service.train import LoraSpec, TrainSpec
    from lorapool.service.train.distributed import DistContext, gradient_bytes
    from lorapool.service.train.model import trainable_parameters

    device = job["device"]
    ctx = DistContext.from_environment(device_kind=device)
    world = ctx.world_size if ctx else 1
    spec = TrainSpec(
        base_model=job["model"], base_model_id=f"random-llama-{job['shape']}",
        lora=LoraSpec(r=16, alpha=32, dropout=0.0), max_seq_len=job["seq"],
        micro_batch_size=job["mb"], batch_size=job["batch"], max_steps=job["steps"],
        gradient_checkpointing=True, learning_rate=1e-4, lr_scheduler="constant",
        warmup_ratio=0.0, max_grad_norm=1.0, optimizer="adamw_8bit", device=device,
        seed=0, quantization="nf4", compute_dtype="bf16" if device == "cuda" else "auto",
        fast="auto")
    times: list[float] = []
    last = [time.perf_counter()]

    def on_event(ev) -> None:
        now = time.perf_counter()
        if ev.type == "step":
            times.append(now - last[0])
        last[0] = now

    rank = ctx.rank if ctx else 0
    out = Path(job["scratch"]) / f"out-{world}-{rank}"
    from lorapool.service.train.loop import Trainer

    trainer = Trainer(spec, job["rows_jsonl"], out, on_event=on_event,
                      cache_dir=Path(job["scratch"]) / f"cache-{rank}", dist=ctx)
    result = trainer.run()
    if rank != 0:
        return
    measured = times[job["warmup"]:] or times
    step_s = statistics.median(measured)
    tokens_per_step = job["batch"] * job["seq"]
    reduce_dtype = ctx.reduce_dtype if ctx else torch.bfloat16
    grad_bytes = gradient_bytes(trainable_parameters(trainer.model).values(), reduce_dtype)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    print(RESULT_TAG + json.dumps({
        "shape": job["shape"], "world": world, "step_s": step_s,
        "tok_s": tokens_per_step / step_s, "grad_bytes": grad_bytes,
        "reduce_dtype": str(reduce_dtype).replace("torch.", ""),
        "bytes_reduced_total": ctx.bytes_reduced if ctx else 0,
        "steps": result.step, "micro_batch": result.metrics.get("micro_batch_size"),
        "peak_gib": peak / 2**30 if peak else None,
        "cuda_graphs": result.metrics.get("cuda_graphs")}), flush=True)


def launch(job: dict[str, Any], world: int, timeout_s: float, log) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={world}", __file__, "--child", json.dumps(job)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired as exc:
        log(f"{job['shape']} x{world}: timed out after {timeout_s:.0f}s\n{(exc.stdout or '')[-2000:]}")
        return {"shape": job["shape"], "world": world, "error": "timeout"}
    text = proc.stdout + proc.stderr
    log(f"--- {job['shape']} x{world}: rc {proc.returncode} in {time.time() - t0:.0f}s\n"
        + text[-3000:])
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    return {"shape": job["shape"], "world": world, "error": f"rc {proc.returncode}",
            "tail": text[-800:]}


def lan_seconds(grad_bytes: int, world: int = 2) -> float:
    """A ring all-reduce sends 2(N-1)/N of the buffer per rank."""
    return 2 * (world - 1) / world * grad_bytes * 8 / LAN_BITS_PER_S


def table(results: list[dict[str, Any]]) -> str:
    rows = ["| shape | tok/s 1 worker | tok/s 2 workers | ratio (goal >= 1.8) | step s (2w) "
            "| grad bytes/step/rank | dtype | 1 Gbit/s all-reduce s/step |",
            "|---|---|---|---|---|---|---|---|"]
    for shape in dict.fromkeys(r["shape"] for r in results):
        one = next((r for r in results if r["shape"] == shape and r["world"] == 1), {})
        two = next((r for r in results if r["shape"] == shape and r["world"] == 2), {})
        ratio = two["tok_s"] / one["tok_s"] if "tok_s" in one and "tok_s" in two else None
        gb = two.get("grad_bytes") or one.get("grad_bytes")
        rows.append("| {} | {} | {} | {} | {} | {} | {} | {} |".format(
            shape, f"{one['tok_s']:.0f}" if "tok_s" in one else one.get("error", "-"),
            f"{two['tok_s']:.0f}" if "tok_s" in two else two.get("error", "-"),
            (f"{ratio:.2f}x " + ("ok" if ratio >= GOAL_RATIO else "BELOW")) if ratio else "-",
            f"{two['step_s']:.2f}" if "step_s" in two else "-",
            f"{gb / 2**20:.1f} MiB" if gb else "-", two.get("reduce_dtype", "-"),
            f"{lan_seconds(gb):.2f}" if gb else "-"))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--shapes", default="1b,8b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8, help="rows per optimizer step (global)")
    ap.add_argument("--mb", type=int, default=2, help="micro-batch per worker")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--timeout-s", type=float, default=240, help="per torchrun launch")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model, 2 gloo CPU processes")
    args = ap.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return
    device = "cpu" if args.cpu_smoke else "cuda"
    shapes = ["tiny"] if args.cpu_smoke else args.shapes.split(",")
    seq = 64 if args.cpu_smoke else args.seq
    out = args.out or Path(tempfile.mkdtemp(prefix="dist-speed-"))
    out.mkdir(parents=True, exist_ok=True)
    log_file = (out / "distributed_speed.log").open("a")

    def log(msg: str) -> None:
        log_file.write(msg + "\n")
        log_file.flush()
        print(msg.splitlines()[0] if msg else "", flush=True)

    scratch = Path(tempfile.mkdtemp(prefix="dist-speed-scratch-"))
    rows = scratch / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n"
                            for r in train_speed.make_rows(args.batch * args.steps, seq)))
    root = train_speed.models_root(None, shapes)
    results = []
    for shape in shapes:
        model = train_speed.build_model(root / shape, shape, device)
        for world in (1, 2):
            job = {"shape": shape, "model": str(model), "rows_jsonl": str(rows), "seq": seq,
                   "batch": args.batch, "mb": args.mb, "steps": args.steps,
                   "warmup": args.warmup, "device": device,
                   "scratch": str(scratch / f"{shape}-{world}")}
            results.append(launch(job, world, args.timeout_s, log))
            # After every launch: a call cut short by its time limit keeps what was measured.
            (out / "distributed_speed.json").write_text(json.dumps(results, indent=2))
    header = (f"distributed_speed: seq {seq}, global batch {args.batch}, micro-batch {args.mb}, "
              f"{args.steps} steps ({args.warmup} warm-up), device {device}")
    text = header + "\n\n" + table(results)
    print(text)
    (out / "distributed_speed.json").write_text(json.dumps(results, indent=2))
    (out / "distributed_speed.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
