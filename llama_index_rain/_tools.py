"""Tool calling by text for RainLLM, in the same wire format as ChatRain.

SmolLM2's chat template (like many small models') has no tool slot, so tools
are described in the system prompt and the model answers a call as
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``. When a call is
required (``tool_required`` or ``tool_choice``) the whole answer is the bare
JSON object, constrained by :class:`~shared_core.constraints.JSONSchemaConstraint`.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shared_core.errors import RainInputError

__all__ = ["CALL_CLOSE", "CALL_OPEN", "ToolPlan", "format_call", "plan_tools"]

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
_BLOCK = re.compile(re.escape(CALL_OPEN) + r"(.*?)(?:" + re.escape(CALL_CLOSE) + r"|$)", re.S)


@dataclass
class ToolPlan:
    """The tools of one call, and which (if any) the answer must call."""

    specs: list[dict[str, Any]] = field(default_factory=list)
    """name, description and JSON-schema parameters of each tool."""
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
                f'To call a tool, answer with {CALL_OPEN}{{"name": <tool name>, '
                f'"arguments": {{...}}}}{CALL_CLOSE}; otherwise answer normally.'
            )
        else:
            which = f"the tool {self.required[0]}" if len(self.required) == 1 else "a tool"
            lines.append(
                f'You must call {which}: answer with only a JSON object {{"name": '
                '<tool name>, "arguments": {...}}.'
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

    def visible(self, text: str, final: bool) -> str:
        """The part of the answer shown as text: none of a call, nor a half-written tag."""
        if self.required is not None:
            return ""
        cut = text.find(CALL_OPEN)
        if cut >= 0:
            return text[:cut]
        if not final:
            # Hold back a tail that may be the start of "<tool_call>".
            for k in range(min(len(CALL_OPEN) - 1, len(text)), 0, -1):
                if CALL_OPEN.startswith(text[-k:]):
                    return text[:-k]
        return text

    def parse(self, text: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """``(calls, invalid)`` found in the answer; a call is ``{id, name, arguments}``."""
        raws = [text] if self.required is not None else _BLOCK.findall(text)
        calls: list[dict[str, Any]] = []
        invalid: list[dict[str, Any]] = []
        for raw in raws:
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                invalid.append({"text": raw, "error": f"not valid JSON: {exc}"})
                continue
            if not isinstance(obj, dict):
                obj = {}
            name, args = obj.get("name"), obj.get("arguments", obj.get("parameters", {}))
            if name not in self.names or not isinstance(args, dict):
                error = f"expected {{'name': one of {self.names}, 'arguments': {{...}}}}"
                invalid.append({"text": raw, "error": error})
                continue
            calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "name": name, "arguments": args})
        return calls, invalid


def plan_tools(
    tools: Sequence[Any] | None, tool_required: bool, tool_choice: Any
) -> ToolPlan | None:
    """Normalise LlamaIndex tools and ``tool_required`` / ``tool_choice`` into a ToolPlan."""
    if not tools or tool_choice == "none":
        return None
    specs: list[dict[str, Any]] = []
    for tool in tools:
        metadata = getattr(tool, "metadata", None)
        if metadata is None or not hasattr(metadata, "to_openai_tool"):
            raise RainInputError(
                f"cannot use {tool!r:.80} as a tool; pass LlamaIndex tools "
                "(FunctionTool.from_defaults(fn), QueryEngineTool, ...)"
            )
        fn = metadata.to_openai_tool(skip_length_check=True)["function"]
        specs.append({k: fn[k] for k in ("name", "description", "parameters") if k in fn})
    names = [s["name"] for s in specs]
    name: Any = tool_choice
    if isinstance(tool_choice, Mapping):
        name = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
    required: list[str] | None
    if name in (None, "auto"):
        required = names if tool_required else None
    elif name in ("required", "any"):
        required = names
    elif isinstance(name, str) and name in names:
        required = [name]
    else:
        raise RainInputError(
            f"tool_choice {tool_choice!r} names no given tool; use 'auto', 'required', "
            f"'none' or one of {names}"
        )
    return ToolPlan(specs=specs, required=required)


def format_call(call: Any) -> str:
    """How an earlier call appears in the conversation shown to the model.

    ``call`` is one of ours (``{id, name, arguments}``) or a ``ToolSelection``.
    """
    if isinstance(call, Mapping):
        name, args = call.get("name"), call.get("arguments")
    else:
        name, args = getattr(call, "tool_name", None), getattr(call, "tool_kwargs", None)
    body = {"name": name, "arguments": dict(args or {})}
    return f"{CALL_OPEN}{json.dumps(body, ensure_ascii=False)}{CALL_CLOSE}"
