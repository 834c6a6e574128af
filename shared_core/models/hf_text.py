"""Text <-> tokens through a Hugging Face tokenizer: one implementation for every backend
that reads text with one (the in-process transformers model and a served model whose
tokenizer is loaded locally), so both render a chat, and fall back, the same way.

Torch-free: a served backend uses it without importing torch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from jinja2 import TemplateError

from shared_core.models.protocol import Message

__all__ = ["HFTokenizerText", "merge_system"]

logger = logging.getLogger(__name__)


def merge_system(msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with every system text put at the start of the first user message."""
    system = "\n\n".join(str(m["content"]) for m in msgs if m["role"] == "system")
    rest = [dict(m) for m in msgs if m["role"] != "system"]
    first_user = next((m for m in rest if m["role"] == "user"), None)
    if first_user is None:
        return [{"role": "user", "content": system}, *rest]
    first_user["content"] = f"{system}\n\n{first_user['content']}"
    return rest


class HFTokenizerText:
    """``encode`` / ``decode`` / ``render_chat`` of :class:`LanguageModel` over ``self.tokenizer``.

    The class using it sets ``tokenizer``, ``name`` and ``vocab_size``.
    """

    tokenizer: Any
    name: str
    vocab_size: int
    # A fast tokenizer keeps per-call settings (split_special_tokens, truncation) on
    # one shared Rust object: concurrent calls with different settings must not mix.
    # Set per instance (``threading.Lock()``) by the class using this.
    _tokenizer_lock: threading.Lock
    _token_texts: list[str] | None = None

    def encode(self, text: str) -> list[int]:
        with self._tokenizer_lock:
            ids = self.tokenizer(text, add_special_tokens=False, split_special_tokens=False)
        return list(ids["input_ids"])

    def encode_literal(self, text: str) -> list[int]:
        with self._tokenizer_lock:
            ids = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)
        return list(ids["input_ids"])

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=True))

    def token_texts(self) -> list[str]:
        """Text of every token id alone (for clause-end masks); computed once."""
        if self._token_texts is None:
            ids = [[i] for i in range(self.vocab_size)]
            self._token_texts = [str(t) for t in self.tokenizer.batch_decode(ids)]
        return self._token_texts

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The prompt in the model's chat template; documented fallbacks:

        - a template without a system role (it raises, or drops the system text) gets
          the system text at the start of the first user message (logged);
        - a model without a template (a base model, e.g. Gemma 3 270M's GGUF) gets a
          transcript of ``Role: content`` lines ending in ``Assistant:``, after the
          tokenizer's BOS if the tokenizer starts every sequence with one.
        """
        msgs: list[dict[str, Any]] = [
            {"role": m["role"], "content": m["content"]} for m in messages
        ]
        if self.has_chat_template:
            # Stripped: a template may trim what it writes (Llama 3's does).
            system = [str(m["content"]).strip() for m in msgs if m["role"] == "system"]
            try:
                text = self._apply_template(msgs, add_generation_prompt)
                if all(s in text for s in system):
                    return text
                reason = "drops the system text"
            except TemplateError as exc:
                if not system:
                    raise
                reason = f"refuses a system message ({exc})"
            logger.info(
                "%s's chat template %s: it is put at the start of the first user message",
                self.name,
                reason,
            )
            return self._apply_template(merge_system(msgs), add_generation_prompt)
        # A transcript; a model trained with a BOS first (Gemma) only repeats without it.
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in msgs]
        if add_generation_prompt:
            lines.append("Assistant:")
        bos = self.tokenizer.bos_token if getattr(self.tokenizer, "add_bos_token", False) else None
        return (bos or "") + "\n".join(lines)

    def _apply_template(self, msgs: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        return str(
            self.tokenizer.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        )
