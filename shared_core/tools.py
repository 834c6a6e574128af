"""Tool calling by text, for models whose chat template has no tool slot.

Framework-free: the adapters (ChatRain, RainLLM) translate their frameworks'
tools into :class:`ToolSet` specs and the raw calls found here back into their
frameworks' types.

Tools are described in the system prompt; the model answers a call as
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``. When a call is
required the whole answer is the bare JSON object, constrained by the
output grammar of :meth:`ToolSet.grammar` (a JSON schema; the model backend applies it).
Structured output without a tool (``answer_schema``) constrains the whole answer to
one JSON document of a schema the same way.

:func:`tool_set` is the one reading of ``tool_choice`` / ``tool_required`` that both
adapters use, so a choice means the same in LangChain and LlamaIndex.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shared_core.errors import RainInputError
from shared_core.models.protocol import Grammar

__all__ = [
    "CALL_CLOSE",
    "CALL_OPEN",
    "InvalidCall",
    "ParsedAnswer",
    "RawCall",
    "TextGate",
    "ToolSet",
    "choice_name",
    "format_call",
    "function_spec",
    "new_call_id",
    "tool_set",
]

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
# A call block; an unclosed one (the answer ended inside it) runs to the end.
_BLOCK = re.compile(re.escape(CALL_OPEN) + r"(.*?)(?:" + re.escape(CALL_CLOSE) + r"|$)", re.S)


@dataclass(frozen=True)
class RawCall:
    """A well-formed call of a known tool."""

    name: str
    arguments: dict[str, Any]
    id: str


@dataclass(frozen=True)
class InvalidCall:
    """Call text that is not a well-formed call of a known tool."""

    text: str
    """The call as the model wrote it (stripped)."""
    error: str
    name: str | None
    """The tool it names, if it names one."""
    id: str


@dataclass(frozen=True)
class ParsedAnswer:
    """An answer split into its text and its calls."""

    rest: str
    """The text around the calls (stripped); all of it when there is no call."""
    calls: list[RawCall]
    invalid: list[InvalidCall]


@dataclass
class ToolSet:
    """The tools of one request and whether a call is required."""

    specs: list[dict[str, Any]] = field(default_factory=list)
    """OpenAI-style function specs: name, description, JSON-schema parameters."""
    required: list[str] | None = None
    """Names one of which must be called; ``None``: the model may answer in text."""
    bare_calls: bool = True
    """Whether an answer that is a bare JSON object naming a tool (no tags) is a call:
    small models often drop the tags. Decided once, in :func:`tool_set`, for both adapters."""
    answer_schema: dict[str, Any] | None = None
    """Structured output without a tool: the whole answer is one JSON document of this
    schema (grammar-constrained), shown and returned as text."""

    @property
    def names(self) -> list[str]:
        return [s["name"] for s in self.specs]

    def system_prompt(self) -> str:
        if self.answer_schema is not None:
            schema = json.dumps(self.answer_schema, ensure_ascii=False)
            return f"Answer with only a JSON object that follows this JSON schema:\n{schema}"
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

    def with_system_prompt(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """``messages`` (engine role/content dicts) with the tools in the system prompt."""
        out = list(messages)
        if out and out[0]["role"] == "system":
            out[0] = {
                "role": "system",
                "content": out[0]["content"] + "\n\n" + self.system_prompt(),
            }
        else:
            out.insert(0, {"role": "system", "content": self.system_prompt()})
        return out

    def call_schema(self) -> dict[str, Any]:
        """JSON schema of a required call: ``{"name": const, "arguments": parameters}``
        (or the ``answer_schema`` itself)."""
        if self.answer_schema is not None:
            return self.answer_schema
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

    def grammar(self) -> Grammar | None:
        """The grammar that keeps a required call (or the structured answer) valid;
        ``None`` when the model may answer freely."""
        if self.required is None and self.answer_schema is None:
            return None
        return Grammar.from_schema(self.call_schema())

    def visible(self, text: str, final: bool) -> str:
        """The part of the answer shown as text: none of a call, nor a half-written tag.

        ``final=False`` (streaming) also holds back a tail that may be the start of
        ``<tool_call>``. The result only grows as ``text`` grows.
        """
        if self.answer_schema is not None:
            return text  # structured output is the answer's text
        if self.required is not None:
            return ""
        if self.bare_calls and text.lstrip().startswith("{"):
            return ""  # may be a bare JSON call: decided by parse_answer()
        cut = text.find(CALL_OPEN)
        if cut >= 0:
            return text[:cut]
        if not final:
            for k in range(min(len(CALL_OPEN) - 1, len(text)), 0, -1):
                if CALL_OPEN.startswith(text[-k:]):
                    return text[:-k]
        return text

    def parse_answer(self, text: str) -> ParsedAnswer:
        """Split a finished answer into its text and its calls (valid and invalid)."""
        if self.answer_schema is not None:
            return ParsedAnswer(rest=text, calls=[], invalid=[])
        stripped = text.strip()
        bare = (
            self.bare_calls
            and CALL_OPEN not in text
            and stripped.startswith("{")
            and '"name"' in stripped
        )
        if self.required is not None or bare:
            raws, rest = [stripped], ""
        else:
            raws = [m.group(1).strip() for m in _BLOCK.finditer(text)]
            rest = _BLOCK.sub("", text).strip() if raws else text
        calls: list[RawCall] = []
        invalid: list[InvalidCall] = []
        for raw in raws:
            call = self._read(raw)
            if isinstance(call, RawCall):
                calls.append(call)
            else:
                invalid.append(call)
        return ParsedAnswer(rest=rest, calls=calls, invalid=invalid)

    def _read(self, raw: str) -> RawCall | InvalidCall:
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            return InvalidCall(
                text=raw, error=f"not valid JSON: {exc}", name=None, id=new_call_id()
            )
        if not isinstance(obj, dict):
            obj = {}
        name, args = obj.get("name"), obj.get("arguments", obj.get("parameters", {}))
        if not isinstance(name, str) or name not in self.names or not isinstance(args, dict):
            return InvalidCall(
                text=raw,
                error=f"expected {{'name': one of {self.names}, 'arguments': {{...}}}}",
                name=name if isinstance(name, str) else None,
                id=new_call_id(),
            )
        return RawCall(name=name, arguments=args, id=new_call_id())


class TextGate:
    """Streams answer text piece by piece, holding back a tool call for parsing."""

    def __init__(self, tools: ToolSet | None) -> None:
        self.tools = tools
        self.text = ""
        """All text pushed so far."""
        self.shown = 0
        """How much of ``text`` has been let through."""

    @property
    def mute(self) -> bool:
        """Whether no text is shown at all (a call is required)."""
        return self.tools is not None and self.tools.required is not None

    def push(self, delta: str) -> str:
        """Add ``delta``; return the text newly safe to show."""
        self.text += delta
        if self.tools is None:
            end = len(self.text)
        else:
            end = len(self.tools.visible(self.text, final=False))
        out = self.text[self.shown : end] if end > self.shown else ""
        self.shown = max(self.shown, end)
        return out


def tool_set(
    specs: Sequence[Mapping[str, Any]],
    tool_choice: Any = None,
    *,
    tool_required: bool = False,
    kind: type[ToolSet] = ToolSet,
) -> ToolSet | None:
    """The tools of one request, with ``tool_choice`` read the same way in both adapters.

    - no tools, ``"none"`` or ``False``: ``None`` (the tools are not shown; plain text);
    - ``None`` or ``"auto"``: the model may call one or answer in text; with
      ``tool_required=True`` (LlamaIndex) a call is required;
    - ``"any"``, ``"required"`` or ``True``: one of the tools must be called;
    - a tool's name, ``{"type": "function", "function": {"name": ...}}`` or
      ``{"name": ...}``: that tool must be called (``{"type": "any"}`` etc. as the words).

    A required call is grammar-constrained (:meth:`ToolSet.grammar`). An answer that is
    a bare JSON object naming a given tool (no tags) counts as a call in both adapters.
    """
    choice = choice_name(tool_choice)
    if isinstance(tool_choice, Mapping) and choice is None:
        choice = tool_choice.get("type")
    if not specs or choice in ("none", False):
        return None
    names = [str(s["name"]) for s in specs]
    required: list[str] | None
    if choice in (None, "auto"):
        required = names if tool_required else None
    elif choice in ("any", "required", True):
        required = names
    elif isinstance(choice, str) and choice in names:
        required = [choice]
    else:
        raise RainInputError(
            f"tool_choice {tool_choice!r} names no given tool; use 'auto', 'any' (or "
            f"'required'), 'none' or one of {names}"
        )
    return kind(specs=[dict(s) for s in specs], required=required, bare_calls=True)


def function_spec(function: Mapping[str, Any]) -> dict[str, Any]:
    """The name, description and parameters of an OpenAI ``function`` dict."""
    return {k: function[k] for k in ("name", "description", "parameters") if k in function}


def choice_name(tool_choice: Any) -> Any:
    """The tool an OpenAI-style ``tool_choice`` dict names; other values as they are."""
    if isinstance(tool_choice, Mapping):
        return (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
    return tool_choice


def format_call(name: str | None, arguments: Mapping[str, Any] | None) -> str:
    """How an earlier call appears in the conversation shown to the model."""
    body = json.dumps({"name": name, "arguments": dict(arguments or {})}, ensure_ascii=False)
    return f"{CALL_OPEN}{body}{CALL_CLOSE}"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"
