"""bench/gpu_memory.py's CPU side: the calibration grid, its subsets and parts, the flags."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_memory.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_gpu_memory", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


gm = _load()


def test_grid_is_the_issue_grid():
    assert len(gm.GRID) == 72 == len({p.name for p in gm.GRID})
    assert {p.shape for p in gm.GRID} == {"1b", "3b", "8b"}
    assert {p.seq for p in gm.GRID} == {512, 2048, 8192}
    assert {(p.mb, p.r, p.packed) for p in gm.GRID} == {
        (mb, r, pk) for mb in (1, 4) for r in (16, 64) for pk in (False, True)}


def test_parts_split_a_subset_without_loss_or_overlap():
    chosen = gm.select("all", packed="no", ranks=[16])
    assert len(chosen) == 18 and all(not p.packed and p.r == 16 for p in chosen)
    parts = [gm.select("all", packed="no", ranks=[16], part=f"{k}/4") for k in range(1, 5)]
    flat = [p for part in parts for p in part]
    assert sorted(flat, key=lambda p: p.name) == sorted(chosen, key=lambda p: p.name)
    times = [sum(p.est_seconds(3) for p in part) for part in parts]
    assert max(times) < 1.5 * min(times)  # about equal, so each fits one device call
    assert gm.select("core") == [p for p in gm.GRID if p.name.endswith("s2048-mb1-r16-unpacked")]
    assert gm.select("1b-s512-mb4-r64-packed,smoke") == [
        gm.Point("1b", 512, 4, 64, True), gm.Point("1b", 2048, 1, 16, False)]


def test_flags_follow_the_issue_bounds():
    assert [gm.flag(x) for x in (0.99, 1.0, 1.05, 1.10, 1.11, None)] == [
        "UNDER", "ok", "ok", "ok", "OVER", "n/a"]


def test_rows_fill_packed_and_unpacked_points():
    full = gm.make_rows(gm.Point("1b", 512, 4, 16, False), 8)
    assert len(full) == 8 and all(len(r["text"]) > 512 for r in full)
    short = gm.make_rows(gm.Point("1b", 512, 4, 16, True), 8)
    assert all(32 <= len(r["text"]) <= 128 for r in short)
    assert sum(len(r["text"]) for r in short) >= 8 * 512  # enough to pack 8 rows


def test_list_runs_without_torch():
    code = ("import runpy, sys; sys.argv = ['gpu_memory.py', '--list', '--subset', 'edges'];"
            f"\ntry: runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"
            "\nexcept SystemExit: pass"
            "\nassert 'torch' not in sys.modules, 'the grid code imported torch'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "9 points" in proc.stdout and "8b-s8192-mb4-r64-packed" in proc.stdout


@pytest.mark.slow
def test_cpu_smoke_runs_both_point_kinds_through_train(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(tmp_path / "out"),
         "--models-dir", str(tmp_path / "models"), "--per-gpu", "2"],
        capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads((tmp_path / "out" / "gpu_memory.json").read_text())["rows"]
    assert [r["packed"] for r in rows] == [False, True]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["predicted"] > 0 and "predict_error" not in r  # the estimate ran per point
        assert r["micro_batch_used"] == r["mb"]
    assert "predicted vs measured" in proc.stdout
