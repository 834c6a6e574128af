"""Integration tests on the second model family: Gemma 3 270M (base model, Q4_K_M GGUF).

What Gemma brings that SmolLM2 does not, and each test below checks on the real model:

- a GGUF with no chat template: prompts are the documented transcript fallback, which
  starts with the tokenizer's ``<bos>`` (without it this model only repeats itself);
- a 262k-token SentencePiece vocabulary (other token ids, other stop tokens);
- sliding-window attention (window 512) in 15 of its 18 layers: a cached prefix keeps
  every layer's full history, so reuse stays exact past the window (the ``harmless``
  judge prompt alone is ~1,050 tokens).

The model loads once for the module (~45 s of GGUF parsing and de-quantizing on the
2-core CPU when it is otherwise idle, over 100 s when it is shared); the tests after it
take ~60 s, every search tiny.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

pytestmark = pytest.mark.integration

GEMMA = "gemma3-270m"
"""The name ``load_engine``, ``--model`` and the adapters' ``model=`` accept for it."""

TINY: dict[str, Any] = {
    "num_candidates": 2,
    "T": 3,
    "min_new_iterations": 1,
    "T_m": 2,
    "max_new_tokens": 4,
    "simulation_max_tokens": 2,
    "similarity_update": False,
    "dynamic_addition": False,
}

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def gemma():
    import torch

    from shared_core import load_engine

    # One intra-op thread for this module: on the shared 2-core CPU two threads spin
    # against the other jobs, and a 600-token pass took several times longer.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield load_engine(GEMMA)
    finally:
        torch.set_num_threads(threads)


def _long_prefix(backend: Any, tokens: int) -> list[int]:
    """The first ``tokens`` tokens of a real prompt (``<bos>``, a long transcript)."""
    lines = " ".join(f"Line {i}: the river runs past the old mill." for i in range(tokens // 8))
    ids = backend.encode(backend.render_chat([{"role": "user", "content": lines}]))
    assert len(ids) >= tokens
    return ids[:tokens]


def test_loads_by_name_with_its_own_architecture(gemma):
    from shared_core.models.hf import default_gemma_path

    backend = gemma.backend
    path = default_gemma_path()
    assert path.name == "gemma-3-270m-q4_k_m.gguf" and path.stat().st_size > 200_000_000
    cfg = backend.model.config
    assert cfg.model_type == "gemma3_text"
    assert cfg.sliding_window == 512 and "sliding_attention" in cfg.layer_types
    assert backend.vocab_size == 262_144 and backend.context_window == 32_768
    eos = backend.tokenizer.eos_token_id
    assert eos in backend.stop_token_ids
    # The GGUF ships no chat template: the transcript fallback is what every prompt uses.
    assert not backend.has_chat_template


def test_system_message_is_a_transcript_line_after_bos(gemma):
    backend = gemma.backend
    text = backend.render_chat([{"role": "system", "content": "Answer in one word."}, *QUESTION])
    assert text == (
        "<bos>System: Answer in one word.\nUser: What is the capital of France?\nAssistant:"
    )
    ids = backend.encode(text)
    assert ids[0] == backend.tokenizer.bos_token_id and ids.count(ids[0]) == 1


def test_template_without_system_role_gets_it_merged_into_the_first_user_turn(gemma):
    """A chat template that refuses a system role (as Gemma 2's and Gemma 3 IT-style
    templates do or fold it) gets the system text at the start of the first user turn."""
    from shared_core.models.hf import TransformersBackend

    tok = copy.deepcopy(gemma.backend.tokenizer)
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
        "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )
    backend = TransformersBackend(gemma.backend.model, tok, name="gemma-turns")
    text = backend.render_chat([{"role": "system", "content": "Be brief."}, *QUESTION])
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\nWhat is the capital of France?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    # The template's turn end is a stop token, as the backend reads it from the template.
    assert tok.convert_tokens_to_ids("<end_of_turn>") in backend.stop_token_ids


def test_reuse_is_exact_past_the_sliding_window(gemma):
    from shared_core.models.protocol import SampleRequest, TopTokensRequest

    backend = gemma.backend
    ids = _long_prefix(backend, 600)
    pinned = ids[:560]  # past the 512-token window
    backend.pin(pinned)
    try:
        # Shorter than the pin (the snapshot is cut), the pin plus a tail, and longer.
        prefixes = [tuple(ids[:540]), tuple(ids[:580]), tuple(ids)]
        before = backend.work.tokens_processed
        on = backend.top_tokens([TopTokensRequest(p, k=5) for p in prefixes])
        reused = backend.work.tokens_processed - before
        before = backend.work.tokens_processed
        off = backend.top_tokens([TopTokensRequest(p, k=5, reuse=False) for p in prefixes])
        fresh = backend.work.tokens_processed - before
        assert reused < fresh / 4  # the pinned prefix was really reused
        for a, b in zip(on, off, strict=True):
            assert a.token_ids == b.token_ids
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-3)
        # Decoding: the cache repeated over a greedy and a sampled row, step by step.
        request = {"n": 2, "max_tokens": 2, "temperature": 1.0, "seed": 3, "greedy_rows": 1}
        rows_on = backend.sample([SampleRequest(tuple(ids), **request)])[0]
        rows_off = backend.sample([SampleRequest(tuple(ids), reuse=False, **request)])[0]
        assert [r.token_ids for r in rows_on] == [r.token_ids for r in rows_off]
        for a_row, b_row in zip(rows_on, rows_off, strict=True):
            assert a_row.logprobs == pytest.approx(b_row.logprobs, abs=1e-3)
    finally:
        backend.unpin(pinned)


def test_engine_rain_and_vanilla(gemma):
    from shared_core import RainConfig

    # A base model goes on to write the next turn; the documented stop string cuts it.
    vanilla = gemma.vanilla(QUESTION, max_new_tokens=16, stop=("\nUser:",))
    assert vanilla.text.strip() and "User:" not in vanilla.text
    cfg = RainConfig(**TINY)
    result = gemma.generate(QUESTION, rubric="positive", config=cfg)
    assert result.text.strip() and result.stats.iterations >= TINY["min_new_iterations"]
    # Reuse off recomputes every prefix from scratch: the same search, the same answer.
    again = gemma.generate(QUESTION, rubric="positive", config=cfg.merged(reuse_cache=False))
    assert again.text == result.text


def test_chat_rain_on_gemma_with_a_system_message(gemma):
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

    from langchain_rain import ChatRain

    chat = ChatRain(model=GEMMA, rubric="positive", rain_config=TINY)
    assert chat.rain_engine is gemma  # one copy of the weights per process
    reply = chat.invoke(
        [SystemMessage("Answer in one word."), HumanMessage("What is the capital of France?")]
    )
    assert isinstance(reply, AIMessage) and isinstance(reply.content, str)
    assert reply.content.strip()
    assert reply.response_metadata["model_name"] == gemma.model_name


def test_rain_llm_on_gemma(gemma):
    from llama_index_rain import RainLLM

    llm = RainLLM(model=GEMMA, rubric="positive", config=TINY, max_new_tokens=6)
    response = llm.complete("What is the capital of France?")
    assert response.text.strip()
    assert response.additional_kwargs["iterations"] >= TINY["min_new_iterations"]
