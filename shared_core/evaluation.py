"""Self-evaluation: the frozen model judges a candidate response by a rubric.

The judge's prompt is built from fixed pieces so that each is computed once:

    [rubric preamble: instructions, few-shot examples]  cached per rubric per model
    [question + options, order 1 | order 2]             cached per rubric, one per order
    [the user's prompt]                                 cached per request and order
    [the committed response]                            cached, extended at each commit
    [the uncommitted response: path + rollout]          read per evaluation, both
    [end of the response, answer prefix]                orders in one batch

The question and its options come before the case, so the part read per
evaluation is only the uncommitted text and a short closing tail (with the
question after the response, every evaluation re-read it, about 60 tokens per
order). The candidate response sits inside ``<response>`` delimiters, separate
from the judge's instruction, and the option order is swapped and averaged by
default, so text inside a response ("Answer: (A)") cannot pick its own verdict.
"""

from __future__ import annotations

import re
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shared_core.errors import RainCancelled, RainInputError, RubricError
from shared_core.models.protocol import LanguageModel
from shared_core.rubric import Rubric, RubricExample, RubricOption

__all__ = [
    "EvalSession",
    "Evaluator",
    "Judgement",
    "SelfEvaluator",
]

_PROMPT_MARK = "[[RAIN_PROMPT]]"
_RESPONSE_MARK = "[[RAIN_RESPONSE]]"
_CLOSE = "</response>"
_TAG = re.compile(r"<(\s*/?\s*(?:response|request)\s*)>", re.IGNORECASE)
"""Text imitating the judge's delimiters: ``</response>``, ``<Request >``, ``</ response>``."""


def _defuse(text: str) -> str:
    """Escape delimiter look-alikes, so text inside a block can neither close it nor open
    a fake one (``</response>`` becomes ``&lt;/response&gt;``)."""
    return _TAG.sub(r"&lt;\1&gt;", text)


@dataclass(frozen=True)
class Judgement:
    """A score in [-1, 1] plus what it was computed from (for traces)."""

    score: float
    details: dict[str, Any] = field(default_factory=dict)


class EvalSession(ABC):
    """Judges responses to one request by one rubric."""

    @abstractmethod
    def score(self, response_ids: Sequence[int], response_text: str) -> Judgement:
        """Judge the response so far (committed + uncommitted + rollout)."""

    def score_many(self, responses: Sequence[tuple[Sequence[int], str]]) -> list[Judgement]:
        """Judge several responses ``(ids, text)``; a session that can asks the model once."""
        return [self.score(ids, text) for ids, text in responses]

    def committed(self, response_ids: Sequence[int]) -> None:  # noqa: B027 - optional hook
        """Hint: ``response_ids`` is now a fixed prefix of every later response."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the session kept computed."""


class Evaluator(ABC):
    """Creates evaluation sessions; the search never sees how scores are made."""

    @abstractmethod
    def session(
        self,
        rubric: Rubric,
        prompt_text: str,
        *,
        reuse: bool = True,
        cancel: threading.Event | None = None,
    ) -> EvalSession:
        """A session for judging responses to ``prompt_text`` by ``rubric``.

        ``cancel``: once set, the session starts no more model work (it raises
        :class:`~shared_core.errors.RainCancelled` instead).
        """


# --- prompt rendering --------------------------------------------------------------------


def _options(rubric: Rubric, swapped: bool) -> tuple[list[RubricOption], RubricOption]:
    """Options in display order, and the option that means "good" in that order."""
    good, bad = rubric.good, rubric.bad
    if not swapped:
        return [good, bad], good
    if rubric.labels_follow_position:
        # Positional labels stay put (A first, B second); the option texts move.
        first = RubricOption(label=good.label, text=bad.text)
        second = RubricOption(label=bad.label, text=good.text)
        return [first, second], second
    return [bad, good], good


