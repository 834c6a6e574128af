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
from shared_core.tools import ToolSet, choice_name, function_spec

__all__ = ["parse_tool_calls", "resolve_tools"]


def resolve_tools(tools: Sequence[Any] | None, tool_choice: Any) -> ToolSet | None:
    """Normalise ``tools`` and ``tool_choice`` (LangChain/OpenAI forms) into a ToolSet."""
    if not tools or tool_choice == "none" or tool_choice is False:
        return None
    specs: list[dict[str, Any]] = []
    for tool in tools:
        try:
            fn = convert_to_openai_tool(tool)["function"]
        except Exception as exc:
            raise RainInputError(
                f"cannot use {tool!r:.80} as a tool: {exc}; pass a BaseTool, a function, "
                "a pydantic class, a TypedDict or an OpenAI tool dict"
            ) from exc
        specs.append(function_spec(fn))
    names = [s["name"] for s in specs]
    required: list[str] | None
    if tool_choice in (None, "auto"):
        required = None
    elif tool_choice in ("any", "required", True):
        required = names
    else:
        name = choice_name(tool_choice)
        if not isinstance(name, str) or name not in names:
            raise RainInputError(
                f"tool_choice {tool_choice!r} names no bound tool; use 'auto', 'any', "
                f"'none' or one of {names}"
            )
        required = [name]
    # Small models often answer a call as bare JSON, without the tags.
    return ToolSet(specs=specs, required=required, bare_calls=True)


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
