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

ROLES = ("system", "user", "assistant", "developer", "tool")


def check_messages(messages: Any) -> list[dict[str, str]]:
    """Messages as [{"role", "content": str}], or a 400 naming the message at fault. OpenAI's
    list-of-parts content is accepted when every part is text."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidRequest(f"{where} must be an object with role and content",
                                 param=where)
        role = m.get("role")
        if role not in ROLES:
            raise InvalidRequest(f"{where}.role must be one of {', '.join(ROLES)}, got "
                                 f"{role!r}", param=f"{where}.role")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text"
                        and isinstance(part.get("text"), str)):
                    raise InvalidRequest(f"{where}.content: only text parts are supported",
                                         param=f"{where}.content")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise InvalidRequest(f"{where}.content must be a string", param=f"{where}.content")
        # "developer" is OpenAI's newer name for the system role; templates know "system".
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt text ending where the assistant's reply begins."""
    template = getattr(tokenizer, "chat_template", None) or FALLBACK_CHAT_TEMPLATE
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
    except TemplateError as exc:  # e.g. a template that insists on alternating roles
        raise InvalidRequest(f"the model's chat template rejects these messages: {exc}",
                             param="messages") from exc
