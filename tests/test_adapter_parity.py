"""ChatRain, RainLLM and RainEngine take the same ways in, refuse the same mistakes, and
read a tool choice the same way (shared_core.settings.EngineSource, shared_core.tools.tool_set).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pytest
from langchain_core.tools import tool
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.prompts import PromptTemplate
from llama_index.core.tools import FunctionTool
from pydantic import BaseModel

from langchain_rain import ChatRain
from langchain_rain._tools import parse_tool_calls, resolve_tools
from llama_index_rain import RainLLM
from llama_index_rain._tools import plan_tools
from shared_core import RainEngine, RainInputError, load_engine
from shared_core.models.scripted import ScriptedLM, choice_table
from tests.scripted import TINY_SEARCH, ScriptedEvaluator

QUICK = {**TINY_SEARCH, "simulation_max_tokens": 2, "max_new_tokens": 4}


@tool
def festival_month(town: Literal["Rainville", "Eastport"]) -> str:
    """The month of a town's festival."""
    return "October" if town == "Rainville" else "May"


class FestivalArgs(BaseModel):
    town: Literal["Rainville", "Eastport"]


def _festival_month(town: str) -> str:
    """The month of a town's festival."""
    return "October" if town == "Rainville" else "May"


LI_FESTIVAL = FunctionTool.from_defaults(
    fn=_festival_month, name="festival_month", fn_schema=FestivalArgs
)


# --- the ways in ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_folder(tiny_model: Any, smol_tokenizer: Any, tmp_path_factory: Any) -> Path:
    """The tiny model saved as a local model folder (a "model id or path")."""
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    tiny_model.save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder


def test_every_way_in_gives_the_engine_it_names(
    tiny_model: Any, smol_tokenizer: Any, tiny_engine: RainEngine, tiny_folder: Path
) -> None:
    # engine=
    assert ChatRain(engine=tiny_engine).rain_engine is tiny_engine
    assert RainLLM(engine=tiny_engine).engine is tiny_engine
    # a loaded model and its tokenizer (ChatRain used to raise a raw pydantic error here)
    chat = ChatRain(model=tiny_model, tokenizer=smol_tokenizer, rain_config=QUICK)
    assert chat.rain_engine.backend.model is tiny_model
    assert ChatRain.from_transformers(tiny_model, smol_tokenizer).rain_engine.backend.model is (
        tiny_model
    )
    assert RainLLM(tiny_model, smol_tokenizer).engine.backend.model is tiny_model
    assert RainLLM(model=tiny_model, tokenizer=smol_tokenizer).engine.backend.model is tiny_model
    assert RainEngine(model=tiny_model, tokenizer=smol_tokenizer).backend.model is tiny_model
    assert chat.invoke("Hi").usage_metadata is not None
    # a model id or local path: loaded once per process, shared by both adapters
    by_path = ChatRain(model=str(tiny_folder))
    assert by_path._loaded is None  # construction loads nothing
    engine = by_path.rain_engine
    assert RainLLM(str(tiny_folder)).engine is engine
    assert RainLLM(model=tiny_folder).engine is engine
    assert load_engine(str(tiny_folder)) is engine
    own = RainEngine.from_pretrained(tiny_folder)
    assert own.backend.vocab_size == engine.backend.vocab_size
    out = RainLLM(str(tiny_folder), config=QUICK).complete("Hi")
    assert out.additional_kwargs["completion_tokens"] <= 4


@pytest.mark.integration
def test_gguf_file_and_the_default_model(default_engine: RainEngine) -> None:
    from shared_core.models.hf import default_gguf_path

    path = default_gguf_path()
    engine = load_engine(str(path.parent), path.name)
    assert ChatRain(model=str(path.parent), gguf_file=path.name).rain_engine is engine
    assert RainLLM(str(path.parent), gguf_file=path.name).engine is engine
    assert ChatRain().rain_engine is default_engine
    assert RainLLM().engine is default_engine
    assert RainLLM.from_default().engine is default_engine


def test_the_ways_in_are_checked_alike(
    tiny_model: Any, smol_tokenizer: Any, tiny_engine: RainEngine
) -> None:
    for make in (
        lambda **kw: ChatRain(**kw),
        lambda **kw: RainLLM(**kw),
    ):
        with pytest.raises(RainInputError, match="either model= or engine="):
            make(model=tiny_model, tokenizer=smol_tokenizer, engine=tiny_engine)
        with pytest.raises(RainInputError, match="without its"):
            make(model=tiny_model)
        with pytest.raises(RainInputError, match="tokenizer without a model"):
            make(tokenizer=smol_tokenizer)
        with pytest.raises(RainInputError, match="api_key= is for a served model"):
            make(api_key="k")
        with pytest.raises(RainInputError, match="serves a model by name"):
            make(base_url="http://127.0.0.1:9", model=tiny_model, tokenizer=smol_tokenizer)


