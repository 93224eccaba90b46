"""A LoRA adapter as a GGUF adapter file for llama.cpp and Ollama, plus an Ollama Modelfile.

Written with the `gguf` package in llama.cpp's adapter convention (the one its
`convert_lora_to_gguf.py` produces and `llama_adapter_lora_init` reads):

- metadata `general.architecture` (llama.cpp's arch name), `general.type = "adapter"`,
  `adapter.type = "lora"`, `adapter.lora.alpha`;
- per adapted linear layer, two tensors named after the base tensor in llama.cpp's naming plus
  `.lora_a` / `.lora_b` (e.g. `blk.3.attn_q.weight.lora_a`), A of numpy shape (r, in) and B of
  (out, r) — GGUF stores dimensions reversed, so llama.cpp sees a:[in, r], b:[r, out];
- llama.cpp computes scale = alpha / r per tensor pair; where peft's scaling is something else
  (rsLoRA, alpha_pattern) it is folded into B so that scale · B · A is peft's update exactly;
- for the llama architecture llama.cpp stores q/k weights with rows permuted per head (its
  rotary layout); a row permutation of ΔW = B·A is the same permutation of B's rows, so B of
  q_proj / k_proj is permuted the same way.

Tensor names come from `gguf.get_tensor_name_map`, the table llama.cpp's converters use.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .adapter_io import load_adapter
from .errors import MergeError

GGUF_FILE = "adapter.gguf"
MODELFILE = "Modelfile"

# HF config `model_type` → gguf MODEL_ARCH name, for the architectures lorapool trains.
_ARCHS = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2", "qwen3": "QWEN3",
          "gemma": "GEMMA", "gemma2": "GEMMA2", "phi3": "PHI3"}
# Architectures whose q/k weights llama.cpp's converter permutes for its rotary layout.
_PERMUTED_QK = {"LLAMA"}


def _permute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (per head, interleaved halves → split halves)."""
    out = rows.shape[0]
    return (rows.reshape(n_head, 2, out // n_head // 2, *rows.shape[1:])
            .swapaxes(1, 2).reshape(rows.shape))


def gguf_arch(base_config: dict[str, Any]) -> Any:
    import gguf

    model_type = str(base_config.get("model_type", ""))
    name = _ARCHS.get(model_type)
    if name is None:
        raise MergeError(f"GGUF export supports model types {sorted(_ARCHS)}, not "
                         f"{model_type!r}")
    return getattr(gguf.MODEL_ARCH, name)


def gguf_tensor_names(module_names: list[str], base_config: dict[str, Any]) -> dict[str, str]:
    """{peft module name → llama.cpp base tensor name} (e.g. `blk.0.attn_q.weight`)."""
    import gguf

    arch = gguf_arch(base_config)
    tmap = gguf.get_tensor_name_map(arch, int(base_config.get("num_hidden_layers", 0)))
    out = {}
    for name in module_names:
        mapped = tmap.get_name(f"{name}.weight", try_suffixes=(".weight",))
        if mapped is None:
            raise MergeError(f"module {name!r} has no llama.cpp tensor name for "
                             f"{gguf.MODEL_ARCH_NAMES[arch]}")
        out[name] = mapped
    return out


def export_gguf(adapter_dir: str | Path, base_config: dict[str, Any], dest: str | Path, *,
                base_gguf: str = "base.gguf", adapter_id: str = "adapter") -> Path:
    """Write `dest/adapter.gguf` and `dest/Modelfile` (FROM ./<base_gguf>, ADAPTER
    ./adapter.gguf); `base_config` is the base's HF config.json. Returns `dest`."""
    import gguf

    adapter = load_adapter(adapter_dir)
    embedded = [m for m in adapter.modules.values() if m.embedding]
    if embedded:
        raise MergeError(f"GGUF export: embedding adapters ({embedded[0].name}) are not "
                         "supported by llama.cpp's LoRA loader")
    if adapter.extra:
        raise MergeError(f"GGUF export: the adapter carries full tensors "
                         f"({sorted(adapter.extra)[0]}); llama.cpp adapters hold only LoRA "
                         "factors")
    arch = gguf_arch(base_config)
    names = gguf_tensor_names(sorted(adapter.modules), base_config)
    alpha = float(adapter.config["lora_alpha"])
    n_head = int(base_config.get("num_attention_heads", 0))
    n_kv = int(base_config.get("num_key_value_heads") or n_head)

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=False)
    writer = gguf.GGUFWriter(str(dest / GGUF_FILE), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_string(gguf.Keys.General.TYPE, gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(adapter_id)
    for name in sorted(adapter.modules):
        mod = adapter.modules[name]
        a = mod.A.numpy().astype(np.float32)
        # llama.cpp applies alpha / r; fold any other peft scaling into B.
        b = (mod.B * (mod.scaling * mod.rank / alpha)).numpy().astype(np.float32)
        if arch.name in _PERMUTED_QK:
            if name.endswith("q_proj"):
                b = _permute_rows(b, n_head)
            elif name.endswith("k_proj"):
                b = _permute_rows(b, n_kv)
        writer.add_tensor(f"{names[name]}.lora_a", np.ascontiguousarray(a))
        writer.add_tensor(f"{names[name]}.lora_b", np.ascontiguousarray(b))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (dest / MODELFILE).write_text(
        "# Ollama: put the base model's GGUF next to this file as "
        f"{base_gguf}, then `ollama create {adapter_id} -f Modelfile`\n"
        f"FROM ./{base_gguf}\nADAPTER ./{GGUF_FILE}\n")
    (dest / "gguf_export.json").write_text(json.dumps(
        {"arch": gguf.MODEL_ARCH_NAMES[arch], "alpha": alpha, "tensors": 2 * len(names)},
        indent=2))
    return dest
