"""Scripted stand-ins for the model, the judge and the embedder.

In the style of mctx's bandit tests: every answer is known in advance, so a
test can state what the search must do and check it exactly.

- :class:`ScriptedLM` is a character-level language model over a tiny vocab.
  Its next-token distribution is a plain function of the text so far; the
  usual one (:func:`choice_table`) puts weights on a few complete answers, so
  "the model prefers 'bad.' 70/30 over 'good.'" is one line of test set-up.
- :class:`ScriptedEvaluator` scores a response by a function of its text.
- :class:`ScriptedEmbedder` gives deterministic vectors (a character histogram
  by default, or a table).
- :data:`TINY_SEARCH` is the cheapest search that still expands, self-evaluates
  and commits, for tests that run a real model through an adapter.
"""

from __future__ import annotations

import math
import string
import threading
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from shared_core.backend import LanguageModel, Message
from shared_core.config import RainConfig
from shared_core.embeddings import Embedder
from shared_core.evaluation import EvalSession, Evaluator, Judgement
from shared_core.rubric import Rubric, get_rubric
from shared_core.search import SearchContext

__all__ = [
    "EOS",
    "FLOOR",
    "PROMPT_END",
    "TINY_SEARCH",
    "VOCAB",
    "ScriptedEmbedder",
    "ScriptedEvaluator",
    "ScriptedLM",
    "ScriptedSession",
    "choice_table",
    "make_context",
]

TINY_SEARCH = {
    "num_candidates": 2,
    "T": 1,
    "min_new_iterations": 1,
    "T_m": 1,
    "token_set_lengths": (4,),
    "simulation_max_tokens": 4,
    "similarity_update": False,
    "dynamic_addition": False,
}
"""RainConfig settings of the cheapest search that still expands, judges and commits."""

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

    ``calls`` records every batch it was asked for, so tests can count work.
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
        self.calls: list[list[list[int]]] = []

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

    def distribution(self, token_ids: Sequence[int]) -> np.ndarray:
        """The scripted next-token probabilities after ``token_ids``: ``[vocab]``."""
        weights = self.next_fn(self.decode(token_ids))
        probs = np.full(self.vocab_size, FLOOR, dtype=np.float64)
        total = sum(weights.values())
        for tok, w in weights.items():
            probs[self._index[tok]] += (1.0 - FLOOR * self.vocab_size) * w / total
        return probs / probs.sum()

    def next_token_logprobs(
        self, sequences: Sequence[Sequence[int]], *, reuse: bool = True
    ) -> np.ndarray:
        self.calls.append([list(s) for s in sequences])
        self.work.forward_calls += 1
        self.work.tokens_processed += sum(len(s) for s in sequences)
        return np.log(np.stack([self.distribution(s) for s in sequences])).astype(np.float32)


class ScriptedSession(EvalSession):
    """Scores ``score_fn(response_text)``; remembers every text it judged."""

    def __init__(self, owner: ScriptedEvaluator, rubric: Rubric, prompt_text: str) -> None:
        self.owner = owner
        self.rubric = rubric
        self.prompt_text = prompt_text

    def score(self, response_ids: Sequence[int], response_text: str) -> Judgement:
        self.owner.judged.append(response_text)
        s = float(self.owner.score_fn(response_text))
        if not -1.0 <= s <= 1.0 or math.isnan(s):
            raise ValueError(f"scripted score {s} is outside [-1, 1]")
        return Judgement(s, {"scripted": True})


class ScriptedEvaluator(Evaluator):
    """A judge whose verdict is a known function of the response text."""

    def __init__(self, score_fn: Callable[[str], float]) -> None:
        self.score_fn = score_fn
        self.judged: list[str] = []
        self.sessions: list[ScriptedSession] = []

    def session(
        self,
        rubric: Rubric,
        prompt_text: str,
        *,
        reuse: bool = True,
        cancel: threading.Event | None = None,
    ) -> EvalSession:
        session = ScriptedSession(self, rubric, prompt_text)
        self.sessions.append(session)
        return session


class ScriptedEmbedder(Embedder):
    """Deterministic unit vectors: a character histogram, or looked up in ``table``.

    ``table`` maps a text to a vector (normalised here); texts missing from it
    fall back to the histogram over :data:`VOCAB`.
    """

    def __init__(self, table: Mapping[str, Sequence[float]] | None = None) -> None:
        self.table = {k: np.asarray(v, dtype=np.float32) for k, v in (table or {}).items()}
        self.calls: list[list[str]] = []
        dims = {len(v) for v in self.table.values()}
        self.dim = dims.pop() if len(dims) == 1 else len(VOCAB)
        self._index = {tok: i for i, tok in enumerate(VOCAB)}

    def _vector(self, text: str) -> np.ndarray:
        if text in self.table:
            vec = self.table[text].copy()
        else:
            vec = np.zeros(self.dim, dtype=np.float32)
            for ch in text:
                vec[self._index.get(ch, 0) % self.dim] += 1.0
            if not text:
                vec[0] = 1.0
        norm = float(np.linalg.norm(vec))
        return vec / norm if norm > 0 else vec

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._vector(t) for t in texts]).astype(np.float32)


def make_context(
    lm: ScriptedLM,
    evaluator: Evaluator,
    config: RainConfig,
    *,
    prompt: str = "hi",
    embedder: Embedder | None = None,
) -> SearchContext:
    """A search context over the scripted model, as the engine would build it."""
    mask = np.array([any(d in t for d in config.clause_delimiters) for t in lm.token_texts()])
    prompt_ids = lm.encode(lm.render_chat([{"role": "user", "content": prompt}]))
    return SearchContext(
        backend=lm,
        session=evaluator.session(get_rubric("harmless"), prompt),
        config=config,
        prompt_ids=prompt_ids,
        embedder=embedder,
        delimiter_mask=mask,
    )