# --- unknown keywords ----------------------------------------------------------------------
def test_unknown_keywords_are_refused_with_the_accepted_names(tiny_engine: RainEngine) -> None:
    with pytest.raises(
        RainInputError,
        match=r"ChatRain\(\) got an unknown option 'bogus_option'; accepted options: "
        r".*base_url.*max_tokens.*rain_config.*rubric.*stop.*temperature.*timeout.*tokenizer",
    ):
        ChatRain(bogus_option=1)
    with pytest.raises(RainInputError, match=r"'max_new_token' \(did you mean 'max_tokens'\?\)"):
        ChatRain(max_new_token=6)
    with pytest.raises(
        RainInputError,
        match=r"RainLLM\(\) got an unknown option 'bogus_option'; accepted options: .*"
        r"completion_to_prompt.*context_window.*generate_kwargs.*max_new_tokens.*"
        r"query_wrapper_prompt.*system_prompt.*temperature",
    ):
        RainLLM(engine=tiny_engine, bogus_option=1)
    chat, llm = ChatRain(engine=tiny_engine), RainLLM(engine=tiny_engine)
    per_call = r"got an unknown option 'bogus_option'; accepted options: .*rubric.*temperature"
    with pytest.raises(RainInputError, match="ChatRain " + per_call):
        chat.invoke("Hi", bogus_option=1)
    with pytest.raises(RainInputError, match="ChatRain " + per_call):
        chat.bind_tools([festival_month], bogus_option=1)
    with pytest.raises(RainInputError, match=r"with_structured_output got an unknown option"):
        chat.with_structured_output(FestivalArgs, bogus_option=1)
    with pytest.raises(RainInputError, match="RainLLM " + per_call):
        llm.complete("Hi", bogus_option=1)
    with pytest.raises(RainInputError, match="RainLLM " + per_call):
        llm.chat([ChatMessage(role="user", content="Hi")], bogus_option=1)
    with pytest.raises(RainInputError, match="RainLLM " + per_call):
        llm.chat_with_tools([LI_FESTIVAL], user_msg="Hi", bogus_option=1)


# --- HuggingFaceLLM's fields ---------------------------------------------------------------
def test_rain_llm_honours_the_fields_of_a_huggingface_llm(
    tiny_model: Any, smol_tokenizer: Any, tiny_engine: RainEngine
) -> None:
    small = {k: v for k, v in QUICK.items() if k != "max_new_tokens"}
    llm = RainLLM(tiny_model, smol_tokenizer, max_new_tokens=6, config=small)
    assert llm.metadata.num_output == 6
    assert llm.complete("Hi").additional_kwargs["completion_tokens"] <= 6
    assert llm.complete("Hi", max_new_tokens=2).additional_kwargs["completion_tokens"] <= 2
    assert RainLLM(engine=tiny_engine, temperature=0.5).config["temperature"] == 0.5
    mapped = RainLLM(engine=tiny_engine, generate_kwargs={"max_new_tokens": 5, "top_k": 3})
    assert (mapped.metadata.num_output, mapped.config["expansion_top_k"]) == (5, 3)
    with pytest.raises(RainInputError, match=r"generate_kwargs\['num_beams'\]"):
        RainLLM(engine=tiny_engine, generate_kwargs={"num_beams": 4})
    # context_window is a cap: reported, enforced on the prompt, and the answer fits in it.
    capped = RainLLM(engine=tiny_engine, context_window=40, config={**small, "max_new_tokens": 30})
    assert capped.metadata.context_window == 40
    prompt = "Say hi."
    used = len(tiny_engine.prompt_ids([{"role": "user", "content": prompt}]))
    out = capped.complete(prompt)
    assert out.additional_kwargs["prompt_tokens"] == used
    assert out.additional_kwargs["completion_tokens"] <= 40 - used
    with pytest.raises(RainInputError, match=r"context_window=40"):
        capped.complete("rain " * 60)


def test_prompt_fields_shape_the_prompt_as_huggingface_llm_does(tiny_engine: RainEngine) -> None:
    def tokens(msgs: list[dict[str, str]]) -> int:
        return len(tiny_engine.prompt_ids(msgs))

    llm = RainLLM(
        engine=tiny_engine,
        config=QUICK,
        system_prompt="Be brief.",
        query_wrapper_prompt=PromptTemplate("Question: {query_str}"),
        completion_to_prompt=lambda text: text + " Answer:",
    )
    out = llm.complete("Why rain?")
    expected = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Question: Why rain? Answer:"},
    ]
    assert out.additional_kwargs["prompt_tokens"] == tokens(expected)
    raw = llm.complete("Why rain?", formatted=True)
    assert raw.additional_kwargs["prompt_tokens"] == tokens(
        [{"role": "user", "content": "Why rain?"}]
    )
    joined = RainLLM(
        engine=tiny_engine,
        config=QUICK,
        messages_to_prompt=lambda ms: " | ".join(f"{m.role.value}: {m.content}" for m in ms),
    )
    history = [ChatMessage(role="user", content="Hi"), ChatMessage(role="assistant", content="Yo")]
    history.append(ChatMessage(role="user", content="Rain?"))
    resp = joined.chat(history)
    one_turn = [{"role": "user", "content": "user: Hi | assistant: Yo | user: Rain?"}]
    assert resp.additional_kwargs["prompt_tokens"] == tokens(one_turn)


