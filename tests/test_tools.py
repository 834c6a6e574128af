"""shared_core.tools: the text wire format of tool calls, shared by ChatRain and RainLLM."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shared_core.tools import (
    CALL_OPEN,
    InvalidCall,
    RawCall,
    TextGate,
    ToolSet,
    choice_name,
    format_call,
    function_spec,
)

WEATHER = {
    "name": "get_weather",
    "description": "Weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}
CLOCK = {"name": "now", "description": "The time."}  # no parameters


def toolset(required: list[str] | None = None, bare_calls: bool = False) -> ToolSet:
    return ToolSet(specs=[WEATHER, CLOCK], required=required, bare_calls=bare_calls)


def call_text(name: str, arguments: dict[str, Any]) -> str:
    return format_call(name, arguments)


# --- parsing ------------------------------------------------------------------------------
def test_parse_valid_calls_and_the_text_around_them() -> None:
    text = f"Let me check.{call_text('get_weather', {'city': 'Oslo'})} And {call_text('now', {})}"
    parsed = toolset().parse_answer(text)
    assert parsed.rest == "Let me check. And"
    assert [(c.name, c.arguments) for c in parsed.calls] == [
        ("get_weather", {"city": "Oslo"}),
        ("now", {}),
    ]
    assert not parsed.invalid
    ids = [c.id for c in parsed.calls]
    assert all(i.startswith("call_") for i in ids) and len(set(ids)) == 2


def test_parse_accepts_parameters_for_arguments_and_padding() -> None:
    text = '<tool_call>\n {"name": "now", "parameters": {"tz": "UTC"}} \n</tool_call>'
    (call,) = toolset().parse_answer(text).calls
    assert call == RawCall(name="now", arguments={"tz": "UTC"}, id=call.id)


def test_plain_text_is_no_call() -> None:
    parsed = toolset().parse_answer("  Just text.  ")
    assert (parsed.rest, parsed.calls, parsed.invalid) == ("  Just text.  ", [], [])


@pytest.mark.parametrize(
    ("raw", "name", "error"),
    [
        ("{not json", None, "not valid JSON"),
        ('{"name": "nope", "arguments": {}}', "nope", "one of ['get_weather', 'now']"),
        ('{"name": "now", "arguments": [1]}', "now", "'arguments'"),
        ('{"arguments": {}}', None, "'name'"),
        ('["now", {}]', None, "'name'"),
    ],
)
def test_parse_invalid_calls(raw: str, name: str | None, error: str) -> None:
    parsed = toolset().parse_answer(f"<tool_call>{raw}</tool_call>")
    assert not parsed.calls and parsed.rest == ""
    (bad,) = parsed.invalid
    assert isinstance(bad, InvalidCall)
    assert bad.text == raw and bad.name == name and error in bad.error
    assert bad.id.startswith("call_")


def test_parse_truncated_call() -> None:
    # The answer ran out inside the call: no closing tag, unfinished JSON.
    text = 'Checking.<tool_call>{"name": "get_weather", "arguments": {"city": "Os'
    parsed = toolset().parse_answer(text)
    assert parsed.rest == "Checking." and not parsed.calls
    (bad,) = parsed.invalid
    assert bad.text.startswith('{"name": "get_weather"') and "not valid JSON" in bad.error
    # Complete JSON whose closing tag is missing still counts.
    (call,) = toolset().parse_answer('<tool_call>{"name": "now", "arguments": {}}').calls
    assert call.name == "now"


def test_required_call_is_the_whole_answer() -> None:
    tools = toolset(required=["get_weather"])
    parsed = tools.parse_answer(' {"name": "get_weather", "arguments": {"city": "Rome"}} ')
    assert parsed.rest == "" and parsed.calls[0].arguments == {"city": "Rome"}
    parsed = tools.parse_answer("I will not.")
    assert not parsed.calls and parsed.invalid[0].text == "I will not."


def test_bare_json_calls_only_when_enabled() -> None:
    bare = '{"name": "now", "arguments": {}}'
    assert toolset(bare_calls=True).parse_answer(bare).calls[0].name == "now"
    parsed = toolset(bare_calls=False).parse_answer(bare)
    assert parsed.rest == bare and not parsed.calls and not parsed.invalid
    # JSON without a "name" is ordinary text even with bare calls on.
    assert toolset(bare_calls=True).parse_answer('{"a": 1}').rest == '{"a": 1}'


def test_format_call_round_trips() -> None:
    text = format_call("get_weather", {"city": "Zürich"})
    assert text == '<tool_call>{"name": "get_weather", "arguments": {"city": "Zürich"}}</tool_call>'
    (call,) = toolset().parse_answer(text).calls
    assert (call.name, call.arguments) == ("get_weather", {"city": "Zürich"})
    assert format_call(None, None) == '<tool_call>{"name": null, "arguments": {}}</tool_call>'


# --- prompt and schema ----------------------------------------------------------------------
def test_system_prompt_lists_the_tools_and_the_format() -> None:
    free = toolset().system_prompt()
    assert json.dumps(WEATHER) in free and json.dumps(CLOCK) in free
    assert f'{CALL_OPEN}{{"name": <tool name>, "arguments": {{...}}}}</tool_call>' in free
    assert "otherwise answer normally" in free
    assert "You must call the tool now:" in toolset(required=["now"]).system_prompt()
    assert "You must call a tool:" in toolset(required=["now", "get_weather"]).system_prompt()


def test_schema_of_one_required_tool() -> None:
    schema = toolset(required=["get_weather"]).call_schema()
    assert schema == {
        "type": "object",
        "properties": {"name": {"const": "get_weather"}, "arguments": WEATHER["parameters"]},
        "required": ["name", "arguments"],
    }
    # A tool without parameters takes an empty object.
    schema = toolset(required=["now"]).call_schema()
    assert schema["properties"]["arguments"] == {"type": "object", "properties": {}}


def test_schema_of_several_required_tools() -> None:
    schema = toolset(required=["get_weather", "now"]).call_schema()
    names = [option["properties"]["name"]["const"] for option in schema["anyOf"]]
    assert names == ["get_weather", "now"]
    assert json.loads(json.dumps(schema)) == schema


def test_with_system_prompt_appends_to_or_adds_a_system_turn() -> None:
    tools = toolset()
    user = {"role": "user", "content": "Hi"}
    assert tools.with_system_prompt([user]) == [
        {"role": "system", "content": tools.system_prompt()},
        user,
    ]
    merged = tools.with_system_prompt([{"role": "system", "content": "Be brief."}, user])
    assert merged[0]["content"] == "Be brief.\n\n" + tools.system_prompt() and merged[1] == user
    assert tools.with_system_prompt([]) == [{"role": "system", "content": tools.system_prompt()}]


def test_grammar_only_for_a_required_call() -> None:
    assert toolset().grammar() is None
    grammar = toolset(required=["now"]).grammar()
    assert grammar is not None
    assert json.loads(grammar.json_schema) == toolset(required=["now"]).call_schema()


def test_choice_name_and_function_spec() -> None:
    assert choice_name({"type": "function", "function": {"name": "now"}}) == "now"
    assert choice_name({"name": "now"}) == "now"
    assert choice_name("auto") == "auto" and choice_name(None) is None
    fn = {**WEATHER, "strict": True}
    assert function_spec(fn) == WEATHER and function_spec(CLOCK) == CLOCK


# --- the streaming text gate ----------------------------------------------------------------
def stream(gate: TextGate, deltas: list[str]) -> list[str]:
    return [gate.push(d) for d in deltas]


def test_gate_holds_back_a_call_and_a_half_written_tag() -> None:
    gate = TextGate(toolset())
    shown = stream(gate, ["Let me", " check.<tool", '_call>{"name":', ' "now"}</tool_call>'])
    assert shown == ["Let me", " check.", "", ""]
    assert gate.text.endswith("</tool_call>") and gate.shown == len("Let me check.")
    # A held tail that turns out not to be a tag is let through later.
    gate = TextGate(toolset())
    assert stream(gate, ["a <", "b"]) == ["a ", "<b"]


@pytest.mark.parametrize("cut", range(0, 40, 3))
def test_gate_output_does_not_depend_on_the_split(cut: int) -> None:
    text = "Sure: <tool_call>" + '{"name": "now", "arguments": {}}</tool_call>'
    gate = TextGate(toolset())
    assert "".join(stream(gate, [text[:cut], text[cut:]])) == "Sure: "


def test_gate_mutes_a_required_call_and_holds_bare_json() -> None:
    mute = TextGate(toolset(required=["now"]))
    assert mute.mute and stream(mute, ["{", '"name"']) == ["", ""]
    bare = TextGate(toolset(bare_calls=True))
    assert not bare.mute and bare.push(' {"name": "now"') == ""
    plain = TextGate(toolset(bare_calls=False))
    assert plain.push('{"a": 1}') == '{"a": 1}'


def test_gate_without_tools_lets_everything_through() -> None:
    gate = TextGate(None)
    assert stream(gate, ["<tool", "_call>x"]) == ["<tool", "_call>x"] and not gate.mute


def test_visible_final_keeps_a_trailing_angle_bracket() -> None:
    tools = toolset()
    assert tools.visible("a <", final=False) == "a "
    assert tools.visible("a <", final=True) == "a <"
    assert tools.visible("x<tool_call>{}", final=True) == "x"
    assert toolset(required=["now"]).visible("text", final=True) == ""


def test_shared_core_tools_is_framework_free() -> None:
    code = (
        "import sys, shared_core.tools; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('langchain_core', 'langchain', "
        "'llama_index')]; print(bad)"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    )
    assert out.stdout.strip() == "[]"
