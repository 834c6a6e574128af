"""ChatRain inside LangChain agents, structured output on the real SmolLM2, the README.

SmolLM2-135M seldom decides on its own to call a tool, so its agents force each
call (``tool_choice``, grammar-constrained) and answer in text once the tools have
replied, as a production agent around a small model would. A scripted model (its
answers known in advance) runs a two-tool loop in which the model itself chooses.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import ModelRequest, ModelResponse, wrap_model_call
from langchain_core.messages import AIMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel

from langchain_rain import ChatRain
from shared_core import RainEngine
from shared_core.models.scripted import ScriptedLM, choice_table
from tests.scripted import TINY_SEARCH, ScriptedEvaluator


@tool
def get_weather(city: str) -> str:
    """Return today's weather for a city."""
    return f"It is sunny and 21 degrees in {city}."


@wrap_model_call
def call_a_tool_first(
    request: ModelRequest, handler: Callable[[ModelRequest], ModelResponse]
) -> ModelResponse:
    """Force a tool call until a tool has answered, then let the model reply in text."""
    if any(isinstance(m, ToolMessage) for m in request.messages):
        # A 135M model shown a tool call in the history tends to repeat it: the
        # answer turn is given no tools.
        nudge = SystemMessage("Answer the user in one plain sentence using the tool result.")
        return handler(request.override(tools=[], tool_choice=None, system_message=nudge))
    return handler(request.override(tool_choice="any"))


@tool
def get_time(city: str) -> str:
    """Return the local time in a city."""
    return f"It is noon in {city}."


# The two-tool agent on SmolLM2: a city from a list keeps each constrained call short.
@tool("get_weather")
def weather_in(city: Literal["Paris", "Rome"]) -> str:
    """Return today's weather for a city."""
    return f"It is sunny and 21 degrees in {city}."


@tool("get_time")
def time_in(city: Literal["Paris", "Rome"]) -> str:
    """Return the local time in a city."""
    return f"It is noon in {city}."


@wrap_model_call
def call_each_tool_once(
    request: ModelRequest, handler: Callable[[ModelRequest], ModelResponse]
) -> ModelResponse:
    """Force the next tool not yet called (by name); answer in text once all have replied."""
    called = {m.name for m in request.messages if isinstance(m, ToolMessage)}
    todo = [t for t in request.tools if getattr(t, "name", None) not in called]
    if not todo:
        nudge = SystemMessage("Answer the user in one plain sentence using the tool results.")
        return handler(request.override(tools=[], tool_choice=None, system_message=nudge))
    return handler(request.override(tool_choice=getattr(todo[0], "name", None)))


def _tool_names(messages: list[Any]) -> list[str]:
    return [c["name"] for m in messages if isinstance(m, AIMessage) for c in m.tool_calls]


@pytest.mark.integration
def test_create_agent_calls_two_tools_over_several_steps(default_engine: Any) -> None:
    # 24 tokens: room for a whole call ({"name": "get_weather", "arguments": {...}}).
    model = ChatRain(rain_config=TINY_SEARCH, max_tokens=24)
    agent = create_agent(model, tools=[weather_in, time_in], middleware=[call_each_tool_once])
    state = agent.invoke(
        {"messages": [("user", "What are the weather and the time in Paris?")]},
        config={"configurable": {"rubric": "truthful"}, "recursion_limit": 10},
    )
    messages = state["messages"]
    assert _tool_names(messages) == ["get_weather", "get_time"]
    results = [str(m.content) for m in messages if isinstance(m, ToolMessage)]
    assert "sunny" in results[0] and "noon" in results[1]
    steps = [m for m in messages if isinstance(m, AIMessage)]
    assert len(steps) == 3  # call, call, answer: three model steps
    assert not steps[-1].tool_calls and str(steps[-1].content).strip()
    assert all(m.response_metadata["rubric"] == "truthful" for m in steps)


def _agent_script(context: str) -> Any:
    """A model that calls get_weather, then get_time, then answers: its own choices."""
    if "Result of get_weather" not in context:
        answer = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    elif "Result of get_time" not in context:
        answer = '{"name": "get_time", "arguments": {"city": "Paris"}}'
    else:
        answer = "It is sunny and noon in Paris."
    return choice_table({answer: 1.0})(context)


def test_create_agent_loop_where_the_model_chooses_two_tools() -> None:
    engine = RainEngine(
        backend=ScriptedLM(_agent_script),
        evaluator=ScriptedEvaluator(lambda text: 1.0),
        config={**TINY_SEARCH, "max_new_tokens": 80},
    )
    agent = create_agent(ChatRain(engine=engine), tools=[get_weather, get_time])
    state = agent.invoke(
        {"messages": [("user", "Weather and time in Paris?")]},
        config={"configurable": {"rubric": "positive"}, "recursion_limit": 10},
    )
    messages = state["messages"]
    assert _tool_names(messages) == ["get_weather", "get_time"]
    assert [m.content for m in messages if isinstance(m, ToolMessage)] == [
        "It is sunny and 21 degrees in Paris.",
        "It is noon in Paris.",
    ]
    final = messages[-1]
    assert isinstance(final, AIMessage) and final.content == "It is sunny and noon in Paris."
    assert final.response_metadata["rubric"] == "positive"


class Forecast(BaseModel):
    """A short forecast."""

    sky: Literal["sunny", "cloudy", "rainy"]
    warm: bool


@pytest.mark.integration
@pytest.mark.parametrize("method", ["function_calling", "json_schema", "json_mode"])
def test_structured_output_on_the_embedded_model(default_engine: Any, method: str) -> None:
    # Grammar-constrained: SmolLM2-135M's object is always valid for the schema (whether
    # its choice of sky fits the prompt is not asserted: a 135M model guesses).
    model = ChatRain(rain_config=TINY_SEARCH, max_tokens=32)
    structured = model.with_structured_output(Forecast, method=method, include_raw=True)
    out = structured.invoke("It is raining and cold today. Give the forecast as JSON.")
    assert out["parsing_error"] is None
    assert isinstance(out["parsed"], Forecast)
    assert out["raw"].response_metadata["model_provider"] == "rain"


@pytest.mark.integration
def test_create_agent_calls_a_tool(default_engine: Any) -> None:
    model = ChatRain(rain_config=TINY_SEARCH, max_tokens=24)
    agent = create_agent(model, tools=[get_weather], middleware=[call_a_tool_first])
    state = agent.invoke(
        {"messages": [("user", "What is the weather in Paris?")]},
        config={"configurable": {"rubric": "truthful"}, "recursion_limit": 6},
    )
    messages = state["messages"]
    calls = [c for m in messages if isinstance(m, AIMessage) for c in m.tool_calls]
    assert calls and calls[0]["name"] == "get_weather"
    assert isinstance(calls[0]["args"]["city"], str)
    results = [m for m in messages if isinstance(m, ToolMessage)]
    assert results and "sunny" in str(results[0].content)
    final = messages[-1]
    assert isinstance(final, AIMessage) and not final.tool_calls
    assert final.response_metadata["rubric"] == "truthful"  # reached the model via config


README_SNIPPET = re.compile(r"## LangChain\n.*?```python\n(.*?)```", re.DOTALL)


@pytest.mark.integration
def test_readme_snippet_runs(default_engine: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """Runs the README's LangChain snippet as written, on the real SmolLM2."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    match = README_SNIPPET.search(readme)
    assert match, "README.md lost its '## LangChain' python snippet"
    exec(compile(match.group(1), "README.md", "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out
    assert "positive" in printed and "truthful" in printed
