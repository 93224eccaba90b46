"""What is on the GPU at a run's allocation peak: a CUDA allocator trace, replayed.

`bench/train_speed.py --memory-trace RUNNERS` records the caching allocator's history
(`torch.cuda.memory._record_memory_history`, Python stacks only) around a lorapool run and writes,
next to its profile tables, the blocks live at the moment the allocated bytes peaked, grouped by
the code that allocated them. It answers the question a memory floor raises ("which tensors make
the 3.6 GiB?") where `max_memory_allocated` gives only the sum.

The replay is our own, over the snapshot's `device_traces`: `alloc` adds a block, `free_completed`
takes it away (the allocator's own accounting of allocated bytes), and the live set is rebuilt
at the step where the running sum was highest. Blocks allocated before the trace's first event
(a ring buffer of `max_entries`) are not seen: the report says how many bytes that leaves out.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

MiB = 2**20

# Frames from these files say nothing about which tensor it is.
_NOISE = ("torch/utils/_contextlib.py", "torch/nn/modules/module.py", "torch/autograd/",
          "torch/_tensor.py", "torch/utils/checkpoint.py", "<frozen", "threading.py")


def start(max_entries: int = 2_000_000) -> None:
    """Begin recording allocations with their Python stacks (cheap enough for a few steps)."""
    import torch

    torch.cuda.memory._record_memory_history(max_entries=max_entries, stacks="python")


def stop_and_report(path: str, top: int = 30) -> str:
    """Stop recording, replay the trace, write the report to `path` and return it."""
    import torch

    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    text = report(snap, torch.cuda.max_memory_allocated(), top=top)
    with open(path, "w") as fh:
        fh.write(text)
    return text


def _where(frames: list[dict[str, Any]], depth: int = 3) -> str:
    """The innermost `depth` frames worth reading (file:line function), innermost first."""
    keep = []
    for f in frames:
        name = f.get("filename", "")
        if any(n in name for n in _NOISE):
            continue
        short = "/".join(name.split("/")[-2:])
        keep.append(f"{short}:{f.get('line')} {f.get('name')}")
        if len(keep) == depth:
            break
    return " < ".join(keep) or "(no Python frame)"


def peak_live(events: list[dict[str, Any]]) -> tuple[int, int, list[dict[str, Any]]]:
    """(peak bytes, event index of the peak, blocks live then) over one device's trace."""
    cur = peak = 0
    at = -1
    for i, ev in enumerate(events):
        act = ev.get("action")
        if act == "alloc":
            cur += ev["size"]
            if cur > peak:
                peak, at = cur, i
        elif act == "free_completed":
            cur -= ev["size"]
    live: dict[int, dict[str, Any]] = {}
    for ev in events[:at + 1]:
        act = ev.get("action")
        if act == "alloc":
            live[ev["addr"]] = ev
        elif act == "free_completed":
            live.pop(ev["addr"], None)
    return peak, at, list(live.values())


def report(snap: dict[str, Any], max_allocated: int | None = None, top: int = 30) -> str:
    """The live blocks at the traced peak, grouped by where they were allocated, largest first."""
    traces = snap.get("device_traces") or [[]]
    events = max(traces, key=len)
    if not events:
        return "memory trace: no allocator events recorded\n"
    peak, at, live = peak_live(events)
    groups: dict[str, list[int]] = defaultdict(list)
    for ev in live:
        groups[_where(ev.get("frames") or [])].append(ev["size"])
    rows = sorted(groups.items(), key=lambda kv: -sum(kv[1]))
    # Live at the first traced event but allocated earlier: the difference to the allocator's
    # own peak (weights loaded before the trace began, or dropped from the ring buffer).
    unseen = (max_allocated - peak) if max_allocated else None
    lines = [f"allocation peak in the trace: {peak / MiB:,.1f} MiB at event {at} of "
             f"{len(events)}; {len(live)} blocks live",
             (f"allocator's max_memory_allocated: {max_allocated / MiB:,.1f} MiB "
              f"(not in the trace: {unseen / MiB:,.1f} MiB)" if max_allocated else ""),
             f"{'MiB':>10} {'blocks':>7}  allocated at (innermost first)"]
    for where, sizes in rows[:top]:
        lines.append(f"{sum(sizes) / MiB:>10,.1f} {len(sizes):>7}  {where}")
    rest = rows[top:]
    if rest:
        lines.append(f"{sum(sum(s) for _, s in rest) / MiB:>10,.1f} "
                     f"{sum(len(s) for _, s in rest):>7}  ({len(rest)} more places)")
    return "\n".join(line for line in lines if line) + "\n"
