"""ChatRain's side of tool calling: LangChain tools in, ToolCall / InvalidToolCall out.

The wire format, prompt, schema, parsing and stream gate are
:mod:`shared_core.tools`; this module only translates LangChain's types.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.messages import InvalidToolCall, ToolCall
from langchain_core.utils.function_calling import convert_to_openai_tool

from shared_core.errors import RainInputError
from shared_core.tools import ToolSet, function_spec, tool_set

__all__ = ["parse_tool_calls", "resolve_tools"]


def resolve_tools(tools: Sequence[Any] | None, tool_choice: Any) -> ToolSet | None:
    """LangChain tools (any form ``bind_tools`` takes) and ``tool_choice`` as a ToolSet.

    The choice is read by :func:`shared_core.tools.tool_set`, as RainLLM reads it.
    """
    specs: list[dict[str, Any]] = []
    for tool in tools or ():
        try:
            fn = convert_to_openai_tool(tool)["function"]
        except Exception as exc:
            raise RainInputError(
                f"cannot use {tool!r:.80} as a tool: {exc}; pass a BaseTool, a function, "
                "a pydantic class, a TypedDict or an OpenAI tool dict"
            ) from exc
        specs.append(function_spec(fn))
    return tool_set(specs, tool_choice)


def parse_tool_calls(
    text: str, tools: ToolSet
) -> tuple[str, list[ToolCall], list[InvalidToolCall]]:
    """Split an answer into its text and its tool calls (valid and invalid)."""
    parsed = tools.parse_answer(text)
    calls = [
        ToolCall(type="tool_call", name=c.name, args=c.arguments, id=c.id) for c in parsed.calls
    ]
    invalid = [
        InvalidToolCall(type="invalid_tool_call", name=c.name, args=c.text, id=c.id, error=c.error)
        for c in parsed.invalid
    ]
    return parsed.rest, calls, invalid
