"""Tool calling for a model whose chat template has no tool slot: prompt text and parsing.

Tools are described in the system prompt; the model answers a call as
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``. When a call is
required (``tool_choice`` or structured output) the answer is the bare JSON
object, constrained by :class:`~shared_core.constraints.JSONSchemaConstraint`.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import InvalidToolCall, ToolCall
from langchain_core.utils.function_calling import convert_to_openai_tool

from shared_core.errors import RainInputError

__all__ = [
    "TOOL_CALL_CLOSE",
    "TOOL_CALL_OPEN",
    "ToolSetup",
    "format_tool_call",
    "parse_tool_calls",
    "resolve_tools",
]

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
_BLOCK = re.compile(
    re.escape(TOOL_CALL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CALL_CLOSE) + r"|$)", re.S
)


@dataclass
class ToolSetup:
    """The tools of one call and whether a call is required."""

    specs: list[dict[str, Any]] = field(default_factory=list)
    """OpenAI-style function specs: name, description, parameters."""
    required: list[str] | None = None
    """Names one of which must be called; ``None``: the model may answer in text."""

    @property
    def names(self) -> list[str]:
        return [s["name"] for s in self.specs]

    def system_prompt(self) -> str:
        lines = [
            "You can call these tools. Each is described by a JSON schema:",
            "<tools>",
            *(json.dumps(s, ensure_ascii=False) for s in self.specs),
            "</tools>",
        ]
        if self.required is None:
            lines.append(
                "To call a tool, answer with "
                f'{TOOL_CALL_OPEN}{{"name": <tool name>, "arguments": {{...}}}}{TOOL_CALL_CLOSE}'
                "; otherwise answer normally."
            )
        else:
            lines.append(
                "You must call "
                + (f"the tool {self.required[0]}" if len(self.required) == 1 else "a tool")
                + ': answer with only a JSON object {"name": <tool name>, "arguments": {...}}.'
            )
        return "\n".join(lines)

    def call_schema(self) -> dict[str, Any]:
        """JSON schema of a required call: ``{"name": const, "arguments": parameters}``."""
        options = [
            {
                "type": "object",
                "properties": {
                    "name": {"const": s["name"]},
                    "arguments": s.get("parameters") or {"type": "object", "properties": {}},
                },
                "required": ["name", "arguments"],
            }
            for s in self.specs
            if self.required is not None and s["name"] in self.required
        ]
        return options[0] if len(options) == 1 else {"anyOf": options}


def resolve_tools(tools: Sequence[Any] | None, tool_choice: Any) -> ToolSetup | None:
    """Normalise ``tools`` and ``tool_choice`` (LangChain/OpenAI forms) into a ToolSetup."""
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
        specs.append({k: fn[k] for k in ("name", "description", "parameters") if k in fn})
    names = [s["name"] for s in specs]
    required: list[str] | None
    if tool_choice in (None, "auto"):
        required = None
    elif tool_choice in ("any", "required", True):
        required = names
    else:
        name = tool_choice
        if isinstance(tool_choice, Mapping):
            name = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
        if not isinstance(name, str) or name not in names:
            raise RainInputError(
                f"tool_choice {tool_choice!r} names no bound tool; use 'auto', 'any', "
                f"'none' or one of {names}"
            )
        required = [name]
    return ToolSetup(specs=specs, required=required)


def format_tool_call(name: str, args: Mapping[str, Any]) -> str:
    """How an earlier call appears in the conversation shown to the model."""
    body = json.dumps({"name": name, "arguments": dict(args)}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}{body}{TOOL_CALL_CLOSE}"


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _to_call(raw: str, names: list[str]) -> ToolCall | InvalidToolCall:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        return InvalidToolCall(
            type="invalid_tool_call", name=None, args=raw, id=_call_id(), error=str(exc)
        )
    name = obj.get("name") if isinstance(obj, dict) else None
    args = obj.get("arguments", obj.get("parameters", {})) if isinstance(obj, dict) else None
    if name not in names or not isinstance(args, dict):
        return InvalidToolCall(
            type="invalid_tool_call",
            name=name if isinstance(name, str) else None,
            args=raw,
            id=_call_id(),
            error=f"expected {{'name': one of {names}, 'arguments': {{...}}}}",
        )
    return ToolCall(type="tool_call", name=name, args=args, id=_call_id())


def parse_tool_calls(
    text: str, setup: ToolSetup
) -> tuple[str, list[ToolCall], list[InvalidToolCall]]:
    """Split an answer into its text and its tool calls (valid and invalid)."""
    calls: list[ToolCall] = []
    invalid: list[InvalidToolCall] = []
    stripped = text.strip()
    if setup.required is not None or (
        TOOL_CALL_OPEN not in text and stripped.startswith("{") and '"name"' in stripped
    ):
        raws, rest = [stripped], ""
    else:
        raws = [m.group(1).strip() for m in _BLOCK.finditer(text)]
        rest = _BLOCK.sub("", text).strip() if raws else text
    for raw in raws:
        call = _to_call(raw, setup.names)
        if call["type"] == "tool_call":
            calls.append(call)  # type: ignore[arg-type]
        else:
            invalid.append(call)  # type: ignore[arg-type]
    return rest, calls, invalid
