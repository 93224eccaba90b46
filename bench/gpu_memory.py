"""Calibration of `estimate_memory` on a GPU: predicted vs measured driver-visible peak.

The scheduler places jobs by `estimate_memory`; issue 9 asks that on the fast path it covers
the measured driver-visible peak and exceeds it by at most 10 % on every point of this grid:

    shapes 1B / 3B / 8B (Llama-3.x, 128,256 vocabulary) x seq 512, 2048, 8192 x micro-batch 1, 4
    x LoRA r 16, 64 x packed or not                                            = 72 points

Each point runs lorapool's real `train()` (fast="auto" when the spec has it; a few steps) in its
own subprocess (bench/train_speed.py's child, so peaks are clean) and records the prediction
for the same spec on the same GPU, `torch.cuda.max_memory_allocated`, and the driver-visible
peak = CUDA context (read at the end of the run) + the allocator's peak reservation, loading
included (the trainer reports loading's own peak before it restarts the counters for training).
A ratio predicted / driver-visible outside [1.00, 1.10] is flagged.

`--gpus 0,1,.. --per-gpu K` runs K points at a time on each listed GPU. Peaks are per process
(the allocator's own counters), so sharing a GPU changes no memory number; the context is then
the one the node's probe measured (the card's in-use total is no longer this process's alone).
The whole grid takes about 8 minutes on 4 GPUs x 5.

On one GPU the whole grid does not fit a 10-minute device call: `--subset` names a part (see `--list`),
the filters (`--shapes`, `--seqs`, `--mbs`, `--ranks`, `--packed`) narrow it, and `--part K/N`
splits what is left into N parts of about equal estimated time. `--budget-s` stops launching
points in time to print the table; every point has its own timeout.

    python bench/gpu_memory.py --list [--subset all]
    python bench/gpu_memory.py --subset core --out DIR
    python bench/gpu_memory.py --subset all --part 2/6 --out DIR

Unpacked points train full-length rows (seq tokens each: the worst case the estimate must
cover); packed points train short examples (seq/16 .. seq/4 tokens) packed into rows of seq.
This module's grid, subset and table code imports without torch or CUDA.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import string
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ holds train_speed.py

GiB = 1024**3
SHAPES = ("1b", "3b", "8b")
SEQS = (512, 2048, 8192)
MBS = (1, 4)
RANKS = (16, 64)
PACKED = (False, True)
RATIO_LOW, RATIO_HIGH = 1.00, 1.10

# Rough time model for --list/--part (seconds; H100, the fast path hoped for): process start +
# imports + load, and training tokens per second at seq 2048 (longer rows cost more per token).
LOAD_S = {"tiny": 15, "1b": 25, "3b": 35, "8b": 55}
TOK_S = {"tiny": 1000, "1b": 12000, "3b": 6000, "8b": 3500}
# --cpu-smoke: the plumbing on a tiny model on the CPU (no memory numbers there)
SMOKE_POINTS = [("tiny", 64, 1, 16, False), ("tiny", 64, 2, 16, True)]


@dataclass(frozen=True)
class Point:
    shape: str
    seq: int
    mb: int
    r: int
    packed: bool

    @property
    def name(self) -> str:
        return f"{self.shape}-s{self.seq}-mb{self.mb}-r{self.r}-{'packed' if self.packed else 'unpacked'}"

    def est_seconds(self, steps: int) -> float:
        longer = 1 + 0.35 * math.log2(self.seq / 2048) if self.seq > 2048 else 1.0
        per_token = longer / TOK_S[self.shape]
        return LOAD_S[self.shape] + steps * self.mb * self.seq * per_token


GRID = [Point(*p) for p in itertools.product(SHAPES, SEQS, MBS, RANKS, PACKED)]


def _subsets() -> dict[str, list[Point]]:
    base = {
        "all": GRID,
        # the points issue 9's floor rows sit on (seq 2048, mb 1, r16, unpacked)
        "core": [p for p in GRID if p.seq == 2048 and p.mb == 1 and p.r == 16 and not p.packed],
        "smoke": [Point("1b", 2048, 1, 16, False)],
        # each shape's smallest and largest corner: the ends of the estimate's range
        "edges": [p for p in GRID if (p.seq, p.mb, p.r, p.packed) in
                  ((512, 1, 16, False), (8192, 4, 64, True), (8192, 4, 64, False))],
    }
    for s in SHAPES:
        base[s] = [p for p in GRID if p.shape == s]
    for q in SEQS:
        base[f"s{q}"] = [p for p in GRID if p.seq == q]
    return base


SUBSETS = _subsets()


def select(subset: str, shapes=None, seqs=None, mbs=None, ranks=None, packed="both",
           part: str | None = None, steps: int = 3) -> list[Point]:
    """The points of `subset` (a name, or comma-separated names and point names) that pass the
    filters, then part K of N (greedy by estimated time, so the parts take about as long)."""
    points: list[Point] = []
    by_name = {p.name: p for p in GRID}
    for name in subset.split(","):
        if name in SUBSETS:
            new = SUBSETS[name]
        elif name in by_name:
            new = [by_name[name]]
        else:
            raise SystemExit(f"unknown subset or point {name!r}; subsets: {sorted(SUBSETS)}")
        points += [p for p in new if p not in points]
    points = [p for p in points if (not shapes or p.shape in shapes) and
              (not seqs or p.seq in seqs) and (not mbs or p.mb in mbs) and
              (not ranks or p.r in ranks) and
              (packed == "both" or p.packed == (packed == "yes"))]
    if part:
        k, n = (int(x) for x in part.split("/"))
        if not 1 <= k <= n:
            raise SystemExit(f"--part {part}: K must be in 1..N")
        bins: list[list[Point]] = [[] for _ in range(n)]
        loads = [0.0] * n
        for p in sorted(points, key=lambda p: -p.est_seconds(steps)):
            i = loads.index(min(loads))
            bins[i].append(p)
            loads[i] += p.est_seconds(steps)
        points = [p for p in points if p in bins[k - 1]]  # keep grid order inside the part
    return points


def flag(ratio: float | None) -> str:
    if ratio is None:
        return "n/a"
    if ratio < RATIO_LOW:
        return "UNDER"  # the job would not fit where the scheduler puts it
    if ratio > RATIO_HIGH:
        return "OVER"  # wastes the cards it could have used
    return "ok"


def make_rows(point: Point, n_rows: int, seed: int = 0) -> list[dict]:
    """{"text"} rows (one token per character): full-length rows, or for packed points short
    examples, enough to fill `n_rows` packed rows."""
    rng = random.Random(seed)
    alphabet = string.ascii_lowercase + " "
    if not point.packed:
        lengths = [point.seq + 16] * n_rows
    else:
        lo, hi = max(8, point.seq // 16), max(16, point.seq // 4)
        lengths, total = [], 0
        while total < n_rows * point.seq * 1.5:
            lengths.append(rng.randint(lo, hi))
            total += lengths[-1] + 1
    return [{"text": "".join(rng.choice(alphabet) for _ in range(n))} for n in lengths]


def print_table(rows: list[dict], device: str) -> None:
    cols = (f"{'point':<30}{'predicted':>11}{'driver':>9}{'ratio':>7}{'flag':>7}"
            f"{'alloc':>8}{'load':>7}{'context':>9}{'tok/s':>9}{'mb used':>8}  status")
    print(f"\npredicted vs measured driver-visible peak (GiB: context + the allocator's peak, "
          f"loading included; 'load' is loading's own), lorapool fast path; {device}")
    print(cols + "\n" + "-" * len(cols))
    for r in rows:
        ok = r.get("status") == "ok"
        pred, drv = r.get("predicted"), r.get("driver_peak")
        ratio = pred / drv if ok and pred and drv else None
        status = "ok" if ok else f"{r.get('status')}: {r.get('reason', '')}"[:80]
        if ok and r.get("predict_error"):
            status = f"no prediction: {r['predict_error']}"[:80]
        if ok and r.get("micro_batch_used") not in (None, r["mb"]):
            status = f"OOM fallback to mb {r['micro_batch_used']}"

        def g(x):
            return f"{x / GiB:.2f}" if x else "-"

        print(f"{r['name']:<30}{g(pred):>11}{g(drv):>9}"
              f"{(f'{ratio:.3f}' if ratio else '-'):>7}{flag(ratio):>7}"
              f"{g(r.get('peak_alloc')):>8}{g(r.get('load_peak_reserved')):>7}"
              f"{g(r.get('context')):>9}"
              f"{(format(r['tok_s'], ',.0f') if r.get('tok_s') else '-'):>9}"
              f"{str(r.get('micro_batch_used') or '-'):>8}  {status}")
    ratios = [r["predicted"] / r["driver_peak"] for r in rows
              if r.get("status") == "ok" and r.get("predicted") and r.get("driver_peak")]
    if ratios:
        bad = sum(flag(x) != "ok" for x in ratios)
        print(f"\n{len(ratios)} points measured: ratio min {min(ratios):.3f}, max {max(ratios):.3f};"
              f" {bad} outside [{RATIO_LOW:.2f}, {RATIO_HIGH:.2f}]")


def _build_all(shapes: list[str], root: Path, device: str, deadline: float, log,
               gpus: list) -> dict:
    """Every shape's model folder (or why not), built in parallel, one shape per GPU at a time."""
    import train_speed as ts

    left = deadline - time.perf_counter()
    if left < 60:
        return {s: "budget spent before the model was built" for s in shapes}
    return ts.build_models_parallel(shapes, root, device, min(240.0, left - 30), log, gpus)


