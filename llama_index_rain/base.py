"""RainLLM: RAIN as a LlamaIndex ``LLM`` (RAG query engines, chat engines, agents).

One private path feeds all eight calling endpoints: ``_start`` resolves the rubric and
config, renders the prompt and validates it (``engine.stream``); ``_chunks``
turns the engine's committed token sets into ``(delta, text, extra)`` tuples.
The sync endpoints consume ``_chunks`` directly, the async ones run it in a
worker thread, so streaming and non-streaming calls format prompts the same way.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from llama_index.core.tools.types import BaseTool

from llama_index_rain._tools import ToolPlan, format_call, plan_tools
from shared_core import (
    RainConfig,
    RainEngine,
    RainError,
    RainInputError,
    RainResult,
    RainStream,
    Rubric,
    get_rubric,
    load_engine,
)
from shared_core.rubric import RubricSpec

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

_END = object()


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

    def visible(self, text: str, final: bool) -> str:
        return text if self.tools is None else self.tools.visible(text, final)

    def final(self, result: RainResult) -> tuple[str, dict[str, Any]]:
        """The answer's text and ``additional_kwargs`` (stats, and tool calls if any)."""
        extra = _stats(result)
        if self.tools is not None:
            extra["tool_calls"], extra["invalid_tool_calls"] = self.tools.parse(result.text)
        return self.visible(result.text, final=True), extra


