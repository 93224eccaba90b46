"""Adapter exports for the tools users already run: a clean PEFT folder, a merged model.

Pure library (no Ray, no HTTP, no store): the pool's export task calls these on a node with the
adapter folder and the base model folder it received, and ships the output folder back.

- `export_peft`: the adapter folder as `PeftModel.from_pretrained` loads it, with
  `base_model_name_or_path` set to the base's public id (a Hugging Face id where lorapool knows
  one, else the registered name), an honest adapter card (README.md) and a `lorapool.json`
  scrubbed of every server path.
- `export_merged`: the base with the adapter merged in (`merge_and_unload`), saved as bf16
  safetensors with its tokenizer, loadable by plain transformers and vLLM.
- `export_base`: the (dequantised) base model as an HF folder, for `lorapool models download`.

The GGUF adapter lives in `export_gguf.py`.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Optional

from .errors import MergeError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
METADATA_FILE = "lorapool.json"
CARD_FILE = "README.md"
FORMATS = ("peft", "merged", "gguf")

# Public ids of lorapool's built-in models: what `base_model_name_or_path` should say so that
# peft, vLLM and the Hub find the base without lorapool. A registered model has none (its
# name is all we know) unless the admin named it after its Hub id.
PUBLIC_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}

# Files of a base model folder worth shipping: weights as safetensors, configs, tokenizer.
# Never pickles, never remote code.
_BASE_SUFFIXES = (".safetensors", ".json", ".txt", ".model", ".tiktoken", ".jinja")
_ABS_PATH = re.compile(r"^(/|[A-Za-z]:[\\/]|~[/\\])")


def public_id(model_name: str, *, builtin: bool = False) -> str:
    """The id a user outside lorapool finds the base by: the Hub id of a built-in model, else
    the registered name (which an admin may well have chosen to be the Hub id)."""
    if builtin or model_name in PUBLIC_IDS:
        return PUBLIC_IDS.get(model_name, model_name)
    return model_name


def scrub_paths(value: Any) -> Any:
    """`value` without any string that is an absolute filesystem path (dict entries dropped,
    list items dropped): what the server's disk looks like is nobody's business."""
    if isinstance(value, dict):
        return {k: scrub_paths(v) for k, v in value.items()
                if not (isinstance(v, str) and _ABS_PATH.match(v))}
    if isinstance(value, list):
        return [scrub_paths(v) for v in value if not (isinstance(v, str) and _ABS_PATH.match(v))]
    return value


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "—" if value is None else str(value)


def adapter_card(*, adapter_id: str, base_id: str, base_sha256: Optional[str],
                 config: dict[str, Any], metadata: dict[str, Any], version: str) -> str:
    """The README.md of an exported adapter: what it is, what it was trained on and how, how
    to load it. Only facts from the config and lorapool's metadata; no paths."""
    spec = metadata.get("spec") or {}
    metrics = metadata.get("metrics") or {}
    hyper = {
        "r": config.get("r"), "lora_alpha": config.get("lora_alpha"),
        "lora_dropout": config.get("lora_dropout"),
        "target_modules": config.get("target_modules"),
        "use_rslora": config.get("use_rslora"),
    }
    for key in ("n_epochs", "learning_rate", "batch_size", "gradient_accumulation_steps",
                "max_seq_len", "seed", "lr_scheduler", "warmup_ratio"):
        if key in spec:
            hyper[key] = spec[key]
    lines = [
        "---",
        f"base_model: {base_id}",
        "library_name: peft",
        "tags: [lora, lorapool]",
        "---",
        "",
        f"# LoRA adapter `{adapter_id}`",
        "",
        f"A LoRA adapter for **{base_id}**, trained with lorapool {version}.",
        "",
        "## Base model",
        "",
        f"- id: `{base_id}`",
        f"- sha256 of the weights lorapool trained on: `{base_sha256 or 'unknown'}`",
        "",
        "## Data",
        "",
        f"- training examples: {_fmt(metadata.get('n_examples'))}",
        "",
        "## Hyper-parameters",
        "",
        *[f"- {k}: {_fmt(v)}" for k, v in hyper.items() if v is not None],
        "",
        "## Metrics",
        "",
        *([f"- {k}: {_fmt(v)}" for k, v in sorted(metrics.items())
           if isinstance(v, (int, float, str)) and not (isinstance(v, str) and _ABS_PATH.match(v))]
          or ["- none recorded"]),
    ]
    if metadata.get("merge"):
        merge = metadata["merge"]
        lines += ["", "## Merge", "",
                  f"- method: {_fmt(merge.get('method'))}",
                  f"- inputs: {', '.join(str(i.get('adapter_id', '?')) for i in merge.get('inputs', []))}"]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "from peft import PeftModel",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base_id}")',
        'model = PeftModel.from_pretrained(base, "path/to/this/folder")',
        "```",
        "",
        "Or, with the lorapool client: `lorapool.load(\"path/to/this/folder\")`.",
        "",
    ]
    return "\n".join(lines)


