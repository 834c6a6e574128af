"""A scripted language model: the protocol in plain Python, no torch, answers known in advance.

In the style of mctx's bandit tests: :class:`ScriptedLM` is a character-level
model over a tiny vocabulary whose next-token distribution is a plain function
of the text so far. The usual one (:func:`choice_table`) puts weights on a few
complete answers, so "the model prefers 'bad.' 70/30 over 'good.'" is one line
of set-up. It implements the whole :class:`~shared_core.models.protocol.LanguageModel`
protocol (sampling through the same decode loop as the transformers backend),
so the engine, the judge and both adapters run on it end to end, in tests and
wherever torch is not installed.
"""

from __future__ import annotations

import string
import threading
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from shared_core.errors import RainInputError
from shared_core.models.decoding import DelimiterMasks, check_cancel, decode, top_tokens_of
from shared_core.models.protocol import (
    Continuation,
    LanguageModel,
    Message,
    SampleRequest,
    TopTokens,
    TopTokensRequest,
)

__all__ = ["EOS", "FLOOR", "PROMPT_END", "VOCAB", "NextFn", "ScriptedLM", "choice_table"]

EOS = "<eos>"
"""The end-of-text token (id 0); the only stop token."""
PROMPT_END = ">"
"""``render_chat`` ends the prompt with this character; the answer follows it."""
VOCAB: tuple[str, ...] = (
    EOS,
    *(string.ascii_letters + string.digits + string.punctuation + " \n"),
    *(" " + ch for ch in string.ascii_letters),
)
"""Token id i is VOCAB[i]: one character per token, EOS first, plus a space fused
with the letter after it (" A", " yes" starts with " y"), as real BPE vocabularies do,
so that "A" and " A" are different tokens."""
FLOOR = 1e-6
"""Probability every token keeps, so log-probs stay finite and top-k is well defined."""


def _first_token(text: str) -> str:
    """The token the scripted tokenizer reads first from ``text``."""
    if len(text) >= 2 and text[0] == " " and text[1] in string.ascii_letters:
        return text[:2]
    return text[0]


NextFn = Callable[[str], Mapping[str, float]]
"""``next_fn(context_text) -> {token_text: weight}`` (renormalised; EOS by name)."""


def choice_table(answers: Mapping[str, float], *, after: str = PROMPT_END) -> NextFn:
    """A model that writes one of ``answers`` (weights) after the last ``after``.

    The next character is drawn in proportion to the weights of the answers
    that agree with the text written so far; a finished answer is followed by
    EOS, and text that matches no answer is followed by EOS too.
    """

    def next_fn(context: str) -> Mapping[str, float]:
        written = context.rsplit(after, 1)[-1]
        dist: dict[str, float] = {}
        for answer, weight in answers.items():
            if not answer.startswith(written):
                continue
            nxt = _first_token(answer[len(written) :]) if len(answer) > len(written) else EOS
            dist[nxt] = dist.get(nxt, 0.0) + weight
        return dist or {EOS: 1.0}

    return next_fn