class RainLLM(FunctionCallingLLM):
    """A LlamaIndex LLM whose every answer is found by RAIN's self-evaluated search.

    Build it from a model id or path (``RainLLM("HuggingFaceTB/SmolLM2-135M-Instruct")``),
    a loaded transformers model and tokenizer (``RainLLM(model, tokenizer)``), an
    existing engine (``RainLLM(engine=engine)``) or the embedded default
    (``RainLLM.from_default()``, also what ``RainLLM()`` does). Models named by
    id or path go through :func:`shared_core.load_engine`, so every RainLLM and
    ChatRain in the process shares one copy of the weights.

    The rubric of a call is, in order: the ``rubric=`` keyword of the endpoint,
    the innermost :func:`rain_rubric` block, the instance's ``rubric``. Other
    keywords (``config=``, ``max_new_tokens=``, ``T=``, ...) are RainConfig
    overrides for that call.

    ``complete`` sends the prompt as one user message through the model's chat
    template, streaming or not; with ``formatted=False`` the instance's
    ``completion_to_prompt`` (identity by default) and ``system_prompt`` are
    applied first, with ``formatted=True`` the prompt is sent as given. ``chat``
    sends the messages as they are (``LLM.predict`` already adds ``system_prompt``).

    Tools (``chat_with_tools``, ``FunctionAgent``) are described in the system
    prompt; the model calls one as ``<tool_call>{"name": ..., "arguments": {...}}
    </tool_call>`` and the call lands in ``message.additional_kwargs["tool_calls"]``.
    A required call (``tool_required=True`` or ``tool_choice``) is constrained by
    a JSON-schema grammar, so it is always valid for the tool's parameters.

    Streaming yields one response per committed token set that adds visible text
    (``delta`` + cumulative ``text``; a tool call is held back, never streamed),
    then a last one (usually ``delta=""``) carrying the search statistics. The
    final response's ``additional_kwargs`` hold ``rubric``, ``iterations``,
    ``commits``, ``rewinds``, ``final_score``, ``rain_stats`` and ``rain_trace``.
    """

    model: str = Field(default="", description="Name of the model the engine runs.")
    gguf_file: str | None = Field(default=None, description="GGUF file inside `model`, if any.")
    rubric: str = Field(default="", description="Name of the default rubric.")
    config: dict[str, Any] = Field(
        default_factory=dict, description="The default RainConfig, as a dict."
    )

    _engine: RainEngine = PrivateAttr()
    _default_rubric: Rubric = PrivateAttr()
    _config: RainConfig = PrivateAttr()

    def __init__(
        self,
        model: str | Path | Any = None,
        tokenizer: Any = None,
        *,
        engine: RainEngine | None = None,
        gguf_file: str | None = None,
        rubric: RubricSpec | None = None,
        config: RainConfig | Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        engine = _build_engine(model, tokenizer, engine, gguf_file)
        default_rubric = engine.resolve_rubric(rubric)
        resolved = engine.resolve_config(config)
        fields: dict[str, Any] = {
            "model": engine.model_name,
            "gguf_file": gguf_file,
            "rubric": default_rubric.name,
            "config": resolved.model_dump(),
        }
        super().__init__(**fields, **kwargs)
        self._engine = engine
        self._default_rubric = default_rubric
        self._config = resolved

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
        return LLMMetadata(
            context_window=self._engine.context_window,
            num_output=self._config.max_new_tokens,
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
        spec = kwargs.pop("rubric", None)
        rubric = get_rubric(spec) if spec is not None else (_RUBRIC.get() or self._default_rubric)
        config = kwargs.pop("config", None)
        cfg = self._config if config is None else self._engine.resolve_config(config)
        cfg = cfg.merged(**kwargs) if kwargs else cfg
        grammar = tools.grammar() if tools is not None else None
        cancel = threading.Event()
        stream = self._engine.stream(
            messages, rubric=rubric, config=cfg, cancel=cancel, grammar=grammar
        )
        return _Call(stream=stream, cancel=cancel, rubric=rubric, tools=tools)

    def _start_chat(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> _Call:
        tools = plan_tools(
            kwargs.pop("tools", None),
            bool(kwargs.pop("tool_required", False)),
            kwargs.pop("tool_choice", None),
        )
        return self._start(_to_engine_messages(messages, tools), kwargs, tools)

    def _completion_messages(self, prompt: str, formatted: bool) -> list[dict[str, str]]:
        if not isinstance(prompt, str) or not prompt.strip():
            raise RainInputError(
                f"the prompt is empty ({prompt!r:.40}); pass the text the model should answer"
            )
        if formatted:
            return [{"role": "user", "content": prompt}]
        text = self.completion_to_prompt(prompt) if self.completion_to_prompt else prompt
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*msgs, {"role": "user", "content": text}]

    @staticmethod
    def _chunks(call: _Call) -> Generator[_Chunk, None, None]:
        """Committed token sets as (delta, text, extra); the stats ride on a last chunk."""
        raw, shown = "", ""
        try:
            for commit in call.stream:
                raw += commit.text
                visible = call.visible(raw, final=False)
                if len(visible) > len(shown):
                    delta, shown = visible[len(shown) :], visible
                    yield delta, shown, {"commit": commit.index, "value": commit.value}
            text, extra = call.final(call.stream.result)
            yield text[len(shown) :], text, extra
        finally:
            call.stream.close()

    @staticmethod
    def _run(call: _Call) -> RainResult:
        for _ in call.stream:
            pass
        return call.stream.result

    @staticmethod
    async def _arun(call: _Call) -> RainResult:
        try:
            return await asyncio.to_thread(RainLLM._run, call)
        except asyncio.CancelledError:
            call.cancel.set()  # the worker thread stops within one forward pass
            raise

    @staticmethod
    async def _achunks(call: _Call) -> AsyncIterator[_Chunk]:
        """``_chunks`` produced by a worker thread, so the event loop never blocks."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop closed: nobody is listening any more
                call.cancel.set()

        def produce() -> None:
            chunks = RainLLM._chunks(call)
            try:
                for chunk in chunks:
                    if call.cancel.is_set():
                        break
                    put(chunk)
            except BaseException as exc:  # handed to the consumer, raised there
                put(exc)
            finally:
                chunks.close()  # releases the engine's cached prefixes now, in this thread
                put(_END)

        threading.Thread(target=produce, name="rain-search", daemon=True).start()
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            # Cancelled or closed early: stop the search instead of finishing unheard.
            call.cancel.set()

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


def _build_engine(
    model: Any, tokenizer: Any, engine: RainEngine | None, gguf_file: str | None
) -> RainEngine:
    """The engine for the constructor's arguments; ids and paths go through the shared cache."""
    if engine is not None:
        if model is not None or tokenizer is not None:
            raise RainError("pass either engine= or model/tokenizer to RainLLM, not both")
        if not isinstance(engine, RainEngine):
            raise RainError(f"engine= must be a RainEngine, got {type(engine).__name__}")
        return engine
    if model is None:
        if tokenizer is not None:
            raise RainError("RainLLM got a tokenizer without a model; pass model= as well")
        return load_engine()
    if isinstance(model, str | Path):
        if tokenizer is not None:
            raise RainError(
                "a tokenizer goes with a loaded model object; with a model id or path "
                "RainLLM loads the tokenizer itself"
            )
        return load_engine(model, gguf_file)
    if tokenizer is None:
        raise RainError(
            f"RainLLM got a loaded model ({type(model).__name__}) without its tokenizer; "
            "pass tokenizer= too, or a model id/path instead"
        )
    return RainEngine(model=model, tokenizer=tokenizer)
