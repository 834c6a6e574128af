"""Validation and normalisation of the chat messages users hand the engine."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

from shared_core.errors import RainInputError

__all__ = ["ROLES", "MessagesLike", "conversation_text", "normalize_messages"]

ROLES = ("system", "user", "assistant", "tool")
"""Roles the engine accepts (LangChain/LlamaIndex adapters map theirs onto these)."""

MessagesLike = str | Sequence[Mapping[str, Any]]

# C0/C1 control characters other than tab, newline and carriage return.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _clean(text: str, where: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RainInputError(
            f"{where} is not valid UTF-8 text (it holds a lone surrogate); "
            "decode your input with errors='replace' before passing it"
        ) from None
    # Documented behaviour: control characters are dropped, not sent to the model.
    return unicodedata.normalize("NFC", _CONTROL.sub("", text))


def normalize_messages(messages: MessagesLike) -> list[dict[str, str]]:
    """Check and clean messages: a string is one user message.

    Raises :class:`RainInputError` for no messages, an unsupported role,
    non-text content, or a conversation with no non-blank text.
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, Sequence) or len(messages) == 0:
        raise RainInputError(
            "no messages were given; pass a prompt string or a list like "
            "[{'role': 'user', 'content': 'Hello'}]"
        )
    out: list[dict[str, str]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or "role" not in msg or "content" not in msg:
            raise RainInputError(
                f"message {i} must be a mapping with 'role' and 'content', got {msg!r:.80}"
            )
        role = str(msg["role"]).lower()
        if role not in ROLES:
            raise RainInputError(
                f"message {i} has unsupported role {msg['role']!r}; use one of {', '.join(ROLES)}"
            )
        content = msg["content"]
        if not isinstance(content, str):
            raise RainInputError(
                f"message {i} has content of type {type(content).__name__}; RAIN handles text "
                "only: pass a string (images, audio and other blocks are not supported)"
            )
        out.append({"role": role, "content": _clean(content, f"message {i}")})
    if all(not m["content"].strip() for m in out):
        raise RainInputError("the messages hold no text (empty or whitespace only)")
    if out[-1]["role"] == "assistant":
        raise RainInputError(
            "the last message is from the assistant; end with a user (or tool) message "
            "so the model has something to answer"
        )
    return out


def merge_consecutive(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Join consecutive messages of one role (for templates that demand alternation)."""
    merged: list[dict[str, str]] = []
    for m in messages:
        if merged and merged[-1]["role"] == m["role"]:
            merged[-1] = {
                "role": m["role"],
                "content": merged[-1]["content"] + "\n\n" + m["content"],
            }
        else:
            merged.append(dict(m))
    return merged


def conversation_text(messages: list[dict[str, str]]) -> str:
    """The conversation as the judge reads it: the request, or a labelled transcript."""
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) == 1:
        return turns[0]["content"].strip()
    return "\n".join(f"{m['role'].capitalize()}: {m['content'].strip()}" for m in turns)
