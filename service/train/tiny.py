"""Tiny, randomly initialised Llama models with a character tokenizer, built offline.

Tests, benchmarks and GPU smoke runs need a real `transformers` model folder that loads through
exactly the same path as a user's model, but nothing may be downloaded. `make_tiny_llama` writes
one (config, safetensors weights, tokenizer with a chat template) to a folder in well under a
second. Larger shapes (`make_random_llama(..., preset="1b")`) serve memory and speed runs.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

# ChatML, the template SmolLM2 and many small instruct models use.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]

PRESETS: dict[str, dict[str, Any]] = {
    # ~0.1M params: unit tests.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    # Llama-3.2-1B's shape (vocab kept at the real size so logits memory is realistic).
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
}


def make_char_tokenizer(chat_template: str | None = CHATML_TEMPLATE):
    """A fast tokenizer with one token per printable ASCII character plus ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def make_random_llama(
    dest: str | Path,
    preset: str = "tiny",
    *,
    seed: int = 0,
    chat_template: str | None = CHATML_TEMPLATE,
    write_weights: bool = True,
    **overrides: Any,
) -> Path:
    """Write a random Llama of the given preset (config, weights, tokenizer) to `dest`.

    With `write_weights=False` only the config and tokenizer are written: enough for
    `estimate_memory`, which reads shapes from the config alone.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = make_char_tokenizer(chat_template)
    params = dict(PRESETS[preset])
    params.setdefault("vocab_size", len(tokenizer))
    params["tie_word_embeddings"] = False  # an override may tie them (Llama-3.2-1B/3B do)
    params.update(overrides)
    config = LlamaConfig(
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **params,
    )
    if write_weights:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        model.save_pretrained(dest, safe_serialization=True)
    else:
        config.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def make_tiny_llama(dest: str | Path, *, seed: int = 0, **overrides: Any) -> Path:
    """The 2-layer, 64-wide Llama the test suite trains on."""
    return make_random_llama(dest, "tiny", seed=seed, **overrides)
