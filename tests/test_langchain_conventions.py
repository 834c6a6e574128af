"""ChatRain follows langchain-core 1.x: v1 content blocks, a profile, ls params with a model
override, response metadata, and with_structured_output for its three methods (constrained).

On the tiny random model (and a scripted one where the text must be known); the
same structured-output paths on the embedded SmolLM2 are in test_langchain_agent.py.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import pytest
from langchain_core.messages import AIMessage
from langchain_core.tools import tool
from pydantic import BaseModel
from typing_extensions import TypedDict

from langchain_rain import ChatRain
from shared_core import RainEngine, RainInputError, load_engine
from shared_core.models.scripted import ScriptedLM, choice_table
from tests.scripted import TINY_SEARCH, ScriptedEvaluator

CFG = {**TINY_SEARCH, "simulation_max_tokens": 2}


class Weather(BaseModel):
    """Weather report request."""

    unit: Literal["celsius", "fahrenheit"]
    sunny: bool  # bounded fields: a random model's free integer can outrun max_tokens


class Verdict(TypedDict):
    """A yes/no verdict."""

    ok: bool


JSON_SCHEMA = {
    "title": "pick",
    "description": "Pick a colour.",
    "type": "object",
    "properties": {"colour": {"enum": ["red", "blue"]}},
    "required": ["colour"],
}


@tool
def get_weather(city: str) -> str:
    """Return the weather in a city."""
    return f"Sunny in {city}."


@pytest.fixture(scope="module")
def llm(tiny_engine: RainEngine) -> ChatRain:
    return ChatRain(engine=tiny_engine, rain_config=CFG, max_tokens=48)


def _scripted(answer: str) -> RainEngine:
    return RainEngine(
        backend=ScriptedLM(choice_table({answer: 1.0})),
        evaluator=ScriptedEvaluator(lambda text: 1.0),
        config={**TINY_SEARCH, "max_new_tokens": 80},
    )


def test_output_version_v1_gives_standard_content_blocks() -> None:
    engine = _scripted("Sunny.")
    msg = ChatRain(engine=engine, output_version="v1").invoke("Weather?")
    assert msg.content == [{"type": "text", "text": "Sunny."}]
    chunks = list(ChatRain(engine=engine, output_version="v1").stream("Weather?"))
    text = "".join(b["text"] for c in chunks for b in c.content if isinstance(b, dict))
    assert text == "Sunny."
    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    tooled = ChatRain(engine=_scripted(call), output_version="v1").bind_tools([get_weather])
    out = tooled.invoke("Weather in Paris?")
    blocks = [b for b in out.content if isinstance(b, dict) and b["type"] == "tool_call"]
    assert [(b["name"], b["args"]) for b in blocks] == [("get_weather", {"city": "Paris"})]
    assert out.tool_calls[0]["args"] == {"city": "Paris"}
    # The default (v0) keeps a plain string, and v1 content is accepted back as input.
    plain = ChatRain(engine=engine).invoke("Weather?")
    assert plain.content == "Sunny."
    again = ChatRain(engine=engine).invoke([("human", "Weather?"), msg, ("human", "And?")])
    assert isinstance(again, AIMessage)


def test_profile_describes_what_the_model_can_do(tiny_engine: RainEngine) -> None:
    profile = ChatRain(engine=tiny_engine).profile
    assert profile is not None
    assert profile["max_input_tokens"] == tiny_engine.context_window
    assert profile["tool_calling"] and profile["tool_choice"] and profile["structured_output"]
    assert profile["text_inputs"] and not profile["image_inputs"]
    # A model named by id is loaded on first use; its window is filled in then.
    load_engine("conventions/tiny", factory=lambda: tiny_engine)
    lazy = ChatRain(model="conventions/tiny")
    assert lazy.profile is not None and "max_input_tokens" not in lazy.profile
    lazy.rain_engine  # noqa: B018 - loads
    assert lazy.profile["max_input_tokens"] == tiny_engine.context_window


def test_ls_params_and_response_metadata(llm: ChatRain) -> None:
    params = llm._get_ls_params(stop=["\n"])
    assert params["ls_provider"] == "rain" and params["ls_model_type"] == "chat"
    assert params["ls_model_name"] == "tiny-random-llama"
    assert params["ls_max_tokens"] == 48 and params["ls_stop"] == ["\n"]
    assert llm._get_ls_params(model="other/model")["ls_model_name"] == "other/model"
    meta = llm.invoke("Hi", max_tokens=2).response_metadata
    assert meta["model_name"] == "tiny-random-llama" and meta["model_provider"] == "rain"


SCHEMAS = [Weather, Verdict, JSON_SCHEMA]


def _valid(schema: Any, parsed: Any) -> None:
    if schema is Weather:
        assert isinstance(parsed, Weather)
        Weather.model_validate(parsed.model_dump())
    elif schema is Verdict:
        assert isinstance(parsed, dict) and set(parsed) == {"ok"}
        assert isinstance(parsed["ok"], bool)
    else:
        assert isinstance(parsed, dict) and set(parsed) == {"colour"}
        assert parsed["colour"] in ("red", "blue")


@pytest.mark.parametrize("schema", SCHEMAS, ids=["pydantic", "typeddict", "json_schema"])
@pytest.mark.parametrize("method", ["function_calling", "json_schema", "json_mode"])
def test_structured_output_is_schema_valid_from_a_random_model(
    llm: ChatRain, method: str, schema: Any
) -> None:
    # The tiny model writes noise; the grammar makes it a valid instance anyway.
    strict_values = [None] if method == "json_mode" else [True, False]
    for strict in strict_values:
        structured = llm.with_structured_output(schema, method=method, strict=strict)
        _valid(schema, structured.invoke("Go"))
    raw = llm.with_structured_output(schema, method=method, include_raw=True).invoke(
        "Go", config={"configurable": {"rubric": "truthful"}}
    )
    assert raw["parsing_error"] is None
    _valid(schema, raw["parsed"])
    assert isinstance(raw["raw"], AIMessage)
    assert raw["raw"].response_metadata["rubric"] == "truthful"
    if method == "function_calling":
        assert raw["raw"].tool_calls and raw["raw"].content == ""
    else:
        assert not raw["raw"].tool_calls
        assert json.loads(str(raw["raw"].content)) is not None


def test_json_mode_without_a_schema_and_streaming(llm: ChatRain) -> None:
    got = llm.with_structured_output(method="json_mode").invoke("Go")
    assert isinstance(got, dict)
    parts = list(llm.with_structured_output(JSON_SCHEMA, method="json_schema").stream("Go"))
    assert parts and parts[-1]["colour"] in ("red", "blue")


def test_structured_output_refuses_what_it_cannot_do(llm: ChatRain) -> None:
    with pytest.raises(RainInputError, match="unknown method 'xml'"):
        llm.with_structured_output(Weather, method="xml")  # type: ignore[arg-type]
    with pytest.raises(RainInputError, match="needs a schema"):
        llm.with_structured_output(None, method="json_schema")
    with pytest.raises(RainInputError, match="strict= applies"):
        llm.with_structured_output(Weather, method="json_mode", strict=True)
    with pytest.raises(RainInputError, match="include_raw"):
        llm.with_structured_output(Weather, includ_raw=True)
