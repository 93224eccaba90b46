"""`InferenceEngine`: a base from the LRU, an adapter on it, a prompt, and the decode loop.

Two steps so that a caller learns about every error before it starts answering (an HTTP
stream cannot change its status once begun): `prepare` loads the base and the adapter, renders
and checks the prompt, and raises `InferenceError`; `run` only generates.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from .adapters import AdapterSource
from .cache import BaseCache, LoadedBase, Loader
from .errors import InvalidRequest
from .generate import Chunk, generate
from .params import SamplingParams, check_messages
from .prompt import render_chat


def load_for_inference(model_dir: str | Path, *, device: str = "auto",
                       cache_dir: str | Path | None = None,
                       trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) through the trainer's own loader: 4-bit NF4 on a GPU, unquantised on
    the CPU (small models fit, and bitsandbytes' CPU 4-bit matmul is slow to decode with)."""
    import torch

    from lorapool.service.train import TrainSpec, load_base_model

    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    spec = TrainSpec(base_model=str(model_dir), trust_remote_code=trust_remote_code,
                     quantization="nf4" if cuda else "none",
                     device="cuda" if cuda else "cpu")
    model, tokenizer = load_base_model(spec, cache_dir=cache_dir)
    model.config.use_cache = True  # the trainer turns the KV cache off; decoding wants it
    return model, tokenizer


@dataclass
class Prepared:
    """A request ready to generate: its base, adapter, prompt token ids and parameters."""

    base: LoadedBase
    adapter: Optional[AdapterSource]
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


class InferenceEngine:
    """Bases in an LRU (`BaseCache`), adapters swapped on them, one generation per base at a
    time (the active adapter is the base's state)."""

    def __init__(self, max_models: int = 2, max_bytes: Optional[int] = None,
                 max_adapters: int = 8) -> None:
        self.cache = BaseCache(max_models=max_models, max_bytes=max_bytes,
                               max_adapters=max_adapters)

    def prepare(self, base_key: str, load: Loader, *, params: SamplingParams,
                adapter: Optional[AdapterSource] = None,
                messages: Optional[list[dict]] = None,
                prompt: Optional[str] = None) -> Prepared:
        """Exactly one of `messages` (chat) and `prompt` (plain completion)."""
        if (messages is None) == (prompt is None):
            raise InvalidRequest("give either messages or prompt", param="messages")
        if messages is not None:
            messages = check_messages(messages)
        elif not isinstance(prompt, str):
            raise InvalidRequest("prompt must be a string", param="prompt")
        base = self.cache.get(base_key, load)
        with base.lock:
            if adapter is not None:
                base.attach(adapter)  # errors (a refused folder) surface here, not mid-stream
            if messages is not None:
                text = render_chat(base.tokenizer, messages)
                # The template writes any BOS itself; the tokenizer must not add another.
                ids = base.tokenizer(text, add_special_tokens=False)["input_ids"]
            else:
                ids = base.tokenizer(prompt)["input_ids"]
        field = "messages" if messages is not None else "prompt"
        if not ids:
            raise InvalidRequest(f"{field} is empty", param=field)
        context = int(getattr(base.model.config, "max_position_embeddings", 0) or 0)
        room = context - len(ids) if context else params.max_tokens
        if room < 1:
            raise InvalidRequest(f"{field} is {len(ids)} tokens; the model's context is "
                                 f"{context}", param=field, code="context_length_exceeded")
        return Prepared(base, adapter, list(ids), params, room)

    def run(self, job: Prepared) -> Iterator[Chunk]:
        """The reply, chunk by chunk (see `generate`)."""
        with job.base.lock, job.base.select(job.adapter):
            yield from generate(job.base.model, job.base.tokenizer, job.prompt_ids, job.params,
                                max_new_tokens=job.max_new_tokens)

    def complete(self, job: Prepared) -> tuple[str, Chunk]:
        """The whole reply at once: (text, last chunk with finish_reason and usage)."""
        parts, last = [], Chunk()
        for chunk in self.run(job):
            parts.append(chunk.text)
            last = chunk
        return "".join(parts), last
