"""RainLLM on the tiny random model: every endpoint, metadata, rubric resolution, errors."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Literal

import pytest
from llama_index.core.base.llms.types import ChatMessage, ImageBlock, TextBlock
from llama_index.core.instrumentation.events.llm import (
    LLMChatEndEvent,
    LLMChatInProgressEvent,
    LLMChatStartEvent,
    LLMCompletionEndEvent,
    LLMCompletionInProgressEvent,
    LLMCompletionStartEvent,
)
from llama_index.core.llms import LLM
from llama_index.core.prompts import PromptTemplate
from llama_index.core.tools import FunctionTool
from pydantic import BaseModel

from llama_index_rain import RainLLM, current_rain_rubric, rain_rubric
from llama_index_rain._tools import plan_tools
from llama_index_rain.base import _to_engine_messages
from shared_core import (
    RainConfigError,
    RainError,
    RainInputError,
    Rubric,
    RubricError,
    get_rubric,
    load_engine,
)
from tests.llama_index_events import EventLog, attached

# A minimal search: every call still expands, simulates, self-evaluates and commits.
QUICK = {
    "num_candidates": 2,
    "T": 2,
    "min_new_iterations": 1,
    "T_m": 1,
    "max_new_tokens": 4,
    "simulation_max_tokens": 2,
    "similarity_update": False,
    "dynamic_addition": False,
}
HI = [ChatMessage(role="user", content="Say something kind.")]


_Events = EventLog


@pytest.fixture
def events() -> Iterator[_Events]:
    with attached(_Events()) as handler:
        yield handler


@pytest.fixture(scope="module")
def llm(tiny_engine) -> RainLLM:
    return RainLLM(engine=tiny_engine, config=QUICK)


# --- construction and metadata -------------------------------------------------------------
def test_metadata_is_true(llm: RainLLM, tiny_engine) -> None:
    meta = llm.metadata
    assert isinstance(llm, LLM)
    assert meta.context_window == tiny_engine.context_window == 4096
    assert meta.num_output == QUICK["max_new_tokens"]
    assert meta.is_chat_model is True
    assert meta.is_function_calling_model is True
    assert meta.model_name == "tiny-random-llama"
    assert llm.rubric == tiny_engine.default_rubric.name
    assert RainLLM(engine=tiny_engine, config={"preset": "fast"}).metadata.num_output == 256


def test_construction_from_model_and_tokenizer(tiny_model, smol_tokenizer) -> None:
    llm = RainLLM(tiny_model, smol_tokenizer, rubric="positive", config=QUICK)
    assert llm.metadata.model_name == "tiny-random-llama"
    assert llm.rubric == "positive"
    assert llm.engine.backend.model is tiny_model


def test_model_ids_share_one_engine_through_load_engine(tiny_engine) -> None:
    # Seed the process-wide cache under an id, as a first loader would.
    load_engine("li-test/tiny", factory=lambda: tiny_engine)
    a, b = RainLLM("li-test/tiny"), RainLLM(model="li-test/tiny", rubric="truthful")
    assert a.engine is b.engine is tiny_engine
    # The LangChain adapter resolves the same id to the same engine: weights load once.
    from langchain_rain import ChatRain

    assert ChatRain(model="li-test/tiny").rain_engine is tiny_engine


def test_construction_errors(tiny_model, smol_tokenizer, tiny_engine) -> None:
    with pytest.raises(RainError, match="without its tokenizer"):
        RainLLM(tiny_model)
    with pytest.raises(RainError, match="tokenizer without a model"):
        RainLLM(tokenizer=smol_tokenizer)
    with pytest.raises(RainError, match="not both"):
        RainLLM(tiny_model, engine=tiny_engine)
    with pytest.raises(RubricError, match="harmless"):
        RainLLM(engine=tiny_engine, rubric="no-such-rubric")
    with pytest.raises(RainConfigError, match="T_m"):
        RainLLM(engine=tiny_engine, config={"T": 2, "T_m": 3})


# --- the eight calling endpoints -------------------------------------------------------------
def test_complete_and_stream_complete_agree(llm: RainLLM, events: _Events) -> None:
    full = llm.complete("Tell me about rain.")
    chunks = list(llm.stream_complete("Tell me about rain."))
    assert full.additional_kwargs["iterations"] > 0
    assert full.additional_kwargs["commits"] == len(full.additional_kwargs["rain_trace"])
    assert {"rewinds", "final_score", "rain_stats"} <= full.additional_kwargs.keys()
    # Same prompt formatting and seed: the streamed answer is the same answer.
    assert "".join(c.delta or "" for c in chunks) == chunks[-1].text == full.text
    assert all(c.delta for c in chunks[:-1])
    assert chunks[-1].delta == "" and chunks[-1].additional_kwargs["rubric"] == "harmless"
    assert len(events.of(LLMCompletionStartEvent)) == 2
    assert len(events.of(LLMCompletionEndEvent)) == 2
    assert len(events.of(LLMCompletionInProgressEvent)) == len(chunks)


def test_chat_and_stream_chat_agree(llm: RainLLM, events: _Events) -> None:
    full = llm.chat(HI)
    chunks = list(llm.stream_chat(HI))
    assert full.message.role == "assistant"
    assert chunks[-1].message.content == full.message.content
    assert "".join(c.delta or "" for c in chunks) == full.message.content
    assert full.additional_kwargs["model"] == "tiny-random-llama"
    assert len(events.of(LLMChatStartEvent)) == len(events.of(LLMChatEndEvent)) == 2
    assert len(events.of(LLMChatInProgressEvent)) == len(chunks)


def test_complete_is_chat_with_one_user_message(llm: RainLLM) -> None:
    done = llm.complete("Tell me about rain.", formatted=True)
    said = llm.chat([ChatMessage(role="user", content="Tell me about rain.")])
    assert done.text == said.message.content
    assert done.additional_kwargs["prompt_tokens"] == said.additional_kwargs["prompt_tokens"]
    # formatted=False applies system_prompt as a system message.
    with_system = RainLLM(engine=llm.engine, config=QUICK, system_prompt="Be brief.")
    sys_done = with_system.complete("Tell me about rain.")
    sys_said = llm.chat(
        [
            ChatMessage(role="system", content="Be brief."),
            ChatMessage(role="user", content="Tell me about rain."),
        ]
    )
    assert sys_done.text == sys_said.message.content
    assert (
        sys_done.additional_kwargs["prompt_tokens"] == sys_said.additional_kwargs["prompt_tokens"]
    )
    assert sys_done.additional_kwargs["prompt_tokens"] != done.additional_kwargs["prompt_tokens"]


async def test_async_endpoints_agree_with_sync(llm: RainLLM, events: _Events) -> None:
    achat = await llm.achat(HI)
    sync = achat.message.content
    astream = [c async for c in await llm.astream_chat(HI)]
    acomp = await llm.acomplete("Say something kind.")
    acomp_chunks = [c async for c in await llm.astream_complete("Say something kind.")]
    assert astream[-1].message.content == sync
    assert "".join(c.delta or "" for c in astream) == sync
    assert acomp.text == acomp_chunks[-1].text == sync
    assert acomp_chunks[-1].additional_kwargs["iterations"] > 0
    assert len(events.of(LLMChatEndEvent)) == 2
    assert len(events.of(LLMCompletionEndEvent)) == 2


async def test_async_runs_off_the_event_loop(llm: RainLLM) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    started = time.monotonic()
    await llm.achat(HI, max_new_tokens=24, T=4, min_new_iterations=3)
    elapsed = time.monotonic() - started
    task.cancel()
    assert elapsed > 0.1, "the search was too short to tell"
    assert ticks >= 5  # the loop kept turning while the search ran


async def test_cancelling_a_task_stops_the_search(llm: RainLLM) -> None:
    work = llm.engine.backend.work
    big = {"max_new_tokens": 400, "T": 50, "min_new_iterations": 15}
    task = asyncio.create_task(llm.achat(HI, **big))
    await asyncio.sleep(1.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(1.0)  # one forward pass at most finishes after the cancel
    before = work.forward_calls
    await asyncio.sleep(0.5)
    assert work.forward_calls == before

    gen = await llm.astream_chat(HI, **big)
    first = await anext(gen)
    assert first.delta
    await gen.aclose()
    deadline = time.monotonic() + 5
    while any(t.name == "rain-search" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the search thread outlived its stream"
        await asyncio.sleep(0.05)


# --- rubric per call -------------------------------------------------------------------------
def test_rubric_keyword_beats_context_beats_default(llm: RainLLM) -> None:
    assert current_rain_rubric() is None
    assert llm.complete("Hi").additional_kwargs["rubric"] == "harmless"
    with rain_rubric("positive") as rub:
        assert isinstance(rub, Rubric) and current_rain_rubric() is rub
        assert llm.complete("Hi").additional_kwargs["rubric"] == "positive"
        assert llm.complete("Hi", rubric="truthful").additional_kwargs["rubric"] == "truthful"
        with rain_rubric(get_rubric("truthful")):
            assert current_rain_rubric() is get_rubric("truthful")
        assert current_rain_rubric() is rub
    assert current_rain_rubric() is None
    custom = {"preset": "positive", "name": "my-positive"}
    assert llm.complete("Hi", rubric=custom).additional_kwargs["rubric"] == "my-positive"


async def test_stream_keeps_the_rubric_it_was_created_under(llm: RainLLM) -> None:
    with rain_rubric("positive"):
        gen = llm.stream_complete("Hi")
        agen = await llm.astream_chat(HI)
    assert list(gen)[-1].additional_kwargs["rubric"] == "positive"
    assert [c async for c in agen][-1].additional_kwargs["rubric"] == "positive"


# --- bad input ------------------------------------------------------------------------------
async def test_bad_input_raises_clear_errors(llm: RainLLM) -> None:
    with pytest.raises(RubricError, match="harmless"):
        llm.complete("Hi", rubric="no-such-rubric")
    with pytest.raises(RubricError, match="harmless"), rain_rubric("no-such-rubric"):
        pass
    with pytest.raises(RainInputError, match="empty"):
        llm.complete("   ")
    with pytest.raises(RainInputError, match="empty"):
        await llm.acomplete("")
    with pytest.raises(RainInputError, match="no text"):
        llm.chat([ChatMessage(role="user", content="")])
    too_long = "rain " * 5000
    with pytest.raises(RainInputError, match="context window"):
        llm.complete(too_long)
    with pytest.raises(RainInputError, match="context window"):
        llm.stream_chat([ChatMessage(role="user", content=too_long)])  # raised at the call
    with pytest.raises(RainInputError, match="context window"):
        await llm.astream_complete(too_long)
    with pytest.raises(RainConfigError, match=r"unknown option 'temprature'.*did you mean"):
        llm.complete("Hi", temprature=0.5)
    with pytest.raises(RainInputError, match=r"accepted options: .*max_new_tokens"):
        llm.chat(HI, bogus_option=1)
    image = ChatMessage(
        role="user", blocks=[TextBlock(text="What is this?"), ImageBlock(url="http://x/y.png")]
    )
    with pytest.raises(RainInputError, match="text only"):
        llm.chat([image])


# --- function calling ------------------------------------------------------------------------
class FestivalArgs(BaseModel):
    town: Literal["Rainville", "Eastport"]


def festival_month(town: str) -> str:
    """The month of a town's festival."""
    return "October" if town == "Rainville" else "May"


