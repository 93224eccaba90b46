"""Generation with a base model and a LoRA adapter (chat completions), as a pure library.

Like `service.train`, nothing here speaks Ray, HTTP or a database: the pool's
`InferenceWorker` (service/pool/inference.py) drives it on a node, tests drive it directly.

    engine = InferenceEngine(max_models=2)
    job = engine.prepare("base-sha", lambda: load_for_inference(folder),
                         adapter=AdapterSource("my-adapter", adapter_dir),
                         messages=[{"role": "user", "content": "hi"}],
                         params=SamplingParams(max_tokens=32, seed=1))
    for chunk in engine.run(job):
        print(chunk.text, end="")

Pieces: `params` (request limits, message shapes), `prompt` (chat template rendering),
`adapters` (safetensors only), `cache` (LRU of loaded bases, adapters swapped on them),
`generate` (the decode loop with stop strings and streaming), `engine` (all of it together).
Names are imported lazily (PEP 562), so the API can check a request with `params` and `errors`
without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AdapterSource": "adapters", "check_adapter_folder": "adapters",
    "BaseCache": "cache", "LoadedBase": "cache",
    "InferenceEngine": "engine", "Prepared": "engine", "load_for_inference": "engine",
    "InferenceError": "errors", "InvalidRequest": "errors", "AdapterRefused": "errors",
    "Chunk": "generate", "Usage": "generate", "generate": "generate",
    "MAX_STOP_SEQUENCES": "params", "MAX_TOKENS_LIMIT": "params", "SamplingParams": "params",
    "check_messages": "params",
    "render_chat": "prompt",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
