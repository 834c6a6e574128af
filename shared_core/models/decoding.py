"""Sampling behind the protocol, for backends that compute log-probs in this process.

:func:`decode` is the lockstep decode loop of :meth:`LanguageModel.sample`
(top-k / temperature from the request's seed, greedy rows, stop tokens, clause
ends, stop strings, an output grammar) over any ``step`` function that returns
next-token log-probs for the rows still running. The transformers backend and
the scripted backend share it; a served backend does not need it (the server
samples). One loop for every backend and for reuse on and off means the same
request consumes the same random draws everywhere.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import numpy as np

from shared_core.errors import RainCancelled, RainError
from shared_core.models.protocol import Continuation, SampleRequest, TopTokens
from shared_core.sampling import pick_top_k, top_k_indices

__all__ = ["AllowedFn", "DelimiterMasks", "StepFn", "check_cancel", "decode", "top_tokens_of"]

StepFn = Callable[[list[int], list[int] | None], np.ndarray]
"""``step(active_rows, last_tokens) -> logprobs [len(active_rows), vocab]``.

Appends ``last_tokens`` to the active rows (``None`` on the first call) and
returns their next-token log-probs. The active rows of a call are always a
subset of those of the previous call (finished rows leave the batch)."""

AllowedFn = Callable[[Sequence[int]], "np.ndarray | None"]
"""``allowed(response_ids) -> [vocab] bool`` mask of the tokens a grammar allows next."""


def check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise RainCancelled("the RAIN search was cancelled by its caller")


def _masked(row: np.ndarray, allowed: AllowedFn | None, response: Sequence[int]) -> np.ndarray:
    if allowed is None:
        return row
    mask = allowed(response)
    if mask is None:
        return row
    if not mask.any():
        raise RainError("the output grammar allows no next token; check its JSON schema")
    return np.where(mask[: len(row)], row, -np.inf).astype(np.float32)


def top_tokens_of(
    row: np.ndarray, k: int, allowed: AllowedFn | None = None, response: Sequence[int] = ()
) -> TopTokens:
    """The ``k`` likeliest tokens of a ``[vocab]`` log-prob row that the grammar allows."""
    masked = _masked(row, allowed, response)
    ids = [int(t) for t in top_k_indices(masked, max(k, 1))[:k] if np.isfinite(masked[t])]
    return TopTokens(tuple(ids), tuple(float(row[t]) for t in ids))


class DelimiterMasks:
    """``[vocab]`` bool masks: the token's text contains one of some strings (cached)."""

    def __init__(self, token_texts: Callable[[], Sequence[str]]) -> None:
        self._token_texts = token_texts
        self._masks: dict[tuple[str, ...], np.ndarray] = {}
        self._lock = threading.Lock()

    def __call__(self, delimiters: tuple[str, ...]) -> np.ndarray:
        with self._lock:
            mask = self._masks.get(delimiters)
            if mask is None:
                texts = self._token_texts()
                mask = np.array([any(d in t for d in delimiters) for t in texts], dtype=bool)
                self._masks[delimiters] = mask
            return mask


def decode(
    request: SampleRequest,
    step: StepFn,
    *,
    stop_token_ids: frozenset[int],
    delimiter_masks: DelimiterMasks,
    text_of: Callable[[Sequence[int]], str],
    allowed: AllowedFn | None = None,
    cancel: threading.Event | None = None,
) -> list[Continuation]:
    """Run the lockstep decode loop of one :class:`SampleRequest`.

    ``cancel`` is checked before every step, so a cancel set during a forward
    pass stops the call when that pass returns.
    """
    n, limit = request.n, request.max_tokens
    out = [Continuation([], []) for _ in range(n)]
    if n <= 0 or limit <= 0:
        return out
    clause_end = delimiter_masks(request.stop_after) if request.stop_after else None
    rng = np.random.default_rng(request.seed)
    response = list(request.prefix[request.response_start :])
    active = list(range(n))
    check_cancel(cancel)
    logprobs = step(active, None)
    for t in range(limit):
        # One draw per row and step, finished or greedy rows too: the random
        # stream does not depend on when rows finish.
        draws = rng.random(n)
        still: list[int] = []
        fed: list[int] = []
        for pos, i in enumerate(active):
            row = logprobs[pos]
            cont = out[i]
            masked = _masked(row, allowed, response + cont.token_ids)
            if request.temperature == 0 or i < request.greedy_rows:
                tok = int(np.argmax(masked))
            else:
                tok = pick_top_k(masked, request.top_k, request.temperature, float(draws[i]))
            cont.token_ids.append(tok)
            cont.logprobs.append(float(row[tok]))
            if tok in stop_token_ids or (clause_end is not None and bool(clause_end[tok])):
                continue
            if request.stop_strings:
                text = text_of(cont.token_ids)
                if any(s in text for s in request.stop_strings):
                    continue
            still.append(i)
            fed.append(tok)
        if not still or t == limit - 1:
            break
        check_cancel(cancel)
        logprobs = step(still, fed)
        active = still
    return out
