"""ChatRain: RAIN as a LangChain chat model.

The adapter is thin: it translates LangChain messages, options, tools and
callbacks, and hands the search to :class:`shared_core.RainEngine`. One private
iterator (:meth:`ChatRain._iter_items`) feeds ``_stream``, ``_generate`` and
their async twins, which run it in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManager,
    AsyncCallbackManagerForLLMRun,
    CallbackManager,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.chat_models import generate_from_stream
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig, ensure_config
from langchain_core.tools import BaseTool
from langchain_core.utils.uuid import uuid7
from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from langchain_rain._tools import parse_tool_calls, resolve_tools
from shared_core import (
    RainConfig,
    RainEngine,
    RainInputError,
    RainResult,
    build_config,
    get_rubric,
    load_engine,
)
from shared_core.models.protocol import Grammar
from shared_core.rubric import Rubric
from shared_core.tools import TextGate, ToolSet, format_call

__all__ = ["ChatRain"]

_DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_RAIN_FIELDS = frozenset(RainConfig.model_fields)
# LangChain names mapped onto RainConfig fields.
_LC_TO_RAIN = {"max_tokens": "max_new_tokens", "timeout": "max_time_s"}
_CONFIGURABLE_KEYS = frozenset(
    {"rubric", "rain_config", "include_trace", *_LC_TO_RAIN, *_RAIN_FIELDS}
)
# Call keywords LangChain itself adds (tracing/structured output); not RAIN's business.
_LC_INTERNAL = frozenset({"ls_structured_output_format", "stream"})
_EVENT_NAMES = {"commit": "rain_commit", "rewind": "rain_rewind"}
# The config (with its run id) of the model call in progress, for custom events.
_RUN: ContextVar[RunnableConfig | None] = ContextVar("chat_rain_run", default=None)


# --- messages ------------------------------------------------------------------------------
def _content_text(content: str | list[Any], index: int) -> str:
    """The text of a message's content; non-text blocks are rejected."""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, Mapping) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
        elif isinstance(block, Mapping) and block.get("type") in ("tool_call", "tool_use"):
            continue  # rendered from AIMessage.tool_calls instead
        else:
            kind = block.get("type") if isinstance(block, Mapping) else type(block).__name__
            raise RainInputError(
                f"message {index} holds a content block of type {kind!r}; ChatRain handles "
                "text only: pass a string or {'type': 'text', 'text': ...} blocks"
            )
    return "".join(parts)


def _to_engine_messages(
    messages: Sequence[BaseMessage], tools: ToolSet | None, tool_role: bool = True
) -> list[dict[str, str]]:
    """LangChain messages as the engine's role/content dicts (tools in the system prompt)."""
    if not messages:
        raise RainInputError(
            "no messages were given; pass a prompt string or a list of messages "
            "like [HumanMessage('Hello')]"
        )
    out: list[dict[str, str]] = []
    for i, msg in enumerate(messages):
        text = _content_text(msg.content, i)
        if isinstance(msg, SystemMessage):
            role = "system"
        elif isinstance(msg, HumanMessage):
            role = "user"
        elif isinstance(msg, AIMessage):
            role = "assistant"
            calls = [format_call(c["name"], c["args"]) for c in msg.tool_calls]
            text = "\n".join(p for p in [text, *calls] if p)
        elif isinstance(msg, ToolMessage) and not tool_role:
            # A template that knows no tool role (SmolLM2's) would show the model a
            # turn kind it never saw; a labelled user turn is what it can read.
            role = "user"
            text = f"Result of {msg.name or 'the tool'}: {text}"
        elif isinstance(msg, ToolMessage):
            role = "tool"
        elif isinstance(msg, ChatMessage) and msg.role in ("system", "user", "assistant", "tool"):
            role = msg.role
        else:
            raise RainInputError(
                f"message {i} is a {type(msg).__name__} (role {getattr(msg, 'role', msg.type)!r}); "
                "ChatRain accepts system, human, AI and tool messages"
            )
        out.append({"role": role, "content": text})
    # SmolLM2's chat template (like many small models') has no tool slot, and the
    # engine takes plain messages, so tools are described in the system prompt.
    return out if tools is None else tools.with_system_prompt(out)


def _knows_tool_role(engine: RainEngine) -> bool:
    """Whether the model's chat template mentions a ``tool`` role."""
    template = getattr(getattr(engine.backend, "tokenizer", None), "chat_template", None)
    return isinstance(template, str) and "tool" in template


