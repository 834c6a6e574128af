"""A served model is one more way into ChatRain, RainLLM and RainEngine (a real llama-server).

The same ``base_url=`` / ``model=`` / ``api_key=`` / ``dialect=`` arguments reach the
served backend (``RainEngine.from_server`` where it exists, else
``shared_core.models.served.ServedModel`` under a RainEngine) from both adapters, and
both share one engine per server.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from langchain_rain import ChatRain
from llama_index_rain import RainLLM
from shared_core import RainEngine, RainInputError
from shared_core.models.served import ServedModel
from tests.scripted import TINY_SEARCH

pytestmark = pytest.mark.served

SEARCH = {**TINY_SEARCH, "simulation_max_tokens": 2, "max_new_tokens": 4}


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    from shared_core.models.served_launch import LlamaServer

    with LlamaServer(parallel=2, ctx=4096) as server:
        yield server.url


def test_both_adapters_reach_a_served_model_the_same_way(server_url: str) -> None:
    chat = ChatRain(base_url=server_url, dialect="llamacpp", rain_config=SEARCH)
    assert chat._loaded is None  # constructing connects to nothing
    llm = RainLLM(base_url=server_url, dialect="llamacpp", config=SEARCH)
    assert chat.rain_engine is llm.engine  # one engine per server, as per model id
    out = chat.invoke("Say hi.", rubric="positive")
    assert out.response_metadata["rubric"] == "positive"
    assert out.usage_metadata is not None and 0 < out.usage_metadata["output_tokens"] <= 4
    resp = llm.complete("Say hi.", rubric="positive")
    assert 0 < resp.additional_kwargs["completion_tokens"] <= 4
    own = RainEngine(backend=ServedModel(server_url, dialect="llamacpp"))
    assert own.model_name == llm.engine.model_name


def test_a_wrong_served_setup_is_a_clear_error(server_url: str) -> None:
    with pytest.raises(RainInputError, match="dialect"):
        RainLLM(base_url=server_url, dialect="no-such-server")
    with pytest.raises(RainInputError, match="api_key= is for a served model"):
        ChatRain(api_key="secret")
