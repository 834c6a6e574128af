"""ChatRain: RAIN as a LangChain chat model.

The adapter is thin: it translates LangChain messages, options, tools and
callbacks, and hands the search to :class:`shared_core.RainEngine`. One private
iterator (:meth:`ChatRain._iter_items`) feeds ``_stream``, ``_generate`` and
their async twins, which run it in a worker thread (:mod:`shared_core.bridge`).
Settings combine as :mod:`shared_core.settings` says; tool choices are read by
:func:`shared_core.tools.tool_set`, as in the LlamaIndex adapter.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Literal

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
from langchain_core.output_parsers import (
    JsonOutputKeyToolsParser,
    JsonOutputParser,
    PydanticOutputParser,
    PydanticToolsParser,
)
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import (
    Runnable,
    RunnableConfig,
    RunnableMap,
    RunnablePassthrough,
    ensure_config,
)
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from langchain_core.utils.uuid import uuid7
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, model_validator

from langchain_rain._tools import parse_tool_calls, resolve_tools
from shared_core import (
    RainConfig,
    RainEngine,
    RainInputError,
    RainResult,
    get_rubric,
)
from shared_core.bridge import Emit, stream_in_thread
from shared_core.models.protocol import Grammar
from shared_core.rubric import Rubric
from shared_core.settings import (
    LANGCHAIN,
    EngineSource,
    resolve,
    unknown_keyword,
    unknown_option,
)
from shared_core.tools import TextGate, ToolSet, format_call

__all__ = ["ChatRain"]

_DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PROVIDER = "rain"
# Per-call options ChatRain handles itself (the rest are settings: shared_core.settings).
_CALL_OPTIONS = (
    "include_trace",
    "model",
    "gguf_file",
    "response_format",
    "stop",
    "tool_choice",
    "tools",
)
_CONFIGURABLE_KEYS = frozenset({"include_trace", *LANGCHAIN.accepted()})
# The call keyword that carries the configurable's RAIN options from our entry points to
# ``_plan``, kept apart from the call keywords: a call keyword beats the run config.
_CONFIGURABLE = "rain_configurable"
# Call keywords LangChain itself adds (tracing/structured output); not RAIN's business.
_LC_INTERNAL = frozenset({"ls_structured_output_format", "stream", _CONFIGURABLE})
# Constructor arguments that are no field: a loaded model's tokenizer.
_INIT_ONLY = ("tokenizer",)
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


def _with_configurable(kwargs: dict[str, Any], config: RunnableConfig) -> dict[str, Any]:
    """The call keywords, with the configurable's RAIN options as one keyword of their own
    (``_plan`` ranks them below the call keywords; LangChain forwards it to ``_generate``)."""
    found = _from_configurable(config)
    if not found:
        return kwargs
    # An inner entry point (a bound model inside a chain) sees the same run config.
    return {**kwargs, _CONFIGURABLE: {**kwargs.get(_CONFIGURABLE, {}), **found}}


# --- one call --------------------------------------------------------------------------
@dataclass
class _Event:
    """A search event (commit/rewind) to dispatch as a LangChain custom event."""

    name: str
    data: dict[str, Any]


@dataclass
class _CallPlan:
    engine: RainEngine
    messages: list[dict[str, str]]
    rubric: Rubric
    config: RainConfig
    tools: ToolSet | None
    grammar: Grammar | None
    include_trace: bool


_TextGate = TextGate  # the gate's name in tests/test_langchain_chat.py


def _source(model: Any, tokenizer: Any, fields: Mapping[str, Any]) -> EngineSource:
    """Where the engine comes from, read from the constructor's arguments or the fields."""
    key = fields.get("api_key")
    return EngineSource(
        owner="ChatRain",
        model=model,
        tokenizer=tokenizer,
        gguf_file=fields.get("gguf_file"),
        engine=fields.get("engine"),
        base_url=fields.get("base_url"),
        api_key=key.get_secret_value() if isinstance(key, SecretStr) else key,
        dialect=fields.get("dialect"),
    )