def export_peft(adapter_dir: str | Path, dest: str | Path, *, adapter_id: str, base_id: str,
                base_sha256: Optional[str], version: str,
                extra_metadata: Optional[dict[str, Any]] = None) -> Path:
    """Write the clean PEFT folder of `adapter_dir` to `dest` (created; must not exist)."""
    src, dest = Path(adapter_dir), Path(dest)
    if not (src / WEIGHTS_FILE).is_file():
        raise MergeError(f"adapter {adapter_id}: no {WEIGHTS_FILE}")
    config = json.loads((src / CONFIG_FILE).read_text())
    meta: dict[str, Any] = {}
    if (src / METADATA_FILE).is_file():
        meta = json.loads((src / METADATA_FILE).read_text())
    config["base_model_name_or_path"] = base_id
    config = scrub_paths(config)
    meta.update(extra_metadata or {})
    meta.update({"adapter_id": adapter_id, "base_model_public_id": base_id,
                 "base_model_sha256": base_sha256 or meta.get("base_model_sha256"),
                 "lorapool_version": version})
    spec = dict(meta.get("spec") or {})
    for key in ("base_model", "output_dir", "cache_dir", "resume_from"):
        spec.pop(key, None)
    if meta.get("spec") is not None:
        meta["spec"] = spec
    meta = scrub_paths(meta)
    dest.mkdir(parents=True, exist_ok=False)
    shutil.copyfile(src / WEIGHTS_FILE, dest / WEIGHTS_FILE)
    (dest / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    (dest / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    (dest / CARD_FILE).write_text(adapter_card(
        adapter_id=adapter_id, base_id=base_id, base_sha256=meta.get("base_model_sha256"),
        config=config, metadata=meta, version=version))
    return dest


def _scrub_json_files(folder: Path) -> None:
    """transformers records where a model was loaded from (`_name_or_path`, tokenizer
    `name_or_path`); an export must not carry the node's folder."""
    for f in folder.glob("*.json"):
        try:
            data = json.loads(f.read_text())
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(data, dict):
            clean = scrub_paths(data)
            if clean != data:
                f.write_text(json.dumps(clean, indent=2, sort_keys=True))


def export_merged(adapter_dir: str | Path, base_dir: str | Path, dest: str | Path, *,
                  base_id: str, trust_remote_code: bool = False) -> Path:
    """The base with the adapter merged in, bf16 safetensors + tokenizer, into `dest`."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=False)
    # Merge in fp32 (B·A added to the fp32 base), then round once to bf16.
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32,
                                                trust_remote_code=trust_remote_code)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    model = model.to(torch.bfloat16)
    model.config.name_or_path = base_id
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
    tokenizer.save_pretrained(dest)
    _scrub_json_files(dest)
    return dest


def export_base(base_dir: str | Path, dest: str | Path) -> Path:
    """Copy the base's shippable files (safetensors, configs, tokenizer) to `dest`."""
    src, dest = Path(base_dir), Path(dest)
    dest.mkdir(parents=True, exist_ok=False)
    for f in sorted(src.rglob("*")):
        if f.is_file() and f.suffix in _BASE_SUFFIXES and not f.name.startswith("."):
            rel = f.relative_to(src)
            if rel.name == "lorapool-source.json":
                continue
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dest / rel)
    _scrub_json_files(dest)
    return dest
