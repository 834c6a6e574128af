"""Scripted stand-ins for the model, the judge and the embedder.

In the style of mctx's bandit tests: every answer is known in advance, so a
test can state what the search must do and check it exactly.

- :class:`ScriptedLM` (from :mod:`shared_core.models.scripted`, re-exported here)
  is a character-level language model over a tiny vocab implementing the model
  protocol. Its next-token distribution is a plain function of the text so far;
  the usual one (:func:`choice_table`) puts weights on a few complete answers.
- :class:`ScriptedEvaluator` scores a response by a function of its text.
- :class:`ScriptedEmbedder` gives deterministic vectors (a character histogram
  by default, or a table).
- :data:`TINY_SEARCH` is the cheapest search that still expands, self-evaluates
  and commits, for tests that run a real model through an adapter.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from shared_core.config import RainConfig
from shared_core.embeddings import Embedder
from shared_core.evaluation import EvalSession, Evaluator, Judgement
from shared_core.models.scripted import (
    EOS,
    FLOOR,
    PROMPT_END,
    VOCAB,
    NextFn,
    ScriptedLM,
    choice_table,
)
from shared_core.request import RainRequest
from shared_core.rubric import Rubric, get_rubric
from shared_core.search import SearchContext, SearchInputs

__all__ = [
    "EOS",
    "FLOOR",
    "PROMPT_END",
    "TINY_SEARCH",
    "VOCAB",
    "NextFn",
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
    prompt_ids = lm.encode(lm.render_chat([{"role": "user", "content": prompt}]))
    inputs = SearchInputs(
        model=lm,
        session=evaluator.session(get_rubric("harmless"), prompt),
        config=config,
        embedder=embedder,
    )
    return SearchContext(inputs, RainRequest(lm, prompt_ids, config))
