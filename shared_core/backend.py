"""The narrow interface between the search and a language model.

The search needs two things from a model: next-token log-probabilities for a
batch of token sequences, and a batched decode loop that extends one prefix
into several continuations (token choice is the caller's, through ``pick``).
Everything else -- which prefixes are already computed, how they are batched --
is the backend's business. :class:`LanguageModel` implements the decode loop on
top of :meth:`LanguageModel.next_token_logprobs`, so a served backend only has
to provide that one method (and may override ``extend`` to stream natively).

This module is free of torch: the transformers implementation lives in
``shared_core.hf_backend``.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "Continuation",
    "LanguageModel",
    "Message",
    "PickFn",
    "WorkCounter",
]

Message = Mapping[str, Any]
"""A chat message: ``{"role": "user" | "assistant" | "system" | "tool", "content": str}``."""

PickFn = Callable[[np.ndarray, int, np.ndarray], np.ndarray]
"""``pick(logprobs [n, vocab], step, active [n] bool) -> tokens [n]``: the caller's choice.

Rows that are not ``active`` have finished; their log-probs are placeholders."""


@dataclass
class Continuation:
    """One extension of a prefix produced by :meth:`LanguageModel.extend`."""

    token_ids: list[int]
    """Tokens chosen, ending with the stop token when one was chosen."""
    logprobs: list[float]
    """Model log-probability (temperature 1) of each chosen token."""


@dataclass
class WorkCounter:
    """Counts model work, so a benchmark can compare reuse on and off."""

    tokens_processed: int = 0
    """Token positions run through the model (cached positions are not counted)."""
    forward_calls: int = 0
    """Forward passes (a batch counts once)."""


class LanguageModel(ABC):
    """What the RAIN search needs from a model.

    Implementations are thread-safe: concurrent searches share one instance,
    and model calls are serialised with :attr:`lock` where they must be.
    """

    name: str
    """Human-readable model name (id or path)."""
    context_window: int
    """Maximum sequence length (prompt + response) in tokens."""
    vocab_size: int
    """Width of the log-probability rows."""
    stop_token_ids: frozenset[int]
    """End of text and turn boundaries: generation ends when one is chosen."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
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

    def token_texts(self) -> list[str]:
        """Text of every token id alone (used for clause-end masks); cached."""
        cached: list[str] | None = getattr(self, "_token_texts", None)
        if cached is None:
            cached = [self.decode([i]) for i in range(self.vocab_size)]
            self._token_texts = cached
        return cached

    # --- model calls -------------------------------------------------------------------
    @abstractmethod
    def next_token_logprobs(
        self, sequences: Sequence[Sequence[int]], *, reuse: bool = True
    ) -> np.ndarray:
        """Log-probabilities of the next token after each sequence: ``[batch, vocab]``.

        ``reuse=False`` recomputes every sequence alone, from scratch: the
        reference the prefix-reuse path must agree with (an ablation switch).
        """

    def pin(self, token_ids: Sequence[int]) -> None:  # noqa: B027 - an optional hint
        """Hint: ``token_ids`` is a prefix of many coming calls; keep it computed.

        Pins are reference-counted; every ``pin`` needs one :meth:`unpin`.
        Backends without prefix reuse ignore the hint.
        """

    def unpin(self, token_ids: Sequence[int]) -> None:  # noqa: B027 - an optional hint
        """Release one :meth:`pin` of ``token_ids``."""

    def extend(
        self,
        prefix: Sequence[int],
        n: int,
        max_new_tokens: int,
        pick: PickFn,
        is_done: Callable[[list[int]], bool] | None = None,
        *,
        reuse: bool = True,
    ) -> list[Continuation]:
        """Extend ``prefix`` into ``n`` continuations in lockstep.

        Each step asks ``pick`` for one token per unfinished row. A row
        finishes when it picks a stop token, when ``is_done(row_tokens)`` is
        true, or after ``max_new_tokens`` tokens.
        """
        rows: list[list[int]] = [list(prefix) for _ in range(n)]

        def step(active: list[int], tokens: list[int] | None) -> np.ndarray:
            # Stateless: every step re-reads each whole sequence.
            if tokens is not None:
                for i, t in zip(active, tokens, strict=True):
                    rows[i].append(t)
            return self.next_token_logprobs([rows[i] for i in active], reuse=reuse)

        return _decode_loop(n, max_new_tokens, pick, is_done, step, self.stop_token_ids)


def _decode_loop(
    n: int,
    max_new_tokens: int,
    pick: PickFn,
    is_done: Callable[[list[int]], bool] | None,
    step: Callable[[list[int], list[int] | None], np.ndarray],
    stop_ids: frozenset[int],
) -> list[Continuation]:
    """The lockstep decode loop shared by every backend.

    ``step(active_rows, last_tokens)`` appends ``last_tokens`` to the active rows
    (``None`` on the first call) and returns their next-token log-probs. The
    active rows of a call are always a subset of those of the previous call.
    Keeping one loop guarantees that reuse on/off consumes randomness alike.
    """
    out = [Continuation([], []) for _ in range(n)]
    if max_new_tokens <= 0 or n == 0:
        return out
    active = list(range(n))
    logprobs = step(active, None)
    for t in range(max_new_tokens):
        # ``pick`` always sees the full batch shape so the random draws it makes
        # do not depend on how many rows happen to be finished.
        full = np.full((n, logprobs.shape[1]), -np.inf, dtype=np.float32)
        full[active] = logprobs
        live = np.zeros(n, dtype=bool)
        live[active] = True
        full[~live, 0] = 0.0
        chosen = pick(full, t, live)
        still: list[int] = []
        fed: list[int] = []
        for row_pos, i in enumerate(active):
            tok = int(chosen[i])
            out[i].token_ids.append(tok)
            out[i].logprobs.append(float(logprobs[row_pos, tok]))
            if tok in stop_ids or (is_done is not None and is_done(out[i].token_ids)):
                continue
            still.append(i)
            fed.append(tok)
        if not still or t == max_new_tokens - 1:
            break
        logprobs = step(still, fed)
        active = still
    return out