class ChatRain(BaseChatModel):
    """A chat model that answers with RAIN: a frozen LLM aligned by self-evaluated search.

    Build it the ways a RainEngine or RainLLM is built: a model id or path
    (``ChatRain(model="org/model")``, ``gguf_file=`` for GGUF weights), a loaded
    transformers model and its tokenizer (``ChatRain(model=hf_model, tokenizer=tok)``
    or :meth:`from_transformers`), an existing ``engine=``, a served model
    (``base_url=``, ``model=`` its served name, ``api_key=``, ``dialect=``), or the
    embedded SmolLM2 (``ChatRain()``, :meth:`from_default`). Weights load on first use,
    once per process and model. An unknown keyword is refused with the accepted names.

    Choose the rubric (and any RainConfig setting) per call with a call keyword
    (``invoke(msgs, rubric=...)``, ``.bind(rubric=...)``), with
    ``config={"configurable": {"rubric": "positive", "T": 8}}``, or as the default
    ``ChatRain(rubric=...)``; a call keyword beats the run config, which beats the
    instance's fields (:mod:`shared_core.settings`).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    model: str | None = None
    """Model id or local path (or a served model's name); ``None``: the embedded
    SmolLM2-135M-Instruct. A loaded model object goes in with ``tokenizer=``."""
    gguf_file: str | None = None
    """GGUF file inside ``model`` to load, if the weights come as GGUF."""
    engine: RainEngine | None = Field(default=None, exclude=True)
    """An existing engine to use instead of loading ``model``."""
    base_url: str | None = None
    """Address of a server that serves ``model`` (vLLM, SGLang, llama.cpp)."""
    api_key: SecretStr | None = None
    """The served model's API key, if the server wants one."""
    dialect: str | None = None
    """The server's kind, if it cannot be told from the server itself."""
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
    _served_tokenizer: Any = PrivateAttr(default=None)
    _load_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def __init__(self, model: Any = None, **kwargs: Any) -> None:
        accepted = {*type(self).model_fields, *_INIT_ONLY}
        for key in kwargs:
            if key not in accepted:
                raise unknown_keyword("ChatRain()", key, accepted)
        tokenizer = kwargs.pop("tokenizer", None)
        source = _source(model, tokenizer, kwargs).check()
        if source.loaded_model:
            # A loaded model is wrapped now (cheap: no weights move); the field keeps ids.
            kwargs["engine"] = source.load()
            model = None
        super().__init__(model=None if model is None else str(model), **kwargs)  # type: ignore[call-arg]
        if source.base_url is not None:
            self._served_tokenizer = tokenizer  # the served model's, used when it connects

    @model_validator(mode="after")
    def _check(self) -> ChatRain:
        # Cheap checks only: construction must not load weights.
        if self.rubric is not None:
            get_rubric(self.rubric)
        resolve(LANGCHAIN, defaults=RainConfig(), instance=self._instance_settings())
        return self

    def _resolve_model_profile(self) -> Any:
        # What LangChain (e.g. create_agent's summarisation) reads to size prompts;
        # the context window is known once the engine is (a model id loads on first use).
        profile: dict[str, Any] = {
            "text_inputs": True,
            "text_outputs": True,
            "image_inputs": False,
            "audio_inputs": False,
            "video_inputs": False,
            "pdf_inputs": False,
            "tool_calling": True,
            "tool_choice": True,
            "structured_output": True,
            "tool_call_streaming": False,
            "reasoning_output": False,
        }
        engine = self.engine if self.engine is not None else self._loaded
        if engine is not None:
            profile["max_input_tokens"] = engine.context_window
        return profile

    # --- construction ------------------------------------------------------------------
    @classmethod
    def from_default(cls, **kwargs: Any) -> ChatRain:
        """The embedded SmolLM2-135M-Instruct (shared, loaded on first use)."""
        return cls(**kwargs)

    @classmethod
    def from_transformers(cls, model: Any, tokenizer: Any, **kwargs: Any) -> ChatRain:
        """A loaded transformers causal LM and its tokenizer."""
        return cls(model=model, tokenizer=tokenizer, **kwargs)

    @property
    def rain_engine(self) -> RainEngine:
        """The engine; loaded (once per process and model) on first use."""
        if self.engine is not None:
            return self.engine
        with self._load_lock:
            if self._loaded is None:
                source = _source(self.model, self._served_tokenizer, self.__dict__)
                self._loaded = source.load()
                if isinstance(self.profile, dict):
                    self.profile["max_input_tokens"] = self._loaded.context_window
            return self._loaded

    def _instance_settings(self) -> dict[str, Any]:
        return {
            "rain_config": self.rain_config,
            "rubric": self.rubric,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "seed": self.seed,
            "timeout": self.timeout,
            "stop": self.stop,
        }

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
        params["ls_provider"] = _PROVIDER
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
        return super().stream_events(input, config, **_with_configurable(kwargs, config))

    def astream_events(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Any:
        config = ensure_config(config)
        return super().astream_events(input, config, **_with_configurable(kwargs, config))

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
        for key in kwargs:
            if key not in _LC_INTERNAL and key not in LANGCHAIN.accepted(*_CALL_OPTIONS):
                raise unknown_option(LANGCHAIN, key, _CALL_OPTIONS)
        return self.bind(tools=list(tools), tool_choice=tool_choice, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        method: Literal["function_calling", "json_schema", "json_mode"] = "function_calling",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | BaseModel]:
        """Answers parsed into ``schema`` (pydantic class, TypedDict, JSON or OpenAI schema).

        Every method is grammar-constrained, so the answer is valid for the schema
        even from a small model (if ``max_tokens`` leaves room to finish it):

        - ``"function_calling"``: a required call of a tool with the schema as its
          parameters (parsed from ``AIMessage.tool_calls``);
        - ``"json_schema"``: the whole answer is one JSON document of the schema
          (parsed from the text);
        - ``"json_mode"``: the whole answer is a JSON object (of ``schema``, when one
          is given; describe the format in the prompt as with any JSON mode).

        ``strict``: the grammar always enforces the schema exactly (no extra or
        missing properties), which is what ``strict=True`` asks for; ``strict=False``
        or ``None`` get the same guarantee. ``json_mode`` takes no ``strict``.
        ``include_raw=True`` returns ``{"raw", "parsed", "parsing_error"}``.
        """
        if kwargs:
            key = next(iter(kwargs))
            raise unknown_keyword(
                "with_structured_output", key, ["include_raw", "method", "schema", "strict"]
            )
        methods = ("function_calling", "json_schema", "json_mode")
        if method not in methods:
            raise RainInputError(f"unknown method {method!r}; use one of {', '.join(methods)}")
        if schema is None and method != "json_mode":
            raise RainInputError(f"method={method!r} needs a schema; json_mode alone takes none")
        if strict is not None and method == "json_mode":
            raise RainInputError(
                "strict= applies to json_schema and function_calling, not json_mode"
            )
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        pydantic_cls: Any = schema if is_pydantic else None
        trace = {"kwargs": {"method": method, "strict": strict}, "schema": schema}
        parser: Runnable[Any, Any]
        if method == "function_calling":
            assert schema is not None
            name = convert_to_openai_tool(schema)["function"]["name"]
            llm = self.bind_tools([schema], tool_choice=name, ls_structured_output_format=trace)
            parser = (
                PydanticToolsParser(tools=[pydantic_cls], first_tool_only=True)
                if pydantic_cls is not None
                else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
            )
        else:
            json_schema = {"type": "object"} if schema is None else convert_to_json_schema(schema)
            llm = self.bind(response_format=json_schema, ls_structured_output_format=trace)
            parser = (
                PydanticOutputParser(pydantic_object=pydantic_cls)
                if pydantic_cls is not None
                else JsonOutputParser()
            )
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(
            parsed=itemgetter("raw") | parser, parsing_error=lambda _: None
        ).with_fallbacks(
            [RunnablePassthrough.assign(parsed=lambda _: None)], exception_key="parsing_error"
        )
        return RunnableMap(raw=llm) | parsed

    # --- the one path ---------------------------------------------------------------------
    def _plan(
        self, messages: list[BaseMessage], stop: list[str] | None, **kwargs: Any
    ) -> _CallPlan:
        """Everything one call needs; every setting is resolved here, by one precedence."""
        configurable = dict(kwargs.get(_CONFIGURABLE) or {})
        call = {k: v for k, v in kwargs.items() if k not in _LC_INTERNAL}
        if stop is not None:
            call["stop"] = stop
        tools = resolve_tools(call.pop("tools", None), call.pop("tool_choice", None))
        response_format = call.pop("response_format", None)
        if response_format is not None:
            tools = ToolSet(answer_schema=dict(response_format))
        include_trace = call.pop("include_trace", configurable.pop("include_trace", None))
        other = call.pop("model", None)  # a per-call model: loaded once, then shared
        gguf_file = call.pop("gguf_file", None)
        engine = (
            EngineSource("ChatRain", model=other, gguf_file=gguf_file).load()
            if other
            else self.rain_engine
        )
        settings = resolve(
            LANGCHAIN,
            defaults=engine.config,
            default_rubric=engine.default_rubric,
            instance=self._instance_settings(),
            context=configurable,
            call=call,
            other_options=_CALL_OPTIONS,
        )
        assert settings.rubric is not None  # the engine's default at the least
        grammar = tools.grammar() if tools is not None else None
        return _CallPlan(
            engine=engine,
            messages=_to_engine_messages(messages, tools, _knows_tool_role(engine)),
            rubric=settings.rubric,
            config=settings.config,
            tools=tools,
            grammar=grammar,
            include_trace=self.include_trace if include_trace is None else bool(include_trace),
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

        stream = plan.engine.stream(
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
        # task is cancelled (or the consumer stops), the bridge sets ``cancel``.
        cancel = threading.Event()
        dispatch = _async_dispatcher(self.callbacks, run_manager)

        def produce(emit: Emit) -> Iterator[ChatGenerationChunk]:
            on_event = emit if dispatch is not None else None
            return self._iter_items(messages, stop, cancel, on_event, **kwargs)

        async for item in stream_in_thread(produce, cancel):
            if isinstance(item, _Event):
                if dispatch is not None:
                    await dispatch(item)
                continue
            if run_manager is not None:
                await run_manager.on_llm_new_token(item.text, chunk=item)
            yield item

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
    and the call keywords with the RAIN options of its configurable riding along.
    """
    config = ensure_config(config)
    if config.get("run_id") is None:
        config["run_id"] = uuid7()
    token = _RUN.set(config)
    try:
        yield config, _with_configurable(kwargs, config)
    finally:
        # A generator closed from another context (e.g. garbage collection) cannot
        # reset its variable; the value is then dropped with that context anyway.
        with contextlib.suppress(ValueError):
            _RUN.reset(token)