# --- one tool-choice reading -----------------------------------------------------------------
CHOICES: list[tuple[Any, list[str] | str | None]] = [
    (None, None),
    ("auto", None),
    ("none", "no tools"),
    (False, "no tools"),
    ("any", ["festival_month"]),
    ("required", ["festival_month"]),
    (True, ["festival_month"]),
    ("festival_month", ["festival_month"]),
    ({"type": "function", "function": {"name": "festival_month"}}, ["festival_month"]),
    ({"name": "festival_month"}, ["festival_month"]),
    ({"type": "any"}, ["festival_month"]),
]


@pytest.mark.parametrize(("choice", "required"), CHOICES, ids=[repr(c) for c, _ in CHOICES])
def test_a_tool_choice_means_the_same_in_both_adapters(choice: Any, required: Any) -> None:
    lc = resolve_tools([festival_month], choice)
    li = plan_tools([LI_FESTIVAL], tool_required=False, tool_choice=choice)
    for got in (lc, li):
        if required == "no tools":
            assert got is None
        else:
            assert got is not None and got.required == required and got.bare_calls
    assert (lc is None) == (li is None)
    if lc is not None and li is not None:
        assert lc.names == li.names


def test_a_wrong_tool_choice_is_the_same_error_in_both() -> None:
    messages = []
    for make in (
        lambda: resolve_tools([festival_month], "weather"),
        lambda: plan_tools([LI_FESTIVAL], tool_required=False, tool_choice="weather"),
    ):
        with pytest.raises(RainInputError, match="names no given tool") as info:
            make()
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    # LlamaIndex's tool_required is tool_choice="required" spelled another way.
    forced = plan_tools([LI_FESTIVAL], tool_required=True, tool_choice=None)
    assert forced is not None and forced.required == ["festival_month"]


BARE = '{"name": "festival_month", "arguments": {"town": "Eastport"}}'


def test_a_bare_json_answer_is_a_call_in_both_adapters() -> None:
    lc = resolve_tools([festival_month], "auto")
    li = plan_tools([LI_FESTIVAL], tool_required=False, tool_choice="auto")
    assert lc is not None and li is not None
    _, calls, invalid = parse_tool_calls(BARE, lc)
    li_calls, li_invalid = li.parse(BARE)
    assert [(c["name"], c["args"]) for c in calls] == [
        (c["name"], c["arguments"]) for c in li_calls
    ] == [("festival_month", {"town": "Eastport"})]
    assert not invalid and not li_invalid


def test_both_adapters_turn_the_same_model_answer_into_the_same_call() -> None:
    # A scripted model that answers with a bare JSON call: end to end through RAIN.
    engine = RainEngine(
        backend=ScriptedLM(choice_table({BARE: 1.0})),
        evaluator=ScriptedEvaluator(lambda text: 1.0),
        config={**TINY_SEARCH, "max_new_tokens": 80},
    )
    msg = ChatRain(engine=engine).bind_tools([festival_month]).invoke("When is it in Eastport?")
    assert [(c["name"], c["args"]) for c in msg.tool_calls] == [
        ("festival_month", {"town": "Eastport"})
    ]
    assert msg.content == ""
    llm = RainLLM(engine=engine)
    resp = llm.chat_with_tools([LI_FESTIVAL], user_msg="When is it in Eastport?")
    (sel,) = llm.get_tool_calls_from_response(resp)
    assert (sel.tool_name, sel.tool_kwargs) == ("festival_month", {"town": "Eastport"})
    assert resp.message.content == ""
    # Streaming holds the call back in both.
    assert "".join(str(c.content) for c in ChatRain(engine=engine).bind_tools(
        [festival_month]).stream("When?")) == ""
    assert all(not r.delta for r in llm.stream_chat_with_tools([LI_FESTIVAL], user_msg="When?"))
    # With the tools withheld (tool_choice="none") the same answer is plain text in both.
    text = ChatRain(engine=engine).bind_tools([festival_month], tool_choice="none").invoke("When?")
    assert text.content == BARE and not text.tool_calls
    plain = llm.chat_with_tools([LI_FESTIVAL], user_msg="When?", tool_choice="none")
    assert plain.message.content == BARE
    assert not llm.get_tool_calls_from_response(plain, error_on_no_tool_call=False)


def test_a_required_call_is_valid_in_both_adapters(tiny_engine: RainEngine) -> None:
    cfg = {**QUICK, "max_new_tokens": 40}
    msg = ChatRain(engine=tiny_engine, rain_config=cfg).bind_tools(
        [festival_month], tool_choice="festival_month"
    ).invoke("When is the festival?")
    (call,) = msg.tool_calls
    assert call["name"] == "festival_month" and call["args"]["town"] in ("Rainville", "Eastport")
    llm = RainLLM(engine=tiny_engine, config=cfg)
    resp = llm.chat_with_tools([LI_FESTIVAL], user_msg="When?", tool_choice="festival_month")
    (sel,) = llm.get_tool_calls_from_response(resp)
    assert sel.tool_name == "festival_month"
    assert sel.tool_kwargs["town"] in ("Rainville", "Eastport")
