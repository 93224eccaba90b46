"""The decode loop: KV-cached forward passes, temperature / top-p sampling from a seeded
generator, stop strings cut exactly, and text handed out as it becomes final.

Our own loop rather than `model.generate` + a streamer thread: the seed must govern only this
request's sampling (a private `torch.Generator`, not the process-wide RNG that concurrent
requests share), and stop strings must be cut at the exact character, held back while the text
could still turn into one.
"""

from __future__ import annotations

import inspect
import secrets
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

import torch

from .params import SamplingParams


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens}


@dataclass
class Chunk:
    """A piece of new text; the last chunk also carries `finish_reason` ("stop": an end token
    or a stop string; "length": max_tokens or the context ran out) and `usage`."""

    text: str = ""
    finish_reason: Optional[str] = None
    usage: Optional[Usage] = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "finish_reason": self.finish_reason,
                "usage": self.usage.to_dict() if self.usage else None}


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every id that ends a reply: the tokenizer's and generation config's EOS, and ChatML's
    end-of-turn when the tokenizer has it as a special token."""
    ids: set[int] = set()
    for source in (getattr(tokenizer, "eos_token_id", None),
                   getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    if "<|im_end|>" in (getattr(tokenizer, "all_special_tokens", None) or ()):
        ids.add(int(tokenizer.convert_tokens_to_ids("<|im_end|>")))
    return ids


def _held_back(text: str, stops: Iterable[str]) -> int:
    """How many trailing characters of `text` may not be handed out yet: the start of a stop
    string, or a multi-byte character still being decoded (U+FFFD)."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


def _first_stop(text: str, stops: Iterable[str], start: int) -> int:
    """Index of the earliest stop string in text[start:], or -1."""
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def _sampler(params: SamplingParams):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = LogitsProcessorList()
    if params.temperature not in (0.0, 1.0):  # 0 is greedy: no warper
        warpers.append(TemperatureLogitsWarper(float(params.temperature)))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(float(params.top_p)))
    gen = torch.Generator(device="cpu")
    gen.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))

    def pick(ids: torch.Tensor, logits: torch.Tensor) -> int:
        if params.temperature == 0:
            return int(torch.argmax(logits, dim=-1))
        # On the CPU in fp32, so one seed gives one answer whatever device the model is on.
        scores = warpers(ids, logits.float().cpu().unsqueeze(0))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=gen))

    return pick


def _cache_argument(model: Any) -> str:
    """The forward argument that takes the KV cache: `cache` in transformers 5, before that
    `past_key_values` (still accepted by 5, with a deprecation warning per call)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else \
        "past_key_values"


_NO_IDS = torch.zeros((1, 0), dtype=torch.long)


@torch.inference_mode()
def generate(model: Any, tokenizer: Any, prompt_ids: list[int], params: SamplingParams,
             *, max_new_tokens: Optional[int] = None) -> Iterator[Chunk]:
    """Chunks of the reply to `prompt_ids`; the last one has `finish_reason` and `usage`.
    `max_new_tokens` (the context left) caps `params.max_tokens`."""
    limit = min(params.max_tokens, max_new_tokens or params.max_tokens)
    device = next(model.parameters()).device
    eos = eos_token_ids(model, tokenizer)
    pick = _sampler(params)
    stops = params.stop
    longest = max((len(s) for s in stops), default=0)

    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    past = None
    cache_arg = _cache_argument(model)
    out_ids: list[int] = []
    emitted = 0  # characters of the decoded reply already handed out
    finish = "length"
    text = ""
    for _ in range(limit):
        out = model(input_ids=ids, use_cache=True, **{cache_arg: past})
        past = getattr(out, "cache", None) or out.past_key_values
        # The warpers in use ignore the ids; only a shape is needed.
        token = pick(_NO_IDS, out.logits[0, -1])
        if token in eos:
            out_ids.append(token)
            finish = "stop"
            break
        out_ids.append(token)
        ids = torch.tensor([[token]], dtype=torch.long, device=device)
        text = tokenizer.decode(out_ids, skip_special_tokens=True,
                                clean_up_tokenization_spaces=False)
        if stops:
            cut = _first_stop(text, stops, max(0, emitted - longest))
            if cut >= 0:
                if cut > emitted:
                    yield Chunk(text[emitted:cut])
                emitted = len(text)
                finish = "stop"
                text = text[:cut]
                break
        safe = len(text) - _held_back(text, stops)
        if safe > emitted:
            yield Chunk(text[emitted:safe])
            emitted = safe
    if emitted < len(text):  # what was held back for a stop string that never came
        yield Chunk(text[emitted:])
    yield Chunk("", finish_reason=finish,
                usage=Usage(prompt_tokens=len(prompt_ids), completion_tokens=len(out_ids)))
