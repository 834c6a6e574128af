"""A separate judge: another model scores the generator's responses.

RAIN's default is self-evaluation (the generating model judges its own text,
as in the paper). A separate judge lets a small, fast generator be steered by
a larger model that judges well -- typically a served one
(``RainEngine(..., judge="http://gpu-box:8000")``).

:class:`JudgeEvaluator` is the :class:`~shared_core.evaluation.SelfEvaluator`
run on the judge's backend (its rubric layouts, prompt caching, option-order
swap and label reads are the judge model's), with one change: the response
arrives as the generator's token ids, which mean nothing to another
tokenizer, so the session re-encodes the response *text* with the judge's
tokenizer (literally: special-token markup in it stays text).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from shared_core.errors import RainInputError
from shared_core.evaluation import EvalSession, Evaluator, Judgement, SelfEvaluator
from shared_core.models.protocol import LanguageModel
from shared_core.rubric import Rubric

__all__ = ["JudgeEvaluator", "as_evaluator"]


class JudgeEvaluator(Evaluator):
    """Judges with ``judge`` (another model) the responses ``generator`` writes.

    ``generator`` is only needed for the commit hint (decoding committed ids to
    text, so the judge's server keeps that prefix warm); without it, every
    score still works.
    """

    def __init__(
        self,
        judge: LanguageModel,
        *,
        generator: LanguageModel | None = None,
        rubric_cache_size: int = 8,
    ) -> None:
        if not isinstance(judge, LanguageModel):
            raise RainInputError(
                f"judge must be a LanguageModel (or use as_evaluator), got {type(judge).__name__}"
            )
        self.judge = judge
        self.generator = generator
        self._inner = SelfEvaluator(judge, rubric_cache_size=rubric_cache_size)

    def session(
        self,
        rubric: Rubric,
        prompt_text: str,
        *,
        reuse: bool = True,
        cancel: threading.Event | None = None,
    ) -> EvalSession:
        inner = self._inner.session(rubric, prompt_text, reuse=reuse, cancel=cancel)
        return _JudgeSession(inner, self.judge, self.generator)


class _JudgeSession(EvalSession):
    def __init__(
        self, inner: EvalSession, judge: LanguageModel, generator: LanguageModel | None
    ) -> None:
        self.inner = inner
        self.judge = judge
        self.generator = generator

    def _judge_ids(self, text: str) -> list[int]:
        return self.judge.encode_literal(text) if text else []

    def score(self, response_ids: Sequence[int], response_text: str) -> Judgement:
        j = self.inner.score(self._judge_ids(response_text), response_text)
        return Judgement(j.score, {**j.details, "judge": self.judge.name})

    def committed(self, response_ids: Sequence[int]) -> None:
        if self.generator is not None:
            self.inner.committed(self._judge_ids(self.generator.decode(response_ids)))

    def close(self) -> None:
        self.inner.close()


def as_evaluator(
    judge: Any,
    *,
    generator: LanguageModel | None = None,
    rubric_cache_size: int = 8,
    **server_kwargs: Any,
) -> Evaluator:
    """An :class:`Evaluator` from what a user may pass as ``judge=``.

    - an :class:`Evaluator`: used as is;
    - a :class:`LanguageModel`: a :class:`JudgeEvaluator` on it;
    - an object with a ``backend`` (a ``RainEngine``): its model judges;
    - a string: a served judge's base URL (``server_kwargs`` go to
      :class:`~shared_core.models.served.ServedModel`: ``model=``, ``api_key=``...).
    """
    if isinstance(judge, Evaluator):
        return judge
    if isinstance(judge, str):
        from shared_core.models.served import ServedModel

        judge = ServedModel(judge, **server_kwargs)
    elif server_kwargs:
        raise RainInputError(
            f"judge options {sorted(server_kwargs)} apply only to a served judge (a base URL)"
        )
    backend = getattr(judge, "backend", judge)
    if not isinstance(backend, LanguageModel):
        raise RainInputError(
            "judge= takes another RainEngine, a LanguageModel, an Evaluator or a served "
            f"model's base URL; got {type(judge).__name__}"
        )
    if generator is not None and backend is generator:
        return SelfEvaluator(backend, rubric_cache_size=rubric_cache_size)
    return JudgeEvaluator(backend, generator=generator, rubric_cache_size=rubric_cache_size)