def _run_points(points: list[Point], built: dict, lanes: list, args, context_bytes,
                device: str, work: Path, deadline: float, log) -> list[dict]:
    """Run every point in its own child process, `len(lanes)` at a time (a lane is a GPU and a
    slot on it: the peaks are per process, so points sharing a GPU do not see each other's
    memory; only their speed suffers, which this bench does not report as a result). Longest
    points start first; the rows come back in grid order."""
    import queue
    import threading

    import train_speed as ts

    todo: "queue.Queue[Point]" = queue.Queue()
    for p in sorted(points, key=lambda p: -p.est_seconds(args.steps)):
        todo.put(p)
    done: dict[Point, dict] = {}
    lock = threading.Lock()

    def one(p: Point, gpu) -> dict:
        base = {"name": p.name, **asdict(p)}
        folder = built.get(p.shape, "not built")
        if not isinstance(folder, Path):
            return {**base, "status": "error", "reason": str(folder)}
        left = deadline - time.perf_counter()
        full = args.timeout_s or ts.SHAPE_TIMEOUT_S.get(p.shape, 300) * (
            1.5 if p.seq == 8192 else 1)
        if left < max(45.0, 0.4 * full):  # too little left to finish: say so instead
            return {**base, "status": "skipped", "reason": "budget spent"}
        data = work / p.name
        data.mkdir(parents=True, exist_ok=True)
        jsonl = data / "rows.jsonl"
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in
                                 make_rows(p, p.mb * args.steps, args.seed)))
        job = dict(runner="lorapool", shape=p.shape, mb=p.mb, seq=p.seq, r=p.r,
                   packing=p.packed, predict=True, context_bytes=context_bytes,
                   device=device, model=str(folder),
                   steps=args.steps, warmup=min(1, args.steps - 1), seed=args.seed,
                   rows_jsonl=str(jsonl), scratch=str(data / "run"),
                   shared_gpu=args.per_gpu > 1)
        r = ts.run_child(job, min(full, left - 20), log, gpu=gpu)
        r.update(base)
        return r

    def lane_loop(gpu) -> None:
        while True:
            try:
                p = todo.get_nowait()
            except queue.Empty:
                return
            r = one(p, gpu)
            ratio = (r["predicted"] / r["driver_peak"] if r.get("predicted") and
                     r.get("driver_peak") else None)
            with lock:
                done[p] = r
                print(f"  {p.name:<30} {r.get('status')}: ratio "
                      f"{f'{ratio:.3f}' if ratio else '-'} {flag(ratio)} "
                      f"({r.get('wall_s', 0):.0f} s, GPU {gpu}) {r.get('reason', '')[:200]}",
                      flush=True)

    threads = [threading.Thread(target=lane_loop, args=(gpu,)) for gpu, _ in lanes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [done[p] for p in points if p in done]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subset", default="core",
                    help=f"comma-separated subset or point names; subsets: {', '.join(SUBSETS)}")
    ap.add_argument("--shapes", default=None)
    ap.add_argument("--seqs", default=None)
    ap.add_argument("--mbs", default=None)
    ap.add_argument("--ranks", default=None)
    ap.add_argument("--packed", choices=("yes", "no", "both"), default="both")
    ap.add_argument("--part", default=None, help="K/N: the K-th of N parts of equal time")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--list", action="store_true", help="print the selected points and stop")
    ap.add_argument("--out", type=Path, default=None, help="write gpu_memory.json and a log here")
    ap.add_argument("--models-dir", type=Path, default=None)
    ap.add_argument("--timeout-s", type=float, default=None, help="per point (default by shape)")
    ap.add_argument("--budget-s", type=float, default=540)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gpus", default="", metavar="0,1,...",
                    help="run points on these GPUs in parallel (each child pinned with "
                    "CUDA_VISIBLE_DEVICES); default: one at a time on the default GPU")
    ap.add_argument("--per-gpu", type=int, default=1,
                    help="points running at once on each GPU (memory peaks are per process, "
                    "so this only costs their speed, which the table does not judge)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="two tiny points on the CPU: tests the harness, measures nothing")
    args = ap.parse_args(argv)
    args.gpu_list = [g for g in args.gpus.split(",") if g != ""]
    if args.per_gpu < 1:
        raise SystemExit("--per-gpu must be >= 1")

    def ints(s):
        return [int(x) for x in s.split(",")] if s else None

    points = select(args.subset, args.shapes.split(",") if args.shapes else None,
                    ints(args.seqs), ints(args.mbs), ints(args.ranks), args.packed, args.part,
                    args.steps)
    if args.cpu_smoke:
        points, args.steps = [Point(*p) for p in SMOKE_POINTS], 2
    total = sum(p.est_seconds(args.steps) for p in points)
    if args.list:
        for p in points:
            print(f"  {p.name:<30} ~{p.est_seconds(args.steps):.0f} s")
        print(f"{len(points)} points, ~{total:.0f} s estimated (+ model builds)")
        return 0

    import torch  # only now: the grid code above must import without torch
    import train_speed as ts

    device = "cpu" if args.cpu_smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu_memory.py needs a CUDA GPU (run it through the device tool after "
              "`bash bench/device_setup.sh`); --list works anywhere.", file=sys.stderr)
        return 2
    start = time.perf_counter()
    deadline = start + args.budget_s
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="lorapool-mem-out-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    shapes = sorted({p.shape for p in points})
    root = ts.models_root(args.models_dir, shapes)
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lorapool-mem-"))
    print(f"{len(points)} points, ~{total:.0f} s estimated", flush=True)
    # GPU-major within each slot, so the first (longest) points spread over the GPUs.
    lanes = [(g, k) for k in range(args.per_gpu) for g in (args.gpu_list or [None])]
    with open(out_dir / "gpu_memory.log", "a") as raw_log:
        log = ts.LockedLog(raw_log)
        # What a node of this card reports at join; None (the constant) when the probe fails.
        context_bytes = ts.probe_context(device, log, gpu=lanes[0][0])
        print(f"measured CUDA context of a training process: "
              f"{f'{context_bytes / 2**30:.2f} GiB' if context_bytes else 'probe failed'}",
              flush=True)
        built = _build_all(shapes, root, device, deadline, log, [g for g, _ in lanes])
        rows = _run_points(points, built, lanes, args, context_bytes, device, work, deadline, log)
    device = next((r["device_name"] for r in rows if r.get("device_name")), "device unknown")
    (out_dir / "gpu_memory.json").write_text(json.dumps(
        {"device": device, "context_bytes": context_bytes,
         "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
        indent=1, default=str))
    print_table(rows, device)
    print(f"\n{len(rows)} points in {time.perf_counter() - start:.0f} s; JSON: "
          f"{out_dir / 'gpu_memory.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