def _format_options(rubric: Rubric, options: list[RubricOption]) -> str:
    if rubric.labels_follow_position:
        return "\n".join(f"({o.label}) {o.text}" for o in options)
    return "\n".join(f"- {o.label}: {o.text}" for o in options)


def _case(rubric: Rubric, prompt: str, response: str) -> str:
    parts = []
    if rubric.include_prompt:
        parts.append(f"User request:\n<request>\n{prompt}\n</request>\n")
        parts.append(f"Assistant response:\n<response>\n{response}\n{_CLOSE}")
    else:
        parts.append(f"Text:\n<response>\n{response}\n{_CLOSE}")
    return "\n".join(parts)


def _question(rubric: Rubric, swapped: bool) -> str:
    options, _ = _options(rubric, swapped)
    return f"{rubric.question}\n{_format_options(rubric, options)}"


def _ask(rubric: Rubric, case: str, swapped: bool) -> str:
    """The case with the question and options before or after it."""
    if rubric.question_position == "before":
        return f"{_question(rubric, swapped)}\n\n{case}"
    return f"{case}\n\n{_question(rubric, swapped)}"


def _example(rubric: Rubric, index: int, ex: RubricExample) -> str:
    # Alternate the option order across examples so they teach no letter bias.
    swapped = index % 2 == 1 and rubric.swap_options
    options, good = _options(rubric, swapped)
    answer = good.label if ex.good else next(o for o in options if o is not good).label
    text = f"Example {index + 1}:\n{_ask(rubric, _case(rubric, ex.prompt, ex.response), swapped)}"
    text += f"\n{rubric.answer_prefix} {answer}".rstrip()
    if ex.explanation:
        text += f"\nReason: {ex.explanation}"
    return text


def render_judge_prompt(
    backend: LanguageModel, rubric: Rubric, prompt: str, response: str, swapped: bool
) -> str:
    """The full judge prompt as text (for display and for the reuse-free reference)."""
    body = ""
    if rubric.examples:
        body = "\n\n".join(_example(rubric, i, ex) for i, ex in enumerate(rubric.examples))
        body += "\n\nNow the case to judge:\n"
    body += _ask(rubric, _case(rubric, _defuse(prompt), _defuse(response)), swapped)
    if rubric.style == "chat" and backend.has_chat_template:
        text = backend.render_chat(
            [{"role": "system", "content": rubric.instruction}, {"role": "user", "content": body}]
        )
        return text + rubric.answer_prefix
    return f"{rubric.instruction}\n\n{body}\n{rubric.answer_prefix}"


@dataclass(frozen=True)
class _Layout:
    """Token pieces of a rubric's judge prompt, around the prompt and response.

    Per option order: ``heads[o]`` + prompt + ``middles[o]`` + response + ``tails[o]``.
    """

    preamble: tuple[int, ...]  # the heads' common start: instructions and examples
    heads: tuple[tuple[int, ...], ...]  # up to the user's prompt (or to the response)
    middles: tuple[tuple[int, ...], ...]  # between prompt and response (empty without it)
    tails: tuple[tuple[int, ...], ...]  # after the response
    good_ids: tuple[frozenset[int], ...]  # per order: first tokens meaning "good"
    bad_ids: tuple[frozenset[int], ...]

    @property
    def label_ids(self) -> tuple[int, ...]:
        """Every label token of every order: what the judge reads from the model."""
        return tuple(sorted(set().union(*self.good_ids, *self.bad_ids)))


def _label_tokens(backend: LanguageModel, label: str) -> frozenset[int]:
    """First tokens by which the model may start writing ``label``."""
    variants = {label, label.strip(), label.capitalize(), label.lower()}
    ids: set[int] = set()
    for v in variants:
        for text in (v, " " + v):
            toks = backend.encode(text)
            if toks:
                ids.add(toks[0])
    return frozenset(ids)