# An enum argument keeps the constrained call short even for the random model.
FESTIVAL = FunctionTool.from_defaults(fn=festival_month, fn_schema=FestivalArgs)
TOOLS_CFG = {**QUICK, "max_new_tokens": 32}


def test_required_tool_call_is_grammar_constrained(llm: RainLLM) -> None:
    response = llm.chat_with_tools(
        [FESTIVAL], user_msg="When is the festival in Rainville?", tool_required=True, **TOOLS_CFG
    )
    (call,) = llm.get_tool_calls_from_response(response)
    assert call.tool_name == "festival_month"
    assert call.tool_kwargs["town"] in ("Rainville", "Eastport")
    assert response.message.content == ""  # the whole answer was the call
    out = llm.predict_and_call([FESTIVAL], "When is it?", tool_required=True, **TOOLS_CFG)
    assert out.response in ("October", "May") and not out.sources[0].is_error


async def test_structured_predict_returns_a_valid_object(llm: RainLLM) -> None:
    # LlamaIndex turns the class into a required tool call: the grammar makes it valid.
    prompt = PromptTemplate("Which town hosts the {event}?")
    got = llm.structured_predict(
        FestivalArgs, prompt, llm_kwargs={"max_new_tokens": 32}, event="Zorblat festival"
    )
    assert isinstance(got, FestivalArgs)
    got = await llm.astructured_predict(
        FestivalArgs, prompt, llm_kwargs={"max_new_tokens": 32}, event="ferry race"
    )
    assert isinstance(got, FestivalArgs)


