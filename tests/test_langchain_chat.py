"""ChatRain on the tiny random model: options, config plumbing, events, tools, errors.

The tiny model writes gibberish, so these tests check what LangChain sees
(metadata, events, tool calls made valid by constrained decoding), not prose.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Literal

import numpy as np
import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.tools import tool
from pydantic import BaseModel
from typing_extensions import TypedDict

from langchain_rain import ChatRain
from langchain_rain._tools import parse_tool_calls, resolve_tools
from shared_core import RainConfigError, RainInputError, RubricError, load_engine
from shared_core.constraints import JSONSchemaConstraint

# One search iteration per commit, 4-token sets, no rollouts beyond 2 tokens:
# the cheapest search that still expands, evaluates and commits.
MICRO = {
    "num_candidates": 2,
    "T": 1,
    "min_new_iterations": 1,
    "T_m": 1,
    "token_set_lengths": (4,),
    "simulation_max_tokens": 2,
    "similarity_update": False,
    "dynamic_addition": False,
}


@pytest.fixture(scope="module")
def llm(tiny_engine: Any) -> ChatRain:
    return ChatRain(engine=tiny_engine, rain_config=MICRO, max_tokens=4)


class Spy(BaseCallbackHandler):
    """Records what reached the model run: rubric in the result, custom events."""

    def __init__(self) -> None:
        self.rubrics: list[str] = []
        self.events: list[tuple[str, float]] = []

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        self.rubrics.append(response.generations[0][0].message.response_metadata["rubric"])

    def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
        self.events.append((name, time.monotonic()))


class Weather(BaseModel):
    """Weather report request."""

    unit: Literal["celsius", "fahrenheit"]


class Verdict(TypedDict):
    """A yes/no verdict."""

    ok: bool


@tool
def get_weather(unit: Literal["celsius", "fahrenheit"]) -> str:
    """Return the weather in the given unit."""
    return "21 degrees" if unit == "celsius" else "70 degrees"


# --- construction ------------------------------------------------------------------------
def test_construction_is_cheap_and_validated(tiny_engine: Any) -> None:
    t0 = time.perf_counter()
    model = ChatRain(
        model="some/not-loaded-model", rubric="positive", rain_config={"preset": "fast", "T": 8}
    )
    assert time.perf_counter() - t0 < 0.5
    assert model._loaded is None  # nothing loaded until first use
    assert model.model_name == "some/not-loaded-model"
    assert ChatRain.from_default().model_name == "SmolLM2-135M-Instruct"
    with pytest.raises(ValueError, match="unknown rubric 'no-such-rubric'; known presets"):
        ChatRain(rubric="no-such-rubric")
    with pytest.raises(ValueError, match="T_m"):
        ChatRain(rain_config={"T": 1, "T_m": 5})
    with pytest.raises(Exception, match="either model= or engine="):
        ChatRain(model="x", engine=tiny_engine)
    with pytest.raises(Exception, match="api_key"):
        ChatRain(api_key="unused")  # type: ignore[call-arg]


def test_engine_is_shared_per_model(tiny_engine: Any) -> None:
    load_engine("tiny-cached", factory=lambda: tiny_engine)
    a, b = ChatRain(model="tiny-cached"), ChatRain(model="tiny-cached")
    assert a.rain_engine is b.rain_engine is tiny_engine


def test_from_transformers(tiny_model: Any, smol_tokenizer: Any) -> None:
    model = ChatRain.from_transformers(tiny_model, smol_tokenizer, rain_config=MICRO, max_tokens=2)
    out = model.invoke("Hi")
    assert out.usage_metadata is not None and out.usage_metadata["output_tokens"] <= 2


def test_token_counting_uses_the_model_tokenizer(llm: ChatRain, smol_tokenizer: Any) -> None:
    text = "RAIN rewinds and commits."
    assert llm.get_token_ids(text) == smol_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert llm.get_num_tokens(text) == len(llm.get_token_ids(text))
    msgs = [SystemMessage("Be kind."), HumanMessage(text)]
    rendered = smol_tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be kind."}, {"role": "user", "content": text}],
        tokenize=False,
    )
    expected = len(smol_tokenizer(rendered, add_special_tokens=False)["input_ids"])
    assert llm.get_num_tokens_from_messages(msgs) == expected
    assert llm.get_num_tokens_from_messages(msgs, tools=[get_weather]) > expected


# --- reporting ---------------------------------------------------------------------------
def test_metadata_usage_and_trace(llm: ChatRain) -> None:
    out = llm.invoke("Hello", rubric="positive")
    meta = out.response_metadata
    assert meta["model_name"] == "tiny-random-llama"
    assert meta["rubric"] == "positive"
    assert meta["finish_reason"] in ("stop", "length", "stop_string")
    stats = meta["rain_stats"]
    assert stats["iterations"] >= 1 and stats["commits"] >= 1
    assert {"rewinds", "final_score"} <= set(stats)
    assert meta["final_score"] == stats["final_score"]
    assert isinstance(meta["rain_trace"], list) and meta["rain_trace"][0]["candidates"]
    usage = out.usage_metadata
    assert usage is not None
    assert usage["input_tokens"] > 0 and 0 < usage["output_tokens"] <= 4
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert "rain_trace" not in llm.invoke("Hello", include_trace=False).response_metadata


def test_stream_yields_committed_text_and_one_final_chunk(llm: ChatRain) -> None:
    chunks = list(llm.stream("Hello", max_tokens=8))
    assert sum(1 for c in chunks if c.usage_metadata) == 1
    assert chunks[-1].chunk_position == "last"
    full = chunks[0]
    for c in chunks[1:]:
        full += c
    reference = llm.invoke("Hello", max_tokens=8)
    assert full.content == reference.content  # one iterator feeds both paths


def test_seed_determinism_and_max_tokens(llm: ChatRain) -> None:
    a = llm.invoke("Tell me something", seed=3, max_tokens=6)
    b = llm.invoke("Tell me something", seed=3, max_tokens=6)
    assert a.content == b.content
    assert a.usage_metadata is not None and a.usage_metadata["output_tokens"] <= 6


# --- configurable rubric through LCEL ----------------------------------------------------
@pytest.fixture(scope="module")
def chain(llm: ChatRain) -> Any:
    prompt = ChatPromptTemplate.from_messages([("system", "Answer briefly."), ("human", "{q}")])
    return prompt | llm | StrOutputParser()


def test_lcel_rubric_per_call_sync(chain: Any) -> None:
    spy = Spy()
    out = chain.invoke(
        {"q": "Hi"}, config={"configurable": {"rubric": "positive"}, "callbacks": [spy]}
    )
    assert isinstance(out, str)
    outs = chain.batch(
        [{"q": "a"}, {"q": "b"}],
        config=[
            {"configurable": {"rubric": "truthful"}, "callbacks": [spy]},
            {"configurable": {"rubric": "harmless"}, "callbacks": [spy]},
        ],
    )
    assert all(isinstance(o, str) for o in outs)
    parts = list(
        chain.stream(
            {"q": "c"}, config={"configurable": {"rubric": "truthful"}, "callbacks": [spy]}
        )
    )
    assert all(isinstance(p, str) for p in parts)
    assert spy.rubrics[0] == "positive"
    assert sorted(spy.rubrics[1:3]) == ["harmless", "truthful"]
    assert spy.rubrics[3] == "truthful"


async def test_lcel_rubric_per_call_async(chain: Any) -> None:
    spy = Spy()
    cfg = {"configurable": {"rubric": "positive"}, "callbacks": [spy]}
    assert isinstance(await chain.ainvoke({"q": "Hi"}, config=cfg), str)
    await chain.abatch(
        [{"q": "x"}], config={"configurable": {"rubric": "truthful"}, "callbacks": [spy]}
    )
    parts = [p async for p in chain.astream({"q": "y"}, config=cfg)]
    assert parts
    assert spy.rubrics == ["positive", "truthful", "positive"]


def test_call_keyword_beats_configurable_beats_instance(tiny_engine: Any) -> None:
    # shared_core.settings: call keyword > configurable > instance field > preset > defaults.
    model = ChatRain(engine=tiny_engine, rain_config=MICRO, max_tokens=2, rubric="truthful")
    assert model.invoke("x").response_metadata["rubric"] == "truthful"
    run = {"configurable": {"rubric": "harmless", "max_tokens": 1}}
    out = model.invoke("x", config=run)
    assert out.response_metadata["rubric"] == "harmless"
    assert out.usage_metadata is not None and out.usage_metadata["output_tokens"] == 1
    bound = model.bind(rubric="positive")
    assert bound.invoke("x").response_metadata["rubric"] == "positive"
    out = bound.invoke("x", config=run)
    assert out.response_metadata["rubric"] == "positive"  # the bound keyword wins
    assert out.usage_metadata is not None and out.usage_metadata["output_tokens"] == 1
    out = model.invoke("x", rubric="positive", max_tokens=2, config=run)
    assert out.response_metadata["rubric"] == "positive"
    assert out.usage_metadata is not None and out.usage_metadata["output_tokens"] == 2
    # A preset in the run config is a base: the instance's settings still go over it.
    fast = model.invoke("x", config={"configurable": {"rain_config": {"preset": "fast"}}})
    assert fast.response_metadata["rain_stats"]["iterations"] >= 1
    assert fast.usage_metadata is not None and fast.usage_metadata["output_tokens"] <= 2
    longer = model.invoke("x", rain_config={"max_new_tokens": 3})  # beats max_tokens=2
    assert longer.usage_metadata is not None and longer.usage_metadata["output_tokens"] == 3


async def test_astream_events_custom_events_and_rubric(llm: ChatRain) -> None:
    names = []
    rubric = None
    async for ev in llm.astream_events(
        "Hi", version="v2", config={"configurable": {"rubric": "truthful"}}
    ):
        if ev["event"] == "on_custom_event":
            names.append(ev["name"])
        if ev["event"] == "on_chat_model_end":
            rubric = ev["data"]["output"].response_metadata["rubric"]
    assert "rain_commit" in names
    assert rubric == "truthful"


def test_custom_events_without_parent_run(llm: ChatRain) -> None:
    spy = Spy()
    llm.invoke("Hi", config={"callbacks": [spy]})  # the model run is the root
    assert any(name == "rain_commit" for name, _ in spy.events)
    llm.invoke("Hi")  # no callbacks at all: nothing to dispatch, no error


async def test_async_does_not_block_and_cancels_the_search(tiny_engine: Any) -> None:
    spy = Spy()
    # No final check: a stream holds its commits until the check, and this test needs
    # the events of a running search.
    config = {**MICRO, "final_check": False}
    model = ChatRain(engine=tiny_engine, rain_config=config, max_tokens=400, callbacks=[spy])
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.02)

    tick_task = asyncio.create_task(ticker())
    task = asyncio.create_task(model.ainvoke("Write a long story"))
    started = time.monotonic()
    while (
        len(spy.events) < 2 or time.monotonic() - started < 1.0
    ) and time.monotonic() < started + 60:
        await asyncio.sleep(0.05)
    assert spy.events, "the search produced no events"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    tick_task.cancel()
    gaps = np.diff(ticks)
    # The loop kept running during the search (a blocking call would give no ticks;
    # native calls that hold the GIL, e.g. batch detokenisation, may delay a few).
    assert len(ticks) > 10 and float(np.median(gaps)) < 0.2
    await asyncio.sleep(1.0)
    seen = len(spy.events)
    await asyncio.sleep(1.0)
    assert len(spy.events) == seen  # the worker stopped


# --- messages and bad input ------------------------------------------------------------
def test_multi_turn_with_tools_and_repeated_roles(llm: ChatRain) -> None:
    history = [
        SystemMessage("You are terse."),
        SystemMessage("Use celsius."),
        HumanMessage("Weather?"),
        AIMessage(
            "", tool_calls=[{"name": "get_weather", "args": {"unit": "celsius"}, "id": "c1"}]
        ),
        ToolMessage("21 degrees", tool_call_id="c1"),
        HumanMessage("And?"),
        HumanMessage([{"type": "text", "text": "Thanks."}]),
    ]
    out = llm.invoke(history, stop=["\n\n"])
    assert isinstance(out, AIMessage)
    assert "\n\n" not in str(out.content)


def test_bad_input_is_a_clear_error(llm: ChatRain) -> None:
    with pytest.raises(RubricError, match="presets"):
        llm.invoke("Hi", config={"configurable": {"rubric": "kindness-ish"}})
    with pytest.raises(RainInputError, match="no messages"):
        llm.invoke([])
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    with pytest.raises(RainInputError, match="image_url"):
        llm.invoke([HumanMessage([{"type": "text", "text": "Look"}, image])])
    with pytest.raises(RainInputError, match="unknown option 'frobnicate'"):
        llm.invoke("Hi", frobnicate=1)
    with pytest.raises(RainConfigError, match="num_candidates"):
        llm.invoke("Hi", config={"configurable": {"num_candidates": 0}})
    with pytest.raises(RainInputError, match="tool_choice"):
        llm.bind_tools([get_weather], tool_choice="no_such_tool")


# --- tools and structured output --------------------------------------------------------
def test_required_tool_call_is_valid_even_from_a_random_model(llm: ChatRain) -> None:
    bound = llm.bind_tools([get_weather], tool_choice="any")
    out = bound.invoke(
        "Weather?", config={"configurable": {"rubric": "positive", "max_tokens": 40}}
    )
    assert out.response_metadata["rubric"] == "positive"
    assert not out.invalid_tool_calls
    (call,) = out.tool_calls
    assert call["name"] == "get_weather" and call["args"]["unit"] in ("celsius", "fahrenheit")
    assert get_weather.invoke(call["args"]).endswith("degrees")


@pytest.mark.parametrize(
    "schema",
    [
        Weather,
        Verdict,
        {
            "title": "pick",
            "description": "Pick a colour.",
            "type": "object",
            "properties": {"colour": {"enum": ["red", "blue"]}},
            "required": ["colour"],
        },
    ],
    ids=["pydantic", "typeddict", "json_schema"],
)
def test_with_structured_output(llm: ChatRain, schema: Any) -> None:
    structured = llm.with_structured_output(schema, include_raw=True)
    out = structured.invoke("Go", config={"configurable": {"rubric": "truthful", "max_tokens": 40}})
    assert out["parsing_error"] is None
    assert out["raw"].response_metadata["rubric"] == "truthful"
    parsed = out["parsed"]
    if schema is Weather:
        assert isinstance(parsed, Weather)
    elif schema is Verdict:
        assert isinstance(parsed["ok"], bool)
    else:
        assert parsed["colour"] in ("red", "blue")


def test_parse_tool_calls_from_text() -> None:
    setup = resolve_tools([get_weather], None)
    assert setup is not None and setup.required is None
    call = '{"name": "get_weather", "arguments": {"unit": "celsius"}}'
    text = f"Let me check.<tool_call>{call}</tool_call>"
    rest, calls, invalid = parse_tool_calls(text, setup)
    assert rest == "Let me check."
    assert calls[0]["name"] == "get_weather" and calls[0]["args"] == {"unit": "celsius"}
    assert not invalid
    rest, calls, invalid = parse_tool_calls("<tool_call>{not json</tool_call>", setup)
    assert not calls and invalid[0]["args"] == "{not json"
    assert parse_tool_calls("Just text.", setup) == ("Just text.", [], [])
    assert resolve_tools([get_weather], "none") is None
    forced = resolve_tools([get_weather], {"type": "function", "function": {"name": "get_weather"}})
    assert forced is not None and forced.required == ["get_weather"]


# --- the JSON-schema constraint ---------------------------------------------------------
@pytest.fixture(scope="module")
def call_constraint(smol_tokenizer: Any) -> JSONSchemaConstraint:
    setup = resolve_tools([get_weather], "any")
    assert setup is not None
    return JSONSchemaConstraint(setup.call_schema(), smol_tokenizer, stop_token_ids=[2])


def test_constraint_accepts_exactly_the_schema(
    call_constraint: JSONSchemaConstraint, smol_tokenizer: Any
) -> None:
    good = '{"name":"get_weather","arguments":{"unit":"celsius"}}'
    ids = smol_tokenizer(good, add_special_tokens=False)["input_ids"]
    for i, tok in enumerate(ids):
        mask = call_constraint.allowed(ids[:i])
        assert mask.dtype == bool and mask.shape == (len(smol_tokenizer),)
        assert mask[tok], f"token {i} of a valid call was forbidden"
        assert not mask[2]  # the end only once the JSON is complete
    assert call_constraint.allowed(ids)[2] and call_constraint.is_complete(ids)
    bad = smol_tokenizer('{"name":"rm_rf"', add_special_tokens=False)["input_ids"]
    assert not all(call_constraint.allowed(bad[:i])[bad[i]] for i in range(len(bad)))


def test_constraint_rolls_back_across_branches(
    call_constraint: JSONSchemaConstraint, smol_tokenizer: Any
) -> None:
    enc = lambda s: smol_tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    a = enc('{"name":"get_weather","arguments":{"unit":"c')
    b = enc('{"name":"get_weather","arguments":{"unit":"f')
    fresh = JSONSchemaConstraint(call_constraint.schema, smol_tokenizer, stop_token_ids=[2])
    mask_a = fresh.allowed(a).copy()
    call_constraint.allowed(b)  # move the shared matcher down another branch ...
    call_constraint._masks.clear()  # ... and make it recompute rather than recall
    assert np.array_equal(call_constraint.allowed(a), mask_a)


def test_constraint_bad_schema_is_a_clear_error(smol_tokenizer: Any) -> None:
    with pytest.raises(RainInputError, match="not valid JSON"):
        JSONSchemaConstraint("{oops", smol_tokenizer)
    with pytest.raises(RainInputError, match="must be a dict"):
        JSONSchemaConstraint("[1, 2]", smol_tokenizer)


def test_tool_call_json_is_what_the_prompt_shows() -> None:
    setup = resolve_tools([get_weather], "get_weather")
    assert setup is not None
    prompt = setup.system_prompt()
    assert "get_weather" in prompt and "You must call the tool get_weather" in prompt
    schema = setup.call_schema()
    assert schema["properties"]["name"] == {"const": "get_weather"}
    assert json.dumps(schema)  # plain JSON, ready for the grammar compiler


def test_stream_gate_holds_back_tool_calls() -> None:
    from langchain_rain.chat_models import _TextGate

    gate = _TextGate(resolve_tools([get_weather], None))
    shown = [gate.push(d) for d in ["Let me", " check.<tool", '_call>{"name":', "}</tool_call>"]]
    assert "".join(shown) == "Let me check."  # the call itself never streams as text
    bare = _TextGate(resolve_tools([get_weather], None))
    assert bare.push('{"name": "get_weather"') == ""  # a bare JSON call is held too
    plain = _TextGate(None)
    assert plain.push("<tool") == "<tool"  # no tools bound: nothing is held


def test_stream_events_v3_reads_configurable(llm: ChatRain) -> None:
    stream = llm.stream_events("Hi", config={"configurable": {"rubric": "truthful"}}, version="v3")
    events = list(stream)
    assert events
    assert stream.output.response_metadata["rubric"] == "truthful"


async def test_astream_events_after_bind_tools_reads_configurable(llm: ChatRain) -> None:
    bound = llm.bind_tools([get_weather], tool_choice="any")
    rubric = None
    async for ev in bound.astream_events(
        "Weather?", version="v2", config={"configurable": {"rubric": "positive", "max_tokens": 40}}
    ):
        if ev["event"] == "on_chat_model_end":
            output = ev["data"]["output"]
            rubric = output.response_metadata["rubric"]
            assert output.tool_calls[0]["name"] == "get_weather"
    assert rubric == "positive"
