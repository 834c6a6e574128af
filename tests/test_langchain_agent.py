"""ChatRain on the real SmolLM2 inside LangChain: an agent that calls a tool, the README.

SmolLM2-135M seldom decides on its own to call a tool, so the agent forces the
first call (``tool_choice="any"``, grammar-constrained) and answers in text once
the tool has replied, as a production agent around a small model would.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import ModelRequest, ModelResponse, wrap_model_call
from langchain_core.messages import AIMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool

from langchain_rain import ChatRain
from tests.scripted import TINY_SEARCH

pytestmark = pytest.mark.integration


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


def test_readme_snippet_runs(default_engine: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """Runs the README's LangChain snippet as written, on the real SmolLM2."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    match = README_SNIPPET.search(readme)
    assert match, "README.md lost its '## LangChain' python snippet"
    exec(compile(match.group(1), "README.md", "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out
    assert "positive" in printed and "truthful" in printed
