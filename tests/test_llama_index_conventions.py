"""RainLLM follows llama-index-core 0.14: structured prediction (four ways, grammar-constrained),
FunctionAgent and AgentWorkflow with two tools, and Settings.llm in a chat engine with memory.

The tiny random model shows that the grammar alone makes objects valid; a scripted model
(its answers known in advance) runs agent loops in which the model itself picks the tools;
the embedded SmolLM2 runs structured prediction as a user would (integration).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Literal

import pytest
from llama_index.core import Settings
from llama_index.core.agent.workflow import AgentWorkflow, FunctionAgent
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.chat_engine import SimpleChatEngine
from llama_index.core.memory import ChatMemoryBuffer
from llama_index.core.prompts import PromptTemplate
from llama_index.core.tools import FunctionTool
from pydantic import BaseModel

from llama_index_rain import RainLLM, rain_rubric
from shared_core import RainEngine
from shared_core.models.scripted import ScriptedLM, choice_table
from tests.scripted import TINY_SEARCH, ScriptedEvaluator

QUICK = {**TINY_SEARCH, "simulation_max_tokens": 2, "max_new_tokens": 40}
PROMPT = PromptTemplate("Which town hosts the {event}?")


class Festival(BaseModel):
    """A town and whether its festival is in summer."""

    town: Literal["Rainville", "Eastport"]
    summer: bool


@pytest.fixture(scope="module")
def llm(tiny_engine: RainEngine) -> RainLLM:
    return RainLLM(engine=tiny_engine, config=QUICK)


def _valid(obj: Any) -> None:
    assert isinstance(obj, Festival)
    Festival.model_validate(obj.model_dump())


async def test_structured_prediction_four_ways_is_valid_from_a_random_model(llm: RainLLM) -> None:
    _valid(llm.structured_predict(Festival, PROMPT, event="Zorblat festival"))
    _valid(await llm.astructured_predict(Festival, PROMPT, event="ferry race"))
    # The streaming programs ask for the class's tool without requiring it; RainLLM names
    # it as the tool choice, so the streamed object is constrained too.
    parts = list(llm.stream_structured_predict(Festival, PROMPT, event="Zorblat festival"))
    assert parts
    _valid(parts[-1])
    agen = await llm.astream_structured_predict(Festival, PROMPT, event="ferry race")
    aparts = [p async for p in agen]
    assert aparts
    _valid(aparts[-1])


async def test_as_structured_llm_chat_stream_and_async(llm: RainLLM) -> None:
    sllm = llm.as_structured_llm(Festival)
    question = [ChatMessage(role="user", content="Which town hosts the festival?")]
    response = sllm.chat(question)
    _valid(response.raw)
    assert Festival.model_validate_json(response.message.content or "")
    streamed = list(sllm.stream_chat(question))
    assert streamed
    _valid(streamed[-1].raw)
    _valid((await sllm.achat(question)).raw)
    with rain_rubric("truthful"):  # the rubric reaches the LLM through the program
        _valid(sllm.complete("Which town?").raw)


@pytest.mark.integration
async def test_structured_prediction_on_the_embedded_model(default_engine: RainEngine) -> None:
    # SmolLM2-135M's object is valid for the schema by construction; whether its town is
    # the right one is not asserted (a 135M model guesses).
    llm = RainLLM(engine=default_engine, config={**TINY_SEARCH, "max_new_tokens": 32})
    prompt = PromptTemplate(
        "The Zorblat festival is held in Rainville every July. Which town hosts it, and is "
        "it in summer? {note}"
    )
    _valid(llm.structured_predict(Festival, prompt, note=""))
    parts = list(llm.stream_structured_predict(Festival, prompt, note=""))
    _valid(parts[-1])
    _valid(llm.as_structured_llm(Festival).complete(prompt.format(note="")).raw)


# --- agents: a scripted model that chooses its tools ---------------------------------------
def weather(city: str) -> str:
    """Return today's weather for a city."""
    return f"It is sunny in {city}."


def local_time(city: str) -> str:
    """Return the local time in a city."""
    return f"It is noon in {city}."


TOOLS = [FunctionTool.from_defaults(fn=weather), FunctionTool.from_defaults(fn=local_time)]


def _agent_script(context: str) -> Mapping[str, float]:
    """Calls weather, then local_time (bare JSON calls), then answers with both results."""
    if "It is sunny in Paris" not in context:
        answer = '{"name": "weather", "arguments": {"city": "Paris"}}'
    elif "It is noon in Paris" not in context:
        answer = '{"name": "local_time", "arguments": {"city": "Paris"}}'
    else:
        answer = "Sunny, and it is noon in Paris."
    return choice_table({answer: 1.0})(context)


def _scripted(next_fn: Any) -> RainLLM:
    engine = RainEngine(
        backend=ScriptedLM(next_fn),
        evaluator=ScriptedEvaluator(lambda text: 1.0),
        config={**TINY_SEARCH, "max_new_tokens": 80},
    )
    return RainLLM(engine=engine)


def _called(events: list[Any]) -> list[str]:
    return [e.tool_name for e in events if type(e).__name__ == "ToolCallResult"]


async def test_function_agent_with_two_tools_over_several_steps() -> None:
    agent = FunctionAgent(tools=TOOLS, llm=_scripted(_agent_script))
    handler = agent.run(user_msg="Weather and time in Paris?")
    events = [ev async for ev in handler.stream_events()]
    result = await handler
    assert _called(events) == ["weather", "local_time"]
    assert str(result) == "Sunny, and it is noon in Paris."


async def test_agent_workflow_with_two_tools() -> None:
    workflow = AgentWorkflow.from_tools_or_functions(TOOLS, llm=_scripted(_agent_script))
    handler = workflow.run(user_msg="Weather and time in Paris?")
    events = [ev async for ev in handler.stream_events()]
    result = await handler
    assert _called(events) == ["weather", "local_time"]
    assert "noon" in str(result)


# --- Settings.llm in a chat engine with memory ----------------------------------------------
def _memory_script(context: str) -> Mapping[str, float]:
    """Answers the first turn plainly and shows, on later turns, that it saw the first."""
    seen = "[assistant]Noted: rain." in context
    return choice_table({"I remember: rain." if seen else "Noted: rain.": 1.0})(context)


@pytest.fixture
def settings_llm() -> Iterator[RainLLM]:
    llm = _scripted(_memory_script)
    before = Settings._llm
    Settings.llm = llm
    try:
        yield llm
    finally:
        Settings._llm = before


def test_settings_llm_through_a_chat_engine_with_memory(settings_llm: RainLLM) -> None:
    memory = ChatMemoryBuffer.from_defaults(token_limit=2000)
    engine = SimpleChatEngine.from_defaults(memory=memory)  # takes Settings.llm
    assert engine._llm is settings_llm
    first = engine.chat("My favourite weather is rain.")
    assert str(first) == "Noted: rain."
    second = engine.chat("What is my favourite weather?")
    assert str(second) == "I remember: rain."  # the first turn reached the model
    history = [(m.role.value, m.content) for m in memory.get_all()]
    assert history == [
        ("user", "My favourite weather is rain."),
        ("assistant", "Noted: rain."),
        ("user", "What is my favourite weather?"),
        ("assistant", "I remember: rain."),
    ]
    streamed = engine.stream_chat("And again?")
    assert "".join(streamed.response_gen) == "I remember: rain."