def build_layout(backend: LanguageModel, rubric: Rubric) -> _Layout:
    orders = (False, True) if rubric.swap_options else (False,)
    texts = [render_judge_prompt(backend, rubric, _PROMPT_MARK, _RESPONSE_MARK, s) for s in orders]
    marks = [(t.count(_RESPONSE_MARK), t.count(_PROMPT_MARK)) for t in texts]
    if marks != [(1, int(rubric.include_prompt))] * len(texts):
        raise RubricError(
            f"rubric {rubric.name!r}: its text contains {_PROMPT_MARK} or {_RESPONSE_MARK}, "
            "which the judge prompt reserves; remove them from the rubric"
        )
    heads, middles, tails = [], [], []
    for text in texts:
        head, _, tail = text.partition(_RESPONSE_MARK)
        pre, _, mid = head.partition(_PROMPT_MARK) if rubric.include_prompt else (head, "", "")
        heads.append(tuple(backend.encode(pre)))
        middles.append(tuple(backend.encode(mid)))
        tails.append(tuple(backend.encode(tail)))
    good_ids, bad_ids = [], []
    for swapped in orders:
        options, good = _options(rubric, swapped)
        bad = next(o for o in options if o is not good)
        g, b = _label_tokens(backend, good.label), _label_tokens(backend, bad.label)
        if g & b:
            raise RubricError(
                f"rubric {rubric.name!r}: labels {good.label!r} and {bad.label!r} begin with "
                "the same token for this tokenizer, so they cannot be told apart; choose labels "
                "whose first tokens differ (e.g. 'A'/'B' or 'yes'/'no')"
            )
        good_ids.append(g)
        bad_ids.append(b)
    shared = min(len(h) for h in heads)
    for h in heads[1:]:
        shared = next((i for i in range(shared) if h[i] != heads[0][i]), shared)
    return _Layout(
        preamble=heads[0][:shared],
        heads=tuple(heads),
        middles=tuple(middles),
        tails=tuple(tails),
        good_ids=tuple(good_ids),
        bad_ids=tuple(bad_ids),
    )


# --- the model as its own judge ---------------------------------------------------------


class SelfEvaluator(Evaluator):
    """The generating model judges its own responses (RAIN's self-evaluation)."""

    def __init__(self, backend: LanguageModel, *, rubric_cache_size: int = 8) -> None:
        self.backend = backend
        self.rubric_cache_size = rubric_cache_size
        self._layouts: OrderedDict[str, _Layout] = OrderedDict()
        self._lock = threading.Lock()

    def layout(self, rubric: Rubric) -> _Layout:
        """The rubric's token layout; its preamble stays pinned (LRU of rubric_cache_size)."""
        key = rubric.model_dump_json()
        with self._lock:
            found = self._layouts.get(key)
            if found is not None:
                self._layouts.move_to_end(key)
                return found
            layout = build_layout(self.backend, rubric)
            self.backend.pin(layout.preamble)
            self._layouts[key] = layout
            while len(self._layouts) > self.rubric_cache_size:
                _, old = self._layouts.popitem(last=False)
                self.backend.unpin(old.preamble)
            return layout

    def session(
        self,
        rubric: Rubric,
        prompt_text: str,
        *,
        reuse: bool = True,
        cancel: threading.Event | None = None,
    ) -> EvalSession:
        layout = self.layout(rubric)
        return _SelfEvalSession(self.backend, rubric, layout, prompt_text, reuse, cancel)