async def test_streamed_tool_call_arrives_whole_in_the_last_chunk(llm: RainLLM) -> None:
    gen = await llm.astream_chat_with_tools(
        [FESTIVAL], user_msg="Festival month?", tool_choice="festival_month", **TOOLS_CFG
    )
    chunks = [c async for c in gen]
    assert all(not c.delta for c in chunks)  # no half-written call leaks out as text
    assert [s.tool_name for s in llm.get_tool_calls_from_response(chunks[-1])] == ["festival_month"]
    assert all(not llm.get_tool_calls_from_response(c, False) for c in chunks[:-1])


def test_free_text_answer_without_a_call(llm: RainLLM) -> None:
    response = llm.chat_with_tools([FESTIVAL], user_msg="Hi", **QUICK)
    assert llm.get_tool_calls_from_response(response, error_on_no_tool_call=False) == []
    with pytest.raises(ValueError, match="tool_required=True"):
        llm.get_tool_calls_from_response(response)


def test_tool_text_protocol_round_trip(tiny_engine) -> None:
    plan = plan_tools([FESTIVAL], tool_required=False, tool_choice=None)
    assert plan is not None and plan.required is None
    text = 'Let me check.<tool_call>{"name": "festival_month", "arguments": {"town": "Eastport"}}'
    calls, invalid = plan.parse(text + "</tool_call>")
    assert [(c["name"], c["arguments"]) for c in calls] == [
        ("festival_month", {"town": "Eastport"})
    ]
    assert not invalid
    assert plan.visible(text, final=False) == "Let me check."
    assert plan.visible("Let me check.<tool", final=False) == "Let me check."  # maybe a tag
    assert plan.visible("a < b", final=True) == "a < b"
    _, bad = plan.parse('<tool_call>{"name": "nope", "arguments": {}}</tool_call>')
    assert "festival_month" in bad[0]["error"]
    # An earlier call and its result are shown to the model in the same format.
    history = [
        ChatMessage(role="user", content="When is the festival?"),
        ChatMessage(role="assistant", content="", additional_kwargs={"tool_calls": calls}),
        ChatMessage(role="tool", content="May", additional_kwargs={"tool_call_id": "x"}),
    ]
    msgs = _to_engine_messages(history, plan)
    assert msgs[0]["role"] == "system" and "festival_month" in msgs[0]["content"]
    assert msgs[2]["content"].startswith('<tool_call>{"name": "festival_month"')
    prompt = tiny_engine.backend.decode(tiny_engine.prompt_ids(msgs))
    assert "<tool_call>" in prompt and "May" in prompt
    with pytest.raises(RainInputError, match="names no given tool"):
        plan_tools([FESTIVAL], tool_required=False, tool_choice="weather")
