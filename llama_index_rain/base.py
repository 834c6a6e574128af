"""RainLLM: RAIN as a LlamaIndex ``LLM`` (RAG query engines, chat engines, agents).

One private path feeds all eight calling endpoints: ``_start`` resolves the rubric and
config (:mod:`shared_core.settings`), renders the prompt and validates it
(``engine.stream``); ``_chunks`` turns the engine's committed token sets into
``(delta, text, extra)`` tuples through the shared stream gate. The sync endpoints
consume ``_chunks`` directly, the async ones run it in a worker thread
(:mod:`shared_core.bridge`), so streaming and non-streaming calls format prompts
the same way.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_index.core.base.llms.generic_utils import (
    messages_to_prompt as generic_messages_to_prompt,
)
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
    TextBlock,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.synthesis import SynthesizeEndEvent
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.program.function_program import get_function_tool
from llama_index.core.program.utils import get_program_for_llm
from llama_index.core.tools.types import BaseTool
from llama_index.core.types import PydanticProgramMode

from llama_index_rain._tools import ToolPlan, format_call, plan_tools
from shared_core import (
    RainConfig,
    RainEngine,
    RainInputError,
    RainResult,
    RainStream,
    Rubric,
    get_rubric,
    load_engine,
)
from shared_core.bridge import Emit, run_in_thread, stream_in_thread
from shared_core.rubric import RubricSpec
from shared_core.settings import (
    LLAMA_INDEX,
    EngineSource,
    Settings,
    from_generate_kwargs,
    resolve,
    unknown_keyword,
)
from shared_core.tools import TextGate

__all__ = ["RainLLM", "current_rain_rubric", "rain_rubric"]

_RUBRIC: ContextVar[Rubric | None] = ContextVar("rain_rubric", default=None)

# LlamaIndex roles -> the engine's four roles.
_ROLES: dict[str, str] = {
    MessageRole.SYSTEM.value: "system",
    MessageRole.DEVELOPER.value: "system",
    MessageRole.USER.value: "user",
    MessageRole.ASSISTANT.value: "assistant",
    MessageRole.MODEL.value: "assistant",
    MessageRole.CHATBOT.value: "assistant",
    MessageRole.TOOL.value: "tool",
    MessageRole.FUNCTION.value: "tool",
}

_Chunk = tuple[str, str, dict[str, Any]]
"""(delta, cumulative text, additional_kwargs) of one streamed response."""

# Per-call options RainLLM handles itself (the rest are settings: shared_core.settings).
_CALL_OPTIONS = ("formatted", "tool_choice", "tool_required", "tools")
# Constructor arguments that are not settings, beside LlamaIndex's own LLM fields.
_SOURCE_ARGS = ("model", "tokenizer", "engine", "gguf_file", "base_url", "api_key", "dialect")
_SETTING_ARGS = (
    "rubric",
    "config",
    "max_new_tokens",
    "temperature",
    "context_window",
    "generate_kwargs",
)


@contextmanager
def rain_rubric(rubric: RubricSpec) -> Iterator[Rubric]:
    """Use ``rubric`` for every RainLLM call started inside the block.

    Query engines, chat engines and agents do not forward LLM keywords, so this
    context variable is how a pipeline picks the preference. It is read when a
    call starts, and a streaming query or chat response synthesized inside the
    block keeps the rubric even if it is consumed after the block ends. Unknown
    rubrics raise :class:`~shared_core.RubricError` here, at entry.
    """
    resolved = get_rubric(rubric)
    _install_stream_binder()
    token = _RUBRIC.set(resolved)
    try:
        yield resolved
    finally:
        _RUBRIC.reset(token)


def current_rain_rubric() -> Rubric | None:
    """The rubric set by the innermost active :func:`rain_rubric`, if any."""
    return _RUBRIC.get()


def _bound(gen: Generator[Any, None, None], rubric: Rubric) -> Iterator[Any]:
    """``gen`` with ``rubric`` active while each item is produced."""
    try:
        while True:
            token = _RUBRIC.set(rubric)
            try:
                item = next(gen)
            except StopIteration:
                return
            finally:
                _RUBRIC.reset(token)
            yield item
    finally:
        gen.close()


async def _abound(gen: AsyncGenerator[Any, None], rubric: Rubric) -> AsyncIterator[Any]:
    """``gen`` with ``rubric`` active while each item is produced."""
    try:
        while True:
            token = _RUBRIC.set(rubric)
            try:
                item = await anext(gen)
            except StopAsyncIteration:
                return
            finally:
                _RUBRIC.reset(token)
            yield item
    finally:
        await gen.aclose()


class _StreamRubricBinder(BaseEventHandler):
    """Binds the active rubric to the lazy token stream a synthesis returns.

    A streaming query (or a chat engine's streaming answer) calls the LLM only
    when its ``response_gen`` is iterated, usually after the ``rain_rubric``
    block has ended. When the synthesis finishes -- still inside the block --
    this wraps ``response_gen`` so the LLM call it makes later sees the rubric.
    """

    @classmethod
    def class_name(cls) -> str:
        return "RainStreamRubricBinder"

    def handle(self, event: Any, **kwargs: Any) -> None:
        rubric = _RUBRIC.get()
        if rubric is None or not isinstance(event, SynthesizeEndEvent):
            return
        response = event.response
        gen = getattr(response, "response_gen", None)
        if isinstance(gen, Generator):
            response.response_gen = _bound(gen, rubric)  # type: ignore[union-attr]
        elif isinstance(gen, AsyncGenerator):
            response.response_gen = _abound(gen, rubric)  # type: ignore[union-attr]


_BINDER_LOCK = threading.Lock()
_binder: _StreamRubricBinder | None = None


def _install_stream_binder() -> None:
    global _binder
    with _BINDER_LOCK:
        if _binder is None:
            _binder = _StreamRubricBinder()
            get_dispatcher().add_event_handler(_binder)


def _to_engine_messages(
    messages: Sequence[ChatMessage], tools: ToolPlan | None = None
) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for i, msg in enumerate(messages):
        role = _ROLES.get(str(getattr(msg.role, "value", msg.role)))
        if role is None:
            raise RainInputError(
                f"message {i} has role {msg.role!r}, which RAIN cannot map; use "
                "system, user, assistant or tool"
            )
        if any(not isinstance(b, TextBlock) for b in msg.blocks):
            kinds = sorted({type(b).__name__ for b in msg.blocks if not isinstance(b, TextBlock)})
            raise RainInputError(
                f"message {i} holds {', '.join(kinds)}; RAIN handles text only: "
                "send the text parts alone"
            )
        content = msg.content or ""
        calls = msg.additional_kwargs.get("tool_calls") if role == "assistant" else None
        if calls:  # an earlier call of ours, shown to the model as it wrote it
            content = "".join([content, *(format_call(c) for c in calls)])
        out.append({"role": role, "content": content})
    # The engine takes plain messages: tools are described in the system prompt.
    return out if tools is None else tools.with_system_prompt(out)


def _stats(result: RainResult) -> dict[str, Any]:
    """What the search did, for ``additional_kwargs``: flat headline numbers + full record."""
    s = result.stats
    return {
        "rubric": result.rubric,
        "model": result.model_name,
        "iterations": s.iterations,
        "commits": s.commits,
        "rewinds": s.rewinds,
        "final_score": s.final_score,
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "elapsed_s": round(result.elapsed_s, 3),
        "rain_stats": s.to_dict(),
        "rain_trace": result.trace,
    }


@dataclass
class _Call:
    """One started request: the engine's stream and the event that cancels it."""

    stream: RainStream
    cancel: threading.Event
    rubric: Rubric
    tools: ToolPlan | None = None

    def final(self, result: RainResult) -> tuple[str, dict[str, Any]]:
        """The answer's text and ``additional_kwargs`` (stats, and tool calls if any)."""
        extra = _stats(result)
        if self.tools is None:
            return result.text, extra
        parsed = self.tools.parse_answer(result.text)
        extra["tool_calls"], extra["invalid_tool_calls"] = self.tools.parse(result.text)
        return parsed.rest, extra


class RainLLM(FunctionCallingLLM):
    """A LlamaIndex LLM whose every answer is found by RAIN's self-evaluated search.

    Build it the ways a RainEngine or ChatRain is built: a model id or path
    (``RainLLM("HuggingFaceTB/SmolLM2-135M-Instruct")``, ``gguf_file=`` for GGUF
    weights), a loaded transformers model and tokenizer (``RainLLM(model, tokenizer)``),
    an existing ``engine=``, a served model (``base_url=``, ``model=`` its served name,
    ``api_key=``, ``dialect=``) or the embedded default (``RainLLM()``,
    :meth:`from_default`). Models named by id or path go through
    :func:`shared_core.load_engine`, so every RainLLM and ChatRain in the process
    shares one copy of the weights.

    ``HuggingFaceLLM``'s options mean the same here: ``max_new_tokens``,
    ``temperature`` (vanilla decoding), ``context_window`` (a cap below the model's
    window: prompts are refused above it and answers cut to fit it),
    ``system_prompt``, ``query_wrapper_prompt`` and ``completion_to_prompt`` (applied
    by ``complete(formatted=False)``), ``messages_to_prompt`` (when given, ``chat``
    sends the conversation it renders as one user turn) and the ``generate_kwargs``
    that have a RAIN meaning. Any search setting goes in ``config=``. An unknown
    keyword is refused with the accepted names, here and per call.

    The settings of a call combine as :mod:`shared_core.settings` says: the call's
    keywords (``rubric=``, ``config=``, ``max_new_tokens=``, ``T=``, ...), then the
    innermost :func:`rain_rubric` block, then the instance's fields.

    ``complete`` sends the prompt as one user message through the model's chat
    template, streaming or not; with ``formatted=False`` the instance's
    ``query_wrapper_prompt``, ``completion_to_prompt`` and ``system_prompt`` are
    applied first, with ``formatted=True`` the prompt is sent as given. ``chat``
    sends the messages as they are (``LLM.predict`` already adds ``system_prompt``).

    Tools (``chat_with_tools``, ``FunctionAgent``) are described in the system
    prompt; the model calls one as ``<tool_call>{"name": ..., "arguments": {...}}
    </tool_call>`` and the call lands in ``message.additional_kwargs["tool_calls"]``.
    A required call (``tool_required=True`` or ``tool_choice``) is constrained by
    a JSON-schema grammar, so it is always valid for the tool's parameters; so are
    ``structured_predict`` and its stream and async twins.

    Streaming yields one response per committed token set that adds visible text
    (``delta`` + cumulative ``text``; a tool call is held back, never streamed),
    then a last one (usually ``delta=""``) carrying the search statistics. The
    final response's ``additional_kwargs`` hold ``rubric``, ``iterations``,
    ``commits``, ``rewinds``, ``final_score``, ``rain_stats`` and ``rain_trace``.
    """

    model: str = Field(default="", description="Name of the model the engine runs.")
    gguf_file: str | None = Field(default=None, description="GGUF file inside `model`, if any.")
    base_url: str | None = Field(default=None, description="Server of a served model, if any.")
    rubric: str = Field(default="", description="Name of the default rubric.")
    config: dict[str, Any] = Field(
        default_factory=dict, description="The instance's RainConfig (all levels but the call)."
    )
    max_new_tokens: int | None = Field(default=None, description="Maximum answer tokens.")
    temperature: float | None = Field(
        default=None, description="Vanilla decoding temperature (RainConfig.temperature)."
    )
    context_window: int | None = Field(
        default=None, description="A cap on prompt + answer tokens below the model's window."
    )
    generate_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="transformers generate() options that map onto RAIN."
    )

    _engine: RainEngine = PrivateAttr()
    _instance: dict[str, Any] = PrivateAttr()
    _settings: Settings = PrivateAttr()

    def __init__(
        self,
        model: str | Path | Any = None,
        tokenizer: Any = None,
        *,
        engine: RainEngine | None = None,
        gguf_file: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        dialect: str | None = None,
        rubric: RubricSpec | None = None,
        config: RainConfig | Mapping[str, Any] | str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        context_window: int | None = None,
        generate_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        base_fields = set(FunctionCallingLLM.model_fields)
        for key in kwargs:
            if key not in base_fields:
                raise unknown_keyword(
                    "RainLLM()", key, [*_SOURCE_ARGS, *_SETTING_ARGS, *base_fields]
                )
        source = EngineSource(
            owner="RainLLM",
            model=model,
            tokenizer=tokenizer,
            gguf_file=gguf_file,
            engine=engine,
            base_url=base_url,
            api_key=api_key,
            dialect=dialect,
        )
        rain_engine: RainEngine = source.load()
        named = {
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "context_window": context_window,
        }
        # The instance level: its config, generate_kwargs, then the fields named outright.
        instance: dict[str, Any] = {
            "config": config,
            "rubric": rubric,
            **from_generate_kwargs(generate_kwargs or {}, "RainLLM"),
            **{k: v for k, v in named.items() if v is not None},
        }
        settings = resolve(
            LLAMA_INDEX,
            defaults=rain_engine.config,
            default_rubric=rain_engine.default_rubric,
            instance=instance,
        )
        assert settings.rubric is not None
        fields: dict[str, Any] = {
            "model": rain_engine.model_name,
            "gguf_file": gguf_file,
            "base_url": base_url,
            "rubric": settings.rubric.name,
            "config": settings.config.model_dump(),
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "context_window": context_window,
            "generate_kwargs": dict(generate_kwargs or {}),
        }
        super().__init__(**fields, **kwargs)
        self._engine = rain_engine
        self._instance = instance
        self._settings = settings

    @classmethod
    def from_default(cls, **kwargs: Any) -> RainLLM:
        """The embedded SmolLM2-135M-Instruct, loaded once per process."""
        return cls(engine=load_engine(), **kwargs)

    @classmethod
    def class_name(cls) -> str:
        return "RainLLM"

    @property
    def engine(self) -> RainEngine:
        """The RAIN engine (shared with other adapters of the same model)."""
        return self._engine

    @property
    def metadata(self) -> LLMMetadata:
        window = self._engine.context_window
        if self._settings.context_window is not None:
            window = min(window, self._settings.context_window)
        return LLMMetadata(
            context_window=window,
            num_output=self._settings.config.max_new_tokens,
            is_chat_model=True,
            is_function_calling_model=True,
            model_name=self._engine.model_name,
            system_role=MessageRole.SYSTEM,
        )

    # --- the one core path ----------------------------------------------------------------
    def _start(
        self,
        messages: list[dict[str, str]],
        kwargs: dict[str, Any],
        tools: ToolPlan | None = None,
    ) -> _Call:
        """Resolve rubric and config now (the caller's context), validate the prompt."""
        settings = resolve(
            LLAMA_INDEX,
            defaults=self._engine.config,
            default_rubric=self._engine.default_rubric,
            instance=self._instance,
            context={"rubric": _RUBRIC.get()},
            call=kwargs,
            other_options=_CALL_OPTIONS,
        )
        assert settings.rubric is not None
        cfg = settings.config
        if settings.context_window is not None:
            # The cap is ours, below the model's window: fit the answer to it here.
            prompt = self._engine.prompt_ids(messages)
            cfg = settings.fit(len(prompt), self._engine.context_window)
        grammar = tools.grammar() if tools is not None else None
        cancel = threading.Event()
        stream = self._engine.stream(
            messages, rubric=settings.rubric, config=cfg, cancel=cancel, grammar=grammar
        )
        return _Call(stream=stream, cancel=cancel, rubric=settings.rubric, tools=tools)

    def _start_chat(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> _Call:
        tools = plan_tools(
            kwargs.pop("tools", None),
            bool(kwargs.pop("tool_required", False)),
            kwargs.pop("tool_choice", None),
        )
        render = self.messages_to_prompt
        if tools is None and render is not None and render is not generic_messages_to_prompt:
            # A user's messages_to_prompt renders the conversation (HuggingFaceLLM's way).
            text = render(messages)
            return self._start([{"role": "user", "content": text}], kwargs)
        return self._start(_to_engine_messages(messages, tools), kwargs, tools)

    def _completion_messages(self, prompt: str, formatted: bool) -> list[dict[str, str]]:
        if not isinstance(prompt, str) or not prompt.strip():
            raise RainInputError(
                f"the prompt is empty ({prompt!r:.40}); pass the text the model should answer"
            )
        if formatted:
            return [{"role": "user", "content": prompt}]
        # HuggingFaceLLM's order: the query wrapper, then completion_to_prompt.
        text = prompt
        if self.query_wrapper_prompt is not None:
            text = self.query_wrapper_prompt.format(query_str=text)
        text = self.completion_to_prompt(text) if self.completion_to_prompt else text
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*msgs, {"role": "user", "content": text}]

    @staticmethod
    def _chunks(call: _Call) -> Generator[_Chunk, None, None]:
        """Committed token sets as (delta, text, extra); the stats ride on a last chunk."""
        gate = TextGate(call.tools)  # the stream gate ChatRain uses: calls are held back
        shown = ""
        try:
            for commit in call.stream:
                delta = gate.push(commit.text)
                if delta:
                    shown += delta
                    yield delta, shown, {"commit": commit.index, "value": commit.value}
            text, extra = call.final(call.stream.result)
            yield text[len(shown) :], text, extra
        finally:
            call.stream.close()

    @staticmethod
    def _run(call: _Call) -> RainResult:
        try:
            for _ in call.stream:
                pass
        finally:
            call.stream.close()
        return call.stream.result

    @staticmethod
    async def _arun(call: _Call) -> RainResult:
        return await run_in_thread(lambda: RainLLM._run(call), call.cancel)

    @staticmethod
    async def _achunks(call: _Call) -> AsyncIterator[_Chunk]:
        """``_chunks`` produced by a worker thread, so the event loop never blocks."""

        def produce(emit: Emit) -> Iterator[_Chunk]:
            return RainLLM._chunks(call)

        async for chunk in stream_in_thread(produce, call.cancel):
            yield chunk

    # --- structured output --------------------------------------------------------------
    # LlamaIndex's streaming programs ask for the class's tool without requiring it;
    # naming it as the tool_choice makes the call (and so the object) grammar-constrained.
    def _structured_stream_call(
        self,
        output_cls: Any,
        prompt: Any,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Any:
        return self._structured_program(output_cls, prompt).stream_call(
            llm_kwargs=llm_kwargs, **prompt_args
        )

    async def _structured_astream_call(
        self,
        output_cls: Any,
        prompt: Any,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Any:
        program = self._structured_program(output_cls, prompt)
        return await program.astream_call(llm_kwargs=llm_kwargs, **prompt_args)

    def _structured_program(self, output_cls: Any, prompt: Any) -> Any:
        if self.pydantic_program_mode != PydanticProgramMode.DEFAULT:
            return get_program_for_llm(
                output_cls, prompt, self, pydantic_program_mode=self.pydantic_program_mode
            )
        name = get_function_tool(output_cls).metadata.name
        return get_program_for_llm(output_cls, prompt, self, tool_choice=name)

    # --- completion endpoints ---------------------------------------------------------------
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        call = self._start(self._completion_messages(prompt, formatted), kwargs)
        return _completion(call, self._run(call))

    @llm_completion_callback()
    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        call = self._start(self._completion_messages(prompt, formatted), kwargs)

        def gen() -> CompletionResponseGen:
            for delta, text, extra in self._chunks(call):
                yield CompletionResponse(text=text, delta=delta, additional_kwargs=extra)

        return gen()

    @llm_completion_callback()
    async def acomplete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponse:
        call = self._start(self._completion_messages(prompt, formatted), kwargs)
        return _completion(call, await self._arun(call))

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        call = self._start(self._completion_messages(prompt, formatted), kwargs)

        async def gen() -> CompletionResponseAsyncGen:
            async for delta, text, extra in self._achunks(call):
                yield CompletionResponse(text=text, delta=delta, additional_kwargs=extra)

        return gen()

    # --- chat endpoints ---------------------------------------------------------------------
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        call = self._start_chat(messages, kwargs)
        return _chat(call, self._run(call))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        call = self._start_chat(messages, kwargs)

        def gen() -> ChatResponseGen:
            for delta, text, extra in self._chunks(call):
                yield _chat_chunk(delta, text, extra)

        return gen()

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        call = self._start_chat(messages, kwargs)
        return _chat(call, await self._arun(call))

    @llm_chat_callback()
    async def astream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseAsyncGen:
        call = self._start_chat(messages, kwargs)

        async def gen() -> ChatResponseAsyncGen:
            async for delta, text, extra in self._achunks(call):
                yield _chat_chunk(delta, text, extra)

        return gen()

    # --- function calling -------------------------------------------------------------------
    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Arguments for ``chat``: the tools ride along and are rendered by ``_start_chat``."""
        messages = list(chat_history or [])
        if isinstance(user_msg, str):
            user_msg = ChatMessage(role=MessageRole.USER, content=user_msg)
        if user_msg is not None:
            messages.append(user_msg)
        return {"messages": messages, "tools": tools, "tool_required": tool_required, **kwargs}

    def _validate_chat_with_tools_response(
        self,
        response: ChatResponse,
        tools: Sequence[BaseTool],
        allow_parallel_tool_calls: bool = False,
        **kwargs: Any,
    ) -> ChatResponse:
        calls = response.message.additional_kwargs.get("tool_calls")
        if not allow_parallel_tool_calls and calls and len(calls) > 1:
            response.message.additional_kwargs["tool_calls"] = calls[:1]
        return response

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        calls = response.message.additional_kwargs.get("tool_calls") or []
        if not calls and error_on_no_tool_call:
            bad = response.additional_kwargs.get("invalid_tool_calls") or []
            why = f" (unparseable: {bad[0]['error']})" if bad else ""
            raise ValueError(
                f"expected a tool call, but the model answered in text{why}: "
                f"{(response.message.content or '')[:120]!r}; pass tool_required=True "
                "to constrain the answer to a valid call"
            )
        return [
            ToolSelection(tool_id=c["id"], tool_name=c["name"], tool_kwargs=c["arguments"])
            for c in calls
        ]


def _completion(call: _Call, result: RainResult) -> CompletionResponse:
    text, extra = call.final(result)
    return CompletionResponse(text=text, additional_kwargs=extra)


def _chat(call: _Call, result: RainResult) -> ChatResponse:
    text, extra = call.final(result)
    return _chat_chunk(None, text, extra)


def _chat_chunk(delta: str | None, text: str, extra: dict[str, Any]) -> ChatResponse:
    # Tool calls live on the message too, so agent memory shows them to the model later.
    calls = extra.get("tool_calls")
    message = ChatMessage(
        role=MessageRole.ASSISTANT,
        content=text,
        additional_kwargs={"tool_calls": calls} if calls else {},
    )
    return ChatResponse(message=message, delta=delta, additional_kwargs=extra)