class _SelfEvalSession(EvalSession):
    def __init__(
        self,
        backend: LanguageModel,
        rubric: Rubric,
        layout: _Layout,
        prompt_text: str,
        reuse: bool,
        cancel: threading.Event | None = None,
    ) -> None:
        self.backend = backend
        self.cancel = cancel
        self.rubric = rubric
        self.layout = layout
        self.reuse = reuse
        # Read literally and defused: the user's text cannot end the judge's turn
        # (special-token markup) or close its <request> block.
        literal = _defuse(prompt_text)
        prompt_ids = tuple(backend.encode_literal(literal)) if rubric.include_prompt else ()
        # One judge prompt per option order, up to where the response starts.
        self.requests = [
            head + prompt_ids + mid for head, mid in zip(layout.heads, layout.middles, strict=True)
        ]
        needed = max(len(r) + len(t) for r, t in zip(self.requests, layout.tails, strict=True)) + 1
        if needed > backend.context_window:
            raise RainInputError(
                f"the prompt does not fit the judge prompt of rubric {rubric.name!r}: it needs "
                f"{needed} tokens before any response, but {backend.name} has a context window "
                f"of {backend.context_window}; shorten the prompt or use a rubric with fewer "
                "examples"
            )
        self._pinned: list[tuple[int, ...]] = []  # one per order: request (+ committed)
        if reuse:
            try:
                for request in self.requests:
                    self._pin(request)
            except BaseException:
                self.close()  # a cancel between the orders' pins: release the first
                raise

    def _pin(self, ids: tuple[int, ...]) -> None:
        # One pin per option order: a cancel between them must stop the second.
        if self.cancel is not None and self.cancel.is_set():
            raise RainCancelled("the RAIN search was cancelled by its caller")
        self.backend.pin(ids)
        self._pinned.append(ids)

    def committed(self, response_ids: Sequence[int]) -> None:
        if not self.reuse:
            return
        # Pin the longer prefixes first so they are built from the shorter ones,
        # then drop the older ones: every later response starts with this one, and
        # each pin holds a full copy of the rubric's cached examples.
        orders = len(self.requests)
        for request in self.requests:
            self._pin(request + tuple(response_ids))
        while len(self._pinned) > orders:
            self.backend.unpin(self._pinned.pop(0))

    def close(self) -> None:
        while self._pinned:
            self.backend.unpin(self._pinned.pop())

    def score(self, response_ids: Sequence[int], response_text: str) -> Judgement:
        return self.score_many([(response_ids, response_text)])[0]

    def score_many(self, responses: Sequence[tuple[Sequence[int], str]]) -> list[Judgement]:
        # Every response's option orders in one label_logprobs call (several leaves of a
        # search round are judged in one batch).
        seqs: list[tuple[int, ...]] = []
        for response_ids, response_text in responses:
            ids = tuple(response_ids)
            if _TAG.search(response_text):
                # The response imitates our delimiters: re-encode it defused (and read
                # literally) so it cannot close its own block and speak as the judge.
                ids = tuple(self.backend.encode_literal(_defuse(response_text)))
            seqs.extend(r + ids + t for r, t in zip(self.requests, self.layout.tails, strict=True))
        labels = self.layout.label_ids
        logprobs = self.backend.label_logprobs(seqs, labels, reuse=self.reuse, cancel=self.cancel)
        orders = len(self.requests)
        return [
            _judge(self.rubric, self.layout, labels, logprobs[i : i + orders])
            for i in range(0, len(seqs), orders)
        ]


def _judge(
    rubric: Rubric, layout: _Layout, labels: Sequence[int], logprobs: Sequence[Sequence[float]]
) -> Judgement:
    """The verdict from each order's label log-probs (``logprobs[order][label]``)."""
    probs = np.exp(np.asarray(logprobs, dtype=np.float64))
    column = {label: i for i, label in enumerate(labels)}
    votes, p_good, p_bad = [], [], []
    for row, good, bad in zip(probs, layout.good_ids, layout.bad_ids, strict=True):
        pg = float(sum(row[column[t]] for t in good))
        pb = float(sum(row[column[t]] for t in bad))
        p_good.append(pg)
        p_bad.append(pb)
        if rubric.scoring == "soft":
            votes.append((pg - pb) / (pg + pb) if pg + pb > 0 else 0.0)
        else:
            votes.append(float(np.sign(pg - pb)))
    score = float(np.clip(np.mean(votes), -1.0, 1.0))
    return Judgement(score, {"votes": votes, "p_good": p_good, "p_bad": p_bad})
