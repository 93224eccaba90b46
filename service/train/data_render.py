"""One training record → (input_ids, labels): chat templates and loss masks.

Loss masks (labels, -100 = no loss) follow one rule per format:

- chat: the tokenizer's chat template renders the conversation; the tokens of each assistant
  message's content and its end-of-turn marker (ChatML: ``content<|im_end|>``) are learned,
  everything else (system/user/tool turns, role headers) is masked. Assistant messages with
  ``"weight": 0`` (OpenAI's format) are masked too.
- prompt/completion: ``prompt`` (with the tokenizer's BOS, if it adds one) is masked;
  ``completion`` + EOS is learned. No chat template is applied: this is the raw, legacy format.
- text: every token + EOS is learned.
- ``loss_on="all"``: every token is learned, whatever the format.

Assistant spans are found without string-searching the content (which may repeat elsewhere)
and without assuming a template: the conversation is rendered prefix by prefix — up to the turn
before an assistant message with the generation prompt, then including that message — and the
difference between the two renderings is the assistant part. Character spans are mapped onto
the tokens of the full rendering through the fast tokenizer's offsets, so labels match exactly
how the full conversation tokenizes (no BPE boundary drift).

A tokenizer without a chat template gets `FALLBACK_CHAT_TEMPLATE` (ChatML, the format SmolLM2
and many small instruct models use) and one warning per process. If ``<|im_start|>`` and
``<|im_end|>`` are not special tokens of that tokenizer they are tokenized as plain text; the
model then learns them as ordinary strings.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Any, Literal

from jinja2 import TemplateError

from lorapool.service.train.data_validate import InvalidRecord, check_record
from lorapool.service.train.errors import DataError
from lorapool.service.train.resolve import IGNORE_INDEX

LossOn = Literal["assistant", "all"]

FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_warned_fallback = False


class ChatTemplateError(DataError):
    """The tokenizer's chat template cannot be used to locate assistant turns."""

    code = "unsupported_chat_template"


def chat_template_of(tokenizer: Any) -> str:
    """The tokenizer's chat template, or the ChatML fallback (warning once per process)."""
    global _warned_fallback
    template = getattr(tokenizer, "chat_template", None)
    if template:
        return template
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            f"tokenizer {type(tokenizer).__name__} has no chat template; using lorapool's ChatML "
            "fallback (<|im_start|>role\\ncontent<|im_end|>)",
            UserWarning,
            stacklevel=3,
        )
    return FALLBACK_CHAT_TEMPLATE


def _render(tokenizer: Any, messages: list[dict], template: str, gen: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=gen, chat_template=template
        )
    except (TemplateError, ValueError, TypeError, KeyError, IndexError) as exc:
        # e.g. templates that insist on alternating user/assistant turns
        raise ChatTemplateError(f"the chat template rejects this conversation: {exc}") from None
    if not isinstance(text, str):  # a list when given a batch; we never do
        raise ChatTemplateError("chat template did not render to a string")
    return text


def _end_of_turn(span: str, special_tokens: list[str]) -> int:
    """Length of `span` up to and including its last special token (the end-of-turn marker),
    so that whitespace a template puts after it (ChatML's newline) is not learned."""
    ends = [span.rfind(tok) + len(tok) for tok in special_tokens if tok and tok in span]
    return max(ends) if ends else len(span)


def assistant_spans(
    messages: list[dict], tokenizer: Any, template: str
) -> tuple[str, list[tuple[int, int]]]:
    """The full rendering and the [start, end) character spans of each learned assistant turn."""
    clean = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
    full = _render(tokenizer, clean, template, gen=False)
    specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if isinstance(t, str)]
    if "<|im_end|>" in template and "<|im_end|>" not in specials:
        specials.append("<|im_end|>")  # fallback template on a tokenizer without ChatML tokens
    spans: list[tuple[int, int]] = []
    for i, msg in enumerate(messages):
        if msg.get("role") != "assistant" or msg.get("weight", 1) == 0:
            continue
        upto = _render(tokenizer, clean[: i + 1], template, gen=False)
        try:
            prefix = _render(tokenizer, clean[:i], template, gen=True)
        except ChatTemplateError:
            # some templates refuse an empty or system-only conversation
            prefix = ""
        if not upto.startswith(prefix):
            # The generation prompt is not how this template opens an assistant turn: fall back
            # to the plain prefix (the role header is then learned as well).
            prefix = _render(tokenizer, clean[:i], template, gen=False) if i else ""
        if not upto.startswith(prefix) or not full.startswith(upto):
            raise ChatTemplateError(
                "the chat template renders a conversation differently from its prefixes "
                f"(at messages[{i}]), so assistant turns cannot be located"
            )
        end = len(prefix) + _end_of_turn(upto[len(prefix):], specials)
        spans.append((len(prefix), end))
    return full, spans


def _label_by_spans(
    text: str, spans: list[tuple[int, int]], tokenizer: Any
) -> tuple[list[int], list[int]]:
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = [IGNORE_INDEX] * len(ids)
        for k, (start, stop) in enumerate(enc["offset_mapping"]):
            if stop > start and any(s <= start < e for s, e in spans):
                labels[k] = ids[k]
        return ids, labels
    # Slow tokenizers have no offsets: tokenize the pieces between span boundaries separately.
    ids, labels = [], []
    cuts = sorted({0, len(text), *(p for span in spans for p in span)})
    for a, b in itertools.pairwise(cuts):
        piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
        learned = any(s <= a < e for s, e in spans)
        ids += piece
        labels += piece if learned else [IGNORE_INDEX] * len(piece)
    return ids, labels


def _with_eos(ids: list[int], tokenizer: Any) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def render_example(
    record: dict, tokenizer: Any, loss_on: LossOn = "assistant"
) -> tuple[list[int], list[int]]:
    """input_ids and labels (-100 = no loss) for one record of any of the three formats."""
    try:
        fmt = check_record(record)
    except InvalidRecord as exc:
        raise DataError(f"invalid record: {exc}") from None
    if fmt == "chat":
        full, spans = assistant_spans(record["messages"], tokenizer, chat_template_of(tokenizer))
        ids, labels = _label_by_spans(full, spans, tokenizer)
    elif fmt == "prompt_completion":
        prompt = list(tokenizer(record["prompt"], add_special_tokens=True)["input_ids"])
        completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
        learned = _with_eos(list(completion), tokenizer)
        ids, labels = prompt + learned, [IGNORE_INDEX] * len(prompt) + learned
    else:
        ids = _with_eos(list(tokenizer(record["text"], add_special_tokens=True)["input_ids"]),
                        tokenizer)
        labels = list(ids)
    if loss_on == "all":
        labels = list(ids)
    return ids, labels