class ScriptedLM(LanguageModel):
    """A character-level language model whose next-token distribution is scripted.

    ``calls`` records the sequences of every model pass (a batch, or one decode
    step), so tests can count work; pins are reference-counted but compute
    nothing (:meth:`pinned_prefixes` shows them, for leak checks).
    """

    def __init__(
        self, next_fn: NextFn, *, context_window: int = 4096, name: str = "scripted-lm"
    ) -> None:
        super().__init__()
        self.next_fn = next_fn
        self.name = name
        self.context_window = context_window
        self.vocab_size = len(VOCAB)
        self.stop_token_ids = frozenset({0})
        self._index = {tok: i for i, tok in enumerate(VOCAB)}
        self._masks = DelimiterMasks(self.token_texts)
        self._pins: dict[tuple[int, ...], int] = {}
        self._lock = threading.Lock()  # guards the counters and pins, not the model
        self.calls: list[list[list[int]]] = []

    # --- text <-> tokens ---------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        unknown = sorted({ch for ch in text if ch not in self._index})
        if unknown:
            raise ValueError(f"ScriptedLM cannot encode {unknown!r}")
        ids, i = [], 0
        while i < len(text):
            tok = _first_token(text[i:])
            ids.append(self._index[tok])
            i += len(tok)
        return ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(VOCAB[t] for t in token_ids if t != 0)

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        text = "".join(f"[{m['role']}]{m['content']}\n" for m in messages)
        return text + PROMPT_END if add_generation_prompt else text

    def token_texts(self) -> list[str]:
        """Text of every token id alone (EOS reads as empty, as ``decode`` gives it)."""
        return ["", *VOCAB[1:]]

    # --- the scripted model -------------------------------------------------------------
    def distribution(self, token_ids: Sequence[int]) -> np.ndarray:
        """The scripted next-token probabilities after ``token_ids``: ``[vocab]``."""
        weights = self.next_fn(self.decode(token_ids))
        probs = np.full(self.vocab_size, FLOOR, dtype=np.float64)
        total = sum(weights.values())
        for tok, w in weights.items():
            probs[self._index[tok]] += (1.0 - FLOOR * self.vocab_size) * w / total
        return probs / probs.sum()

    def next_token_logprobs(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """One model pass: log-probs of the next token after each sequence, ``[batch, vocab]``."""
        for seq in sequences:
            if not seq:
                raise RainInputError("the scripted model needs non-empty token sequences")
            if len(seq) > self.context_window:
                raise RainInputError(
                    f"the sequence needs {len(seq)} tokens but {self.name} has a context "
                    f"window of {self.context_window}; shorten the prompt"
                )
        with self._lock:
            self.calls.append([list(s) for s in sequences])
            self.work.forward_calls += 1
            self.work.tokens_processed += sum(len(s) for s in sequences)
        return np.log(np.stack([self.distribution(s) for s in sequences])).astype(np.float32)

    def _no_grammar(self, grammar: object) -> None:
        if grammar is not None:
            raise RainInputError(
                "the scripted model cannot follow an output grammar (structured output or a "
                "required tool call); use a transformers or served backend for that"
            )

    # --- the protocol --------------------------------------------------------------------
    def top_tokens(
        self, requests: Sequence[TopTokensRequest], *, cancel: threading.Event | None = None
    ) -> list[TopTokens]:
        if not requests:
            return []
        for req in requests:
            self._no_grammar(req.grammar)
        check_cancel(cancel)
        rows = self.next_token_logprobs([r.prefix for r in requests])
        return [top_tokens_of(row, r.k) for row, r in zip(rows, requests, strict=True)]

    def sample(
        self, requests: Sequence[SampleRequest], *, cancel: threading.Event | None = None
    ) -> list[list[Continuation]]:
        out = []
        for req in requests:
            self._no_grammar(req.grammar)
            rows = [list(req.prefix) for _ in range(req.n)]

            def step(active: list[int], tokens: list[int] | None, rows: list = rows) -> np.ndarray:
                # Stateless: every step re-reads each whole sequence.
                if tokens is not None:
                    for i, t in zip(active, tokens, strict=True):
                        rows[i].append(t)
                return self.next_token_logprobs([rows[i] for i in active])

            out.append(
                decode(
                    req,
                    step,
                    stop_token_ids=self.stop_token_ids,
                    delimiter_masks=self._masks,
                    text_of=self.decode,
                    cancel=cancel,
                )
            )
        return out

    def label_logprobs(
        self,
        prompts: Sequence[Sequence[int]],
        label_ids: Sequence[int],
        *,
        reuse: bool = True,
        cancel: threading.Event | None = None,
    ) -> list[list[float]]:
        if not prompts:
            return []
        check_cancel(cancel)
        rows = self.next_token_logprobs(prompts)
        ids = list(label_ids)
        return [[float(v) for v in row[ids]] for row in rows]

    # --- pins (no cache: counted, so tests can check they are released) ------------------
    def pin(self, token_ids: Sequence[int]) -> None:
        key = tuple(int(t) for t in token_ids)
        if key:
            with self._lock:
                self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, token_ids: Sequence[int]) -> None:
        key = tuple(int(t) for t in token_ids)
        with self._lock:
            left = self._pins.get(key, 0) - 1
            if left > 0:
                self._pins[key] = left
            else:
                self._pins.pop(key, None)

    def pinned_prefixes(self) -> list[tuple[int, ...]]:
        """Token ids of the prefixes currently pinned (for leak checks)."""
        with self._lock:
            return list(self._pins)
