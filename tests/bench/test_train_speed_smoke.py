"""bench/train_speed.py's harness, tested on the CPU (the GPU numbers come from the device).

The fast tests check the parts that decide what the table says (same tokens for every runner,
the issue's floor/goal verdicts); the slow ones run `--cpu-smoke` end to end: a tiny random
Llama, the plain HF + peft + bitsandbytes loop and lorapool's `train()`, each in its own
subprocess, and `--check-same` (lorapool fast vs reference).
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "train_speed.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_train_speed", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


ts = _load()
GiB = 1024**3


def test_rows_tokenize_to_seq_tokens_with_first_label_ignored(tmp_path):
    from lorapool.service.train.tiny import make_char_tokenizer

    tok = make_char_tokenizer()
    rows = ts.make_rows(8, 32, seed=1)
    assert rows == ts.make_rows(8, 32, seed=1)  # every runner rebuilds the same data
    assert rows != ts.make_rows(8, 32, seed=2)
    batches = ts.token_batches(tok, rows, 32, 4)
    assert len(batches) == 2
    ids, labels = batches[0]
    assert tuple(ids.shape) == (4, 32)
    assert (labels[:, 0] == -100).all() and (labels[:, 1:] == ids[:, 1:]).all()
    assert tok.decode(ids[0].tolist()) == rows[0]["text"][:32]


def _row(runner, shape="8b", mb=1, tok_s=1000.0, alloc=10.0, driver=11.0, status="ok"):
    return {"runner": runner, "shape": shape, "mb": mb, "status": status, "tok_s": tok_s,
            "peak_alloc": alloc * GiB, "driver_peak": driver * GiB}


def test_checks_apply_the_issue_floor_and_goal():
    results = [_row("plain", tok_s=1000, alloc=10), _row("unsloth", tok_s=3000, alloc=6),
               _row("lorapool", tok_s=2300, alloc=5, driver=6.4)]
    verdicts = {name: v for name, v, _ in ts.checks(results)}
    assert verdicts["8b mb1: floor tok/s >= 2.2x plain"] == "PASS"
    assert verdicts["8b mb1: floor peak alloc <= 0.55x plain"] == "PASS"
    assert verdicts["8b mb1: floor driver-visible <= 6.5 GiB"] == "PASS"
    assert verdicts["8b mb1: goal tok/s >= unsloth"] == "FAIL"
    assert verdicts["8b mb1: goal peak alloc <= unsloth"] == "PASS"

    slow = [_row("plain", tok_s=1000, alloc=10), _row("lorapool", tok_s=2100, alloc=6, driver=7)]
    verdicts = {name: v for name, v, _ in ts.checks(slow)}
    assert verdicts["8b mb1: floor tok/s >= 2.2x plain"] == "FAIL"
    assert verdicts["8b mb1: floor peak alloc <= 0.55x plain"] == "FAIL"
    assert verdicts["8b mb1: floor driver-visible <= 6.5 GiB"] == "FAIL"
    assert verdicts["8b mb1: goal vs unsloth"] == "n/a"

    failed = [_row("plain"), _row("lorapool", status="timeout")]
    assert [v for _, v, _ in ts.checks(failed)] == ["FAIL"]


def _smoke(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out), "--models-dir",
         str(tmp_path / "models"), *extra],
        capture_output=True, text=True, timeout=400, cwd=ROOT)
    report = json.loads((out / "train_speed.json").read_text())
    return proc, report


@pytest.mark.slow
def test_cpu_smoke_runs_plain_and_lorapool_on_the_same_tokens(tmp_path):
    proc, report = _smoke(tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {r["runner"]: r for r in report["results"]}
    assert set(rows) == {"plain", "lorapool"}
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["tok_s"] > 0 and math.isfinite(r["final_loss"]) and len(r["losses"]) == 2
    # Same random model and the same rows in the same order; LoRA B starts at zero, so the
    # first step's loss is the base model's loss on the same batch in both runners.
    a, b = rows["plain"]["losses"][0], rows["lorapool"]["losses"][0]
    assert abs(a - b) / abs(b) < 1e-3
    assert "plain" in proc.stdout and "issue 9 checks" in proc.stdout


@pytest.mark.slow
def test_cpu_smoke_check_same_compares_fast_and_reference(tmp_path):
    proc, report = _smoke(tmp_path, "--check-same")
    same = report["check_same"]
    assert same["status"] == "ok", same
    assert len(same["loss_rel_diff"]) == same["steps"] == 3
    # On the CPU "auto" keeps the reference path except the chunked loss, which is
    # numerically the same: the runs agree far inside the 1 % the issue allows.
    assert same["loss_rel_diff_max"] <= 0.01
    assert same["adapter_rel_diff_norm"] < 1e-2
    assert proc.returncode == 0 and "PASS" in proc.stdout


def test_no_gpu_exits_with_a_clear_message():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--shapes", "1b"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert "needs a CUDA GPU" in proc.stderr and "--cpu-smoke" in proc.stderr


def test_lanes_take_the_longest_shapes_first_and_one_lane_keeps_the_table_order():
    one = ts._job_order(["1b", "8b"], [1, 4], ["plain", "lorapool"], lanes=1)
    assert one[:2] == [("1b", 1, "plain"), ("1b", 1, "lorapool")]
    many = ts._job_order(["1b", "8b"], [1, 4], ["plain", "lorapool"], lanes=2)
    assert sorted(many) == sorted(one)
    assert [shape for shape, _, _ in many] == ["8b"] * 4 + ["1b"] * 4


@pytest.mark.slow
def test_cpu_smoke_on_two_lanes_pins_each_run_and_keeps_the_table_order(tmp_path):
    proc, report = _smoke(tmp_path, "--gpus", "0,1", "--runners", "plain,lorapool,lorapool-ref")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = report["results"]
    assert [r["runner"] for r in rows] == ["plain", "lorapool", "lorapool-ref"]
    assert all(r["status"] == "ok" for r in rows), rows
    assert {r["gpu_lane"] for r in rows} <= {"0", "1"}
