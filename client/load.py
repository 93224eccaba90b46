"""`lorapool.load(adapter_dir)`: a downloaded or exported adapter as a ready peft model.

Needs the `local` extra (torch, transformers, peft); `import lorapool` does not import this
module's dependencies until `load` is called. The base is found from the folder itself:
`lorapool.json`'s `base_model_public_id` (what `lorapool export --format peft` writes), else
`adapter_config.json`'s `base_model_name_or_path` — a local folder (e.g. one fetched with
`lorapool models download`) or a Hugging Face Hub id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

from ._quiet import quiet_libraries


def base_of(adapter_dir: Union[str, Path]) -> str:
    """Where the adapter's base model is to be loaded from (a folder or a Hub id)."""
    folder = Path(adapter_dir).expanduser()
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no adapter_config.json: not a PEFT folder")
    config = json.loads(config_path.read_text())
    meta_path = folder / "lorapool.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    base = meta.get("base_model_public_id") or config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{folder}: neither lorapool.json nor adapter_config.json names the "
                         "base model; pass base=")
    return str(base)


def load(adapter_dir: Union[str, Path], *, base: Union[str, Path, None] = None,
         dtype: Any = None, device: Optional[str] = None, with_tokenizer: bool = False) -> Any:
    """The peft model of base + adapter (eval mode); with `with_tokenizer`, (model, tokenizer).

    `base` overrides the base the folder names (e.g. a folder from `lorapool models
    download`). Weights are read as safetensors only.
    """
    quiet_libraries()  # before peft imports bitsandbytes, which warns at import time
    try:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # the light client has none of these
        raise ImportError("lorapool.load needs torch, transformers and peft: "
                          "pip install 'lorapool[local]'") from exc

    folder = Path(adapter_dir).expanduser()
    source = str(base) if base is not None else base_of(folder)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32,
                                                 use_safetensors=True)
    model = PeftModel.from_pretrained(model, str(folder))
    if device:
        model = model.to(device)
    model.eval()
    if with_tokenizer:
        return model, AutoTokenizer.from_pretrained(source)
    return model
