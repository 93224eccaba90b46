"""bench/memory_trace.py: the live set at a trace's allocation peak (CPU: a synthetic trace)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "memory_trace.py"
spec = importlib.util.spec_from_file_location("bench_memory_trace", SCRIPT)
mt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mt)  # type: ignore[union-attr]

MiB = 2**20


def _ev(action: str, addr: int, size: int, where: str) -> dict:
    return {"action": action, "addr": addr, "size": size,
            "frames": [{"filename": "/x/torch/nn/modules/module.py", "line": 1, "name": "_call"},
                       {"filename": f"/x/lorapool/{where}.py", "line": 7, "name": where}]}


def test_the_peak_is_where_the_running_sum_is_highest_and_lists_what_is_live_then():
    events = [
        _ev("alloc", 1, 100 * MiB, "weights"),
        _ev("alloc", 2, 50 * MiB, "logits"),
        _ev("free_requested", 2, 50 * MiB, "logits"),
        _ev("free_completed", 2, 50 * MiB, "logits"),
        _ev("alloc", 3, 30 * MiB, "act"),
        _ev("alloc", 4, 40 * MiB, "act"),  # peak: 100 + 30 + 40 = 170 MiB
        _ev("free_completed", 4, 40 * MiB, "act"),
        _ev("alloc", 5, 10 * MiB, "grad"),
    ]
    peak, at, live = mt.peak_live(events)
    assert (peak, at) == (170 * MiB, 5)
    assert sorted(e["addr"] for e in live) == [1, 3, 4]

    text = mt.report({"device_traces": [events]}, max_allocated=200 * MiB)
    lines = text.splitlines()
    assert "170.0 MiB at event 5 of 8; 3 blocks live" in lines[0]
    assert "not in the trace: 30.0 MiB" in lines[1]
    # Grouped by the first frame worth reading (the module call is noise), largest first.
    assert "100.0" in lines[3] and "lorapool/weights.py:7 weights" in lines[3]
    assert "70.0" in lines[4] and "2" in lines[4].split()[1] and "act.py" in lines[4]


def test_an_empty_trace_says_so():
    assert "no allocator events" in mt.report({"device_traces": [[]]})
