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

Pieces: `params` (request limits), `prompt` (chat template rendering), `adapters` (safetensors
only), `cache` (LRU of loaded bases), `generate` (the decode loop with stop strings and
streaming), `engine` (all of it together).
"""

from .adapters import AdapterSource, check_adapter_folder
from .cache import BaseCache, LoadedBase
from .engine import InferenceEngine, Prepared, load_for_inference
from .errors import InferenceError, InvalidRequest
from .generate import Chunk, Usage, generate
from .params import MAX_STOP_SEQUENCES, MAX_TOKENS_LIMIT, SamplingParams
from .prompt import render_chat

__all__ = [
    "MAX_STOP_SEQUENCES",
    "MAX_TOKENS_LIMIT",
    "AdapterSource",
    "BaseCache",
    "Chunk",
    "InferenceEngine",
    "InferenceError",
    "InvalidRequest",
    "LoadedBase",
    "Prepared",
    "SamplingParams",
    "Usage",
    "check_adapter_folder",
    "generate",
    "load_for_inference",
    "render_chat",
]
