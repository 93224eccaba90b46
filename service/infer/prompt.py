"""Chat messages → prompt text, with the tokenizer's chat template or training's fallback.

The adapter learnt its format from prompts rendered by `service/train/data_render.py`; the
prompt at inference must be the same text, so a tokenizer without a template gets the very
fallback (ChatML) that training used.
"""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError

from lorapool.service.train.data_render import FALLBACK_CHAT_TEMPLATE

from .errors import InvalidRequest
from .params import check_messages  # noqa: F401  (re-exported: the engine checks, then renders)


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt text ending where the assistant's reply begins."""
    template = getattr(tokenizer, "chat_template", None) or FALLBACK_CHAT_TEMPLATE
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
    except TemplateError as exc:  # e.g. a template that insists on alternating roles
        raise InvalidRequest(f"the model's chat template rejects these messages: {exc}",
                             param="messages") from exc