def _from_configurable(config: RunnableConfig) -> dict[str, Any]:
    """RAIN options found in ``config["configurable"]`` (other keys belong to others)."""
    configurable = config.get("configurable") or {}
    return {k: v for k, v in configurable.items() if k in _CONFIGURABLE_KEYS}


# --- one call --------------------------------------------------------------------------
@dataclass
class _Event:
    """A search event (commit/rewind) to dispatch as a LangChain custom event."""

    name: str
    data: dict[str, Any]


@dataclass
class _CallPlan:
    messages: list[dict[str, str]]
    rubric: Rubric
    config: RainConfig
    tools: ToolSet | None
    grammar: Grammar | None
    include_trace: bool


_TextGate = TextGate  # the gate's name in tests/test_langchain_chat.py


class ChatRain(BaseChatModel):
    """A chat model that answers with RAIN: a frozen LLM aligned by self-evaluated search.

    Build it from a model id or path (``ChatRain(model="path")``), an existing
    engine (``ChatRain(engine=...)``), a loaded transformers model and tokenizer
    (:meth:`from_transformers`) or the embedded SmolLM2 (:meth:`from_default`).
    Weights load on first use, once per process and model.

    Choose the rubric (and any RainConfig setting) per call with
    ``config={"configurable": {"rubric": "positive", "T": 8}}``, a call keyword
    (``invoke(msgs, rubric=...)``), ``.bind(rubric=...)``, or as the default
    ``ChatRain(rubric=...)``. Per-call ``configurable`` wins over keywords.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    model: str | None = None
    """Model id or local path; ``None``: the embedded SmolLM2-135M-Instruct."""
    gguf_file: str | None = None
    """GGUF file inside ``model`` to load, if the weights come as GGUF."""
    engine: RainEngine | None = Field(default=None, exclude=True)
    """An existing engine to use instead of loading ``model``."""
    rubric: str | Rubric | dict[str, Any] | None = None
    """Default rubric (preset name, Rubric or dict); ``None``: the engine's default."""
    rain_config: RainConfig | dict[str, Any] | None = None
    """Default search settings (a RainConfig, or a dict that may hold ``preset='fast'``)."""
    max_tokens: int | None = None
    """Maximum answer tokens (RainConfig.max_new_tokens)."""
    temperature: float | None = None
    """RainConfig.temperature; RAIN's search samples candidates at its own temperatures."""
    seed: int | None = None
    """Seed of the search's random draws (same seed, same answer)."""
    stop: list[str] | None = None
    """Stop sequences: the answer ends before the first one."""
    timeout: float | None = None
    """Wall-clock budget per call in seconds; when spent the search finishes greedily."""
    streaming: bool = False
    """Use the streaming path in ``invoke`` (callbacks see each committed token set)."""
    include_trace: bool = True
    """Put the per-commit search trace in ``response_metadata["rain_trace"]``."""

    _loaded: RainEngine | None = PrivateAttr(default=None)
    _load_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @model_validator(mode="after")
    def _check(self) -> ChatRain:
        # Cheap checks only: construction must not load weights.
        if self.rubric is not None:
            get_rubric(self.rubric)
        if isinstance(self.rain_config, dict):
            build_config(dict(self.rain_config))
        if self.engine is not None and self.model is not None:
            raise RainInputError("pass either model= or engine=, not both")
        return self

    # --- construction ------------------------------------------------------------------
    @classmethod
    def from_default(cls, **kwargs: Any) -> ChatRain:
        """The embedded SmolLM2-135M-Instruct (shared, loaded on first use)."""
        return cls(**kwargs)

    @classmethod
    def from_transformers(cls, model: Any, tokenizer: Any, **kwargs: Any) -> ChatRain:
        """A loaded transformers causal LM and its tokenizer."""
        return cls(engine=RainEngine(model=model, tokenizer=tokenizer), **kwargs)

    @property
    def rain_engine(self) -> RainEngine:
        """The engine; loaded (once per process and model) on first use."""
        if self.engine is not None:
            return self.engine
        with self._load_lock:
            if self._loaded is None:
                self._loaded = load_engine(self.model, self.gguf_file)
            return self._loaded

    # --- facts ---------------------------------------------------------------------------
    @property
    def _llm_type(self) -> str:
        return "rain"

    @property
    def model_name(self) -> str:
        if self.engine is not None:
            return self.engine.model_name
        return self.model or _DEFAULT_MODEL_NAME

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "rubric": _rubric_label(self.rubric)}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "rain"
        params["ls_model_name"] = kwargs.get("model") or self.model_name
        params["ls_model_type"] = "chat"
        temperature = kwargs.get("temperature", self.temperature)
        if temperature is not None:
            params["ls_temperature"] = temperature
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids from the model's own tokenizer (no download)."""
        return self.rain_engine.backend.encode(text)

    def get_num_tokens_from_messages(
        self,
        messages: list[BaseMessage],
        tools: Sequence[Any] | None = None,
    ) -> int:
        """Tokens of the messages as the chat template renders them (with the tools)."""
        engine = self.rain_engine
        msgs = _to_engine_messages(messages, resolve_tools(tools, None), _knows_tool_role(engine))
        backend = engine.backend
        return len(backend.encode(backend.render_chat(msgs, add_generation_prompt=False)))

    # --- per-call options from RunnableConfig -------------------------------------------
    # LangChain never hands ``configurable`` to ``_generate``; the public entry points
    # read it and pass the RAIN options on as call keywords (this also covers batch,
    # which calls invoke, and chains/bindings, which call these with their config).
    # They also fix the run id of this model call, so that search events can be
    # attributed to it as custom events even without a parent run.
    def invoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        with _model_run(config, kwargs) as (config, kwargs):
            return super().invoke(input, config, stop=stop, **kwargs)

    async def ainvoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        with _model_run(config, kwargs) as (config, kwargs):
            return await super().ainvoke(input, config, stop=stop, **kwargs)

    def stream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> Iterator[AIMessageChunk]:
        with _model_run(config, kwargs) as (config, kwargs):
            yield from super().stream(input, config, stop=stop, **kwargs)

    async def astream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[AIMessageChunk]:
        with _model_run(config, kwargs) as (config, kwargs):
            async for chunk in super().astream(input, config, stop=stop, **kwargs):
                yield chunk

    def stream_events(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        # v1/v2 reach ``stream``/``astream`` above; v3 calls the model directly.
        config = ensure_config(config)
        return super().stream_events(input, config, **{**kwargs, **_from_configurable(config)})

    def astream_events(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Any:
        config = ensure_config(config)
        return super().astream_events(input, config, **{**kwargs, **_from_configurable(config)})

    # --- tools and structured output ------------------------------------------------------
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | dict[str, Any] | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools; a required ``tool_choice`` constrains the answer to a valid call."""
        resolve_tools(tools, tool_choice)  # fail here, not at the first call
        return self.bind(tools=list(tools), tool_choice=tool_choice, **kwargs)

    # --- the one path ---------------------------------------------------------------------
    def _plan(
        self, messages: list[BaseMessage], stop: list[str] | None, **kwargs: Any
    ) -> _CallPlan:
        kwargs = {k: v for k, v in kwargs.items() if k not in _LC_INTERNAL}
        tools = resolve_tools(kwargs.pop("tools", None), kwargs.pop("tool_choice", None))
        other = kwargs.pop("model", None)  # a per-call model: loaded once, then shared
        engine = load_engine(other, kwargs.pop("gguf_file", None)) if other else self.rain_engine
        rubric = engine.resolve_rubric(kwargs.pop("rubric", self.rubric))
        include_trace = bool(kwargs.pop("include_trace", self.include_trace))
        # Precedence: instance rain_config < instance fields (max_tokens, ...) < call
        # rain_config < call keywords and configurable settings.
        instance = {
            _LC_TO_RAIN.get(name, name): getattr(self, name)
            for name in ("max_tokens", "temperature", "seed", "timeout")
            if getattr(self, name) is not None
        }
        cfg = engine.resolve_config(self.rain_config).merged(**instance)
        call_cfg = kwargs.pop("rain_config", None)
        if isinstance(call_cfg, RainConfig):
            cfg = call_cfg
        elif call_cfg is not None and not isinstance(call_cfg, Mapping):
            # A preset name ("fast"), or a RainConfigError that says what fits.
            cfg = engine.resolve_config(call_cfg).merged(**instance)
        elif call_cfg is not None:
            call_cfg = dict(call_cfg)
            if "preset" in call_cfg:  # a preset starts afresh; instance fields still apply
                kept = {k: v for k, v in instance.items() if k not in call_cfg}
                cfg = engine.resolve_config(call_cfg).merged(**kept)
            else:
                cfg = cfg.merged(**call_cfg)
        overrides: dict[str, Any] = {}
        stops = stop if stop is not None else kwargs.pop("stop", None) or self.stop
        kwargs.pop("stop", None)
        if stops:
            overrides["stop"] = tuple(stops)
        for key, value in kwargs.items():
            name = _LC_TO_RAIN.get(key, key)
            if name not in _RAIN_FIELDS:
                raise RainInputError(
                    f"ChatRain got an unknown option {key!r}; use rubric, rain_config, model, "
                    f"include_trace, tools, tool_choice, max_tokens, timeout or a RainConfig "
                    f"setting ({', '.join(sorted(_RAIN_FIELDS))})"
                )
            if value is not None:
                overrides[name] = tuple(value) if name == "stop" else value
        cfg = cfg.merged(**overrides)
        grammar = tools.grammar() if tools is not None else None
        return _CallPlan(
            messages=_to_engine_messages(messages, tools, _knows_tool_role(engine)),
            rubric=rubric,
            config=cfg,
            tools=tools,
            grammar=grammar,
            include_trace=include_trace,
        )

    def _iter_items(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None,
        cancel: threading.Event,
        on_event: Callable[[_Event], None] | None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        """Committed text as chunks, then a final chunk with tool calls and metadata.

        Search events go to ``on_event`` as they happen (sync: dispatched at once;
        async: queued to the event loop with the chunks).
        """
        plan = self._plan(messages, stop, **kwargs)

        def handle(kind: str, data: dict[str, Any]) -> None:
            name = _EVENT_NAMES.get(kind)
            if name is not None and on_event is not None:
                on_event(_Event(name, data))

        stream = self.rain_engine.stream(
            plan.messages,
            rubric=plan.rubric,
            config=plan.config,
            on_event=handle if on_event is not None else None,
            cancel=cancel,
            grammar=plan.grammar,
        )
        gate = TextGate(plan.tools)
        try:
            for commit in stream:
                shown = gate.push(commit.text)
                if shown:
                    yield ChatGenerationChunk(message=AIMessageChunk(content=shown))
            yield self._final_chunk(stream.result, plan, gate)
        finally:
            stream.close()  # cancels the search if the consumer stopped early

    def _final_chunk(
        self, result: RainResult, plan: _CallPlan, gate: TextGate
    ) -> ChatGenerationChunk:
        content = gate.text[gate.shown :]
        chunks = []
        invalid: list[Any] = []
        if plan.tools is not None:
            rest, calls, invalid = parse_tool_calls(gate.text, plan.tools)
            content = "" if calls or invalid else content
            if rest and not gate.mute and gate.shown < len(rest):
                content = rest[gate.shown :]
            chunks = [
                tool_call_chunk(name=c["name"], args=json.dumps(c["args"]), id=c["id"], index=i)
                for i, c in enumerate(calls)
            ]
        stats = result.stats.to_dict()
        metadata: dict[str, Any] = {
            "model_name": result.model_name,
            "model_provider": "rain",
            "rubric": result.rubric,
            "finish_reason": result.finish_reason,
            "rain_stats": stats,
            "final_score": stats.get("final_score"),
            "elapsed_s": round(result.elapsed_s, 3),
        }
        if plan.include_trace:
            metadata["rain_trace"] = result.trace
        message = AIMessageChunk(
            content=content,
            tool_call_chunks=chunks,
            invalid_tool_calls=invalid,
            usage_metadata={
                "input_tokens": result.prompt_tokens,
                "output_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens,
            },
            response_metadata=metadata,
            chunk_position="last",
        )
        info: dict[str, Any] = {"finish_reason": result.finish_reason}
        if invalid:
            info["invalid_tool_calls"] = invalid
        return ChatGenerationChunk(message=message, generation_info=info)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        dispatch = _sync_dispatcher(self.callbacks, run_manager)
        for chunk in self._iter_items(messages, stop, threading.Event(), dispatch, **kwargs):
            if run_manager is not None:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return _settle(generate_from_stream(self._stream(messages, stop, run_manager, **kwargs)))

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        # The search runs in a worker thread so the event loop stays free; if this
        # task is cancelled (or the consumer stops), ``cancel`` stops the search.
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()
        done = object()

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop closed: nobody is listening any more
                cancel.set()

        def work() -> None:
            try:
                items = self._iter_items(
                    messages, stop, cancel, put if dispatch is not None else None, **kwargs
                )
                for item in items:
                    put(item)
            except BaseException as exc:  # handed to the awaiting task
                put(_Failure(exc))
            finally:
                put(done)

        dispatch = _async_dispatcher(self.callbacks, run_manager)
        worker = loop.run_in_executor(None, work)
        finished = False
        try:
            while True:
                item = await queue.get()
                if item is done:
                    finished = True
                    break
                if isinstance(item, _Failure):
                    raise item.exc
                if isinstance(item, _Event):
                    if dispatch is not None:
                        await dispatch(item)
                    continue
                if run_manager is not None:
                    await run_manager.on_llm_new_token(item.text, chunk=item)
                yield item
        finally:
            if not finished:
                cancel.set()
            else:
                await worker

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        chunks = [c async for c in self._astream(messages, stop, run_manager, **kwargs)]
        return _settle(generate_from_stream(iter(chunks)))


def _settle(result: ChatResult) -> ChatResult:
    """Keep unparsable tool calls invalid.

    Merging chunks re-reads an invalid call's text with a forgiving partial-JSON
    parser, which would turn a truncated call into a "valid" call with no name.
    """
    gen = result.generations[0]
    invalid = (gen.generation_info or {}).pop("invalid_tool_calls", None)
    if invalid and isinstance(gen.message, AIMessage):
        bad_ids = {c["id"] for c in invalid}
        gen.message.tool_calls = [c for c in gen.message.tool_calls if c["id"] not in bad_ids]
        gen.message.invalid_tool_calls = invalid
        gen.message.response_metadata.pop("invalid_tool_calls", None)
    return result


@dataclass
class _Failure:
    exc: BaseException


def _rubric_label(rubric: Any) -> str | None:
    if rubric is None or isinstance(rubric, str):
        return rubric
    return str(getattr(rubric, "name", None) or "custom")


def _event_manager(
    local: Any, run_manager: CallbackManagerForLLMRun | AsyncCallbackManagerForLLMRun | None
) -> tuple[dict[str, Any], Any] | None:
    """Where search events go: (callback-manager arguments, run id of this model call)."""
    config = _RUN.get()
    if config is not None:
        args = {
            "inheritable_callbacks": config.get("callbacks"),
            "local_callbacks": local,
            "inheritable_tags": config.get("tags"),
            "inheritable_metadata": config.get("metadata"),
        }
        return args, config["run_id"]
    if run_manager is not None:  # called through generate(): no entry point of ours ran
        return {"inheritable_callbacks": run_manager.handlers}, run_manager.run_id
    return None


def _sync_dispatcher(
    local: Any, run_manager: CallbackManagerForLLMRun | None
) -> Callable[[_Event], None] | None:
    """Sends search events as custom events of this model run; ``None`` if nobody listens."""
    target = _event_manager(local, run_manager)
    if target is None:
        return None
    manager = CallbackManager.configure(**target[0])
    if not manager.handlers:
        return None

    def dispatch(event: _Event) -> None:
        manager.on_custom_event(event.name, event.data, run_id=target[1])

    return dispatch


def _async_dispatcher(
    local: Any, run_manager: AsyncCallbackManagerForLLMRun | None
) -> Callable[[_Event], Awaitable[None]] | None:
    target = _event_manager(local, run_manager)
    if target is None:
        return None
    manager = AsyncCallbackManager.configure(**target[0])
    if not manager.handlers:
        return None

    async def dispatch(event: _Event) -> None:
        await manager.on_custom_event(event.name, event.data, run_id=target[1])

    return dispatch


@contextlib.contextmanager
def _model_run(
    config: RunnableConfig | None, kwargs: dict[str, Any]
) -> Iterator[tuple[RunnableConfig, dict[str, Any]]]:
    """One model call: its config, with a fixed run id and current inside the block,
    and the call keywords with the RAIN options of its configurable (those win).
    """
    config = ensure_config(config)
    if config.get("run_id") is None:
        config["run_id"] = uuid7()
    token = _RUN.set(config)
    try:
        yield config, {**kwargs, **_from_configurable(config)}
    finally:
        # A generator closed from another context (e.g. garbage collection) cannot
        # reset its variable; the value is then dropped with that context anyway.
        with contextlib.suppress(ValueError):
            _RUN.reset(token)
