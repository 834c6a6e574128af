"""The one narrow, batched protocol between the RAIN search and a language model.

The search asks a model three things, always for a batch, always on token ids
(what the search committed is exactly what the model reads next):

- :meth:`LanguageModel.top_tokens` -- the k likeliest next tokens after each
  prefix, with their log-probs (one-token candidate sets);
- :meth:`LanguageModel.sample` -- n continuations of up to L tokens after each
  prefix: top-k / temperature sampling from a seed, an optional greedy row,
  stopping at a stop token, after a clause end, or at a stop string, under an
  optional output grammar (multi-token candidate sets, rollouts, vanilla);
- :meth:`LanguageModel.label_logprobs` -- the log-probs of given label tokens
  as the next token after each judge prompt (self-evaluation).

No callback crosses it: sampling and grammar masking happen behind it (in
process: our code; served: the server's). The in-process transformers backend
(``shared_core.models.hf``), the served HTTP backend (``shared_core.models.served``)
and the pure-Python scripted backend (``shared_core.models.scripted``) are its
implementations; the search never knows which one it talks to.

This module imports neither torch nor transformers.
"""

from __future__ import annotations

import json
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Continuation",
    "Grammar",
    "LanguageModel",
    "Message",
    "SampleRequest",
    "TopTokens",
    "TopTokensRequest",
    "WorkCounter",
]

Message = Mapping[str, Any]
"""A chat message: ``{"role": "user" | "assistant" | "system" | "tool", "content": str}``."""


@dataclass(frozen=True)
class Grammar:
    """An output grammar the model's tokens must follow (structured output, tool calls).

    Applied to the tokens from ``response_start`` of a request's prefix on: the
    prompt is never constrained, the response so far and what comes next are.
    """

    json_schema: str
    """A JSON Schema, as canonical JSON text (key order kept: properties come in order)."""

    @classmethod
    def from_schema(cls, schema: Mapping[str, Any]) -> Grammar:
        return cls(json.dumps(dict(schema)))


@dataclass(frozen=True)
class TopTokensRequest:
    """The ``k`` likeliest next tokens after ``prefix``."""

    prefix: tuple[int, ...]
    k: int
    grammar: Grammar | None = None
    """Tokens the grammar forbids after ``prefix[response_start:]`` are never returned."""
    response_start: int = 0
    reuse: bool = True
    """False: recompute from scratch, no cached prefix (the reference for reuse checks)."""


@dataclass(frozen=True)
class TopTokens:
    """Next tokens best first (ties: lower id), with their log-probs at temperature 1."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]


@dataclass(frozen=True)
class SampleRequest:
    """``n`` continuations of up to ``max_tokens`` tokens after ``prefix``.

    A row ends after its first stop token (:attr:`LanguageModel.stop_token_ids`,
    kept as its last token), after the first token whose text contains one of
    ``stop_after`` (kept: a clause end), or once its new text contains one of
    ``stop_strings`` (the tokens up to and including the one that completed it
    are kept; the caller cuts the text). Same request, same seed: same rows.
    """

    prefix: tuple[int, ...]
    n: int
    max_tokens: int
    temperature: float = 1.0
    """0: every row greedy."""
    top_k: int = 0
    """Sample from the k likeliest tokens; 0: the whole vocabulary."""
    seed: int = 0
    greedy_rows: int = 0
    """The first ``greedy_rows`` rows are decoded greedily (argmax), the rest sampled."""
    stop_after: tuple[str, ...] = ()
    stop_strings: tuple[str, ...] = ()
    grammar: Grammar | None = None
    response_start: int = 0
    """Where the response begins in ``prefix`` (for the grammar)."""
    reuse: bool = True
    """False: recompute from scratch, no cached prefix (the reference for reuse checks)."""


@dataclass
class Continuation:
    """One sampled continuation."""

    token_ids: list[int]
    """Tokens chosen, ending with the stop token when one was chosen."""
    logprobs: list[float]
    """Model log-probability (temperature 1, before any grammar mask) of each token."""


@dataclass
class WorkCounter:
    """Counts model work, so a benchmark can compare reuse on and off."""

    tokens_processed: int = 0
    """Token positions run through the model (cached positions are not counted)."""
    forward_calls: int = 0
    """Forward passes, or HTTP requests for a served model (a batch counts once)."""
    extra: dict[str, int] = field(default_factory=dict)
    """Backend-specific counters (e.g. a server's cached prompt tokens)."""


class LanguageModel(ABC):
    """What the RAIN search needs from a model.

    Implementations are thread-safe: concurrent searches share one instance.
    """

    name: str
    """Human-readable model name (id, path or served model name)."""
    context_window: int
    """Maximum sequence length (prompt + response) in tokens."""
    vocab_size: int
    stop_token_ids: frozenset[int]
    """End of text and turn boundaries: a continuation ends when one is chosen."""

    def __init__(self) -> None:
        self.work = WorkCounter()

    # --- text <-> tokens ---------------------------------------------------------------
    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with no special tokens added."""

    @abstractmethod
    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids``, special tokens dropped."""

    def encode_literal(self, text: str) -> list[int]:
        """Like :meth:`encode`, but special-token markup in ``text`` (``<|im_end|>``) is
        read as plain text, never as a special token: for untrusted text inside a prompt."""
        return self.encode(text)

    @abstractmethod
    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` in the model's chat format."""

    @property
    def has_chat_template(self) -> bool:
        return False

    # --- model calls (batched) ---------------------------------------------------------
    # ``cancel``: once set, the call starts no further model work (closing in-flight
    # requests, for a server) and raises :class:`~shared_core.errors.RainCancelled`.
    @abstractmethod
    def top_tokens(
        self, requests: Sequence[TopTokensRequest], *, cancel: threading.Event | None = None
    ) -> list[TopTokens]:
        """For each request, its ``k`` likeliest next tokens."""

    @abstractmethod
    def sample(
        self, requests: Sequence[SampleRequest], *, cancel: threading.Event | None = None
    ) -> list[list[Continuation]]:
        """For each request, its ``n`` continuations."""

    @abstractmethod
    def label_logprobs(
        self,
        prompts: Sequence[Sequence[int]],
        label_ids: Sequence[int],
        *,
        reuse: bool = True,
        cancel: threading.Event | None = None,
    ) -> list[list[float]]:
        """``[len(prompts)][len(label_ids)]``: log-prob of each label token as the next
        token after each prompt (exact; a backend that can only read top-k documents and
        tests what it returns for a label outside them, never a silent 0)."""

    # --- prefix reuse hints ------------------------------------------------------------
    def pin(self, token_ids: Sequence[int]) -> None:  # noqa: B027 - an optional hint
        """Hint: ``token_ids`` is a prefix of many coming calls; keep it computed.

        Pins are reference-counted; every ``pin`` needs one :meth:`unpin`.
        Backends that cache prefixes themselves (servers) may ignore the hint.
        """

    def unpin(self, token_ids: Sequence[int]) -> None:  # noqa: B027 - an optional hint
        """Release one :meth:`pin` of ``token_ids``."""

    def close(self) -> None:  # noqa: B027 - optional
        """Release connections or other resources."""
