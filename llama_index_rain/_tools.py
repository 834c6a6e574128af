"""RainLLM's side of tool calling: LlamaIndex tools in, ``{id, name, arguments}`` calls out.

The wire format, prompt, schema, parsing and stream gate are
:mod:`shared_core.tools` (the same as ChatRain's); this module only translates
LlamaIndex's types: ``BaseTool.metadata`` in, calls as ``additional_kwargs`` dicts
out (``ToolSelection`` is made from them), and earlier calls back into text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from shared_core import tools as shared
from shared_core.errors import RainInputError
from shared_core.tools import ToolSet, function_spec, tool_set

__all__ = ["ToolPlan", "format_call", "plan_tools"]


class ToolPlan(ToolSet):
    """A ToolSet whose calls come out as LlamaIndex ``additional_kwargs`` dicts."""

    def parse(self, text: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """``(calls, invalid)`` found in the answer; a call is ``{id, name, arguments}``."""
        parsed = self.parse_answer(text)
        calls = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in parsed.calls]
        invalid = [{"text": c.text, "error": c.error} for c in parsed.invalid]
        return calls, invalid


def plan_tools(
    tools: Sequence[Any] | None, tool_required: bool, tool_choice: Any
) -> ToolPlan | None:
    """LlamaIndex tools and ``tool_required`` / ``tool_choice`` as a ToolPlan.

    The choice is read by :func:`shared_core.tools.tool_set`, as ChatRain reads it.
    """
    specs: list[dict[str, Any]] = []
    for tool in tools or ():
        metadata = getattr(tool, "metadata", None)
        if metadata is None or not hasattr(metadata, "to_openai_tool"):
            raise RainInputError(
                f"cannot use {tool!r:.80} as a tool; pass LlamaIndex tools "
                "(FunctionTool.from_defaults(fn), QueryEngineTool, ...)"
            )
        specs.append(function_spec(metadata.to_openai_tool(skip_length_check=True)["function"]))
    plan = tool_set(specs, tool_choice, tool_required=tool_required, kind=ToolPlan)
    assert plan is None or isinstance(plan, ToolPlan)
    return plan


def format_call(call: Any) -> str:
    """How an earlier call appears in the conversation shown to the model.

    ``call`` is one of ours (``{id, name, arguments}``) or a ``ToolSelection``.
    """
    if isinstance(call, Mapping):
        return shared.format_call(call.get("name"), call.get("arguments"))
    return shared.format_call(getattr(call, "tool_name", None), getattr(call, "tool_kwargs", None))
