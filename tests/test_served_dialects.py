"""Request/response mapping of each server dialect, on recorded responses (no server needed).

``tests/recorded/llamacpp.json`` was recorded from the real ``llama-server`` built by
``scripts/llama_server.sh`` (the embedded SmolLM2 GGUF; ``python -m tests.recorded.record``);
``vllm.json`` and ``sglang.json`` were written by hand from those servers' source and
documentation (each file's ``source`` field says from what): no GPU here to run them.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import pytest

from shared_core.errors import RainServerError
from shared_core.models.served_dialects import (
    Io,
    LlamaCppDialect,
    SGLangDialect,
    VLLMDialect,
)

RECORDED = Path(__file__).parent / "recorded"


def load(name: str) -> dict[str, Any]:
    return json.loads((RECORDED / name).read_text(encoding="utf-8"))


def subset(expected: Any, actual: Any, where: str = "body") -> None:
    """Every field of ``expected`` is in ``actual`` with the same value (dicts: recursively)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: {actual!r} is not an object"
        for key, value in expected.items():
            assert key in actual, f"{where}: field {key!r} not sent"
            subset(value, actual[key], f"{where}.{key}")
    else:
        assert actual == expected, f"{where}: sent {actual!r}, expected {expected!r}"


class Replay:
    """An Io that answers each request from a recorded exchange, checking what was sent."""

    def __init__(self, exchanges: list[dict[str, Any]]) -> None:
        self.exchanges = list(exchanges)
        self.sent: list[tuple[str, dict[str, Any] | None]] = []
        self.io = Io(post=self.post, get=self.get, stream=self.stream, url="http://recorded")

    def _answer(
        self, method: str, path: str, body: dict[str, Any] | None, stream: bool = False
    ) -> Any:
        assert self.exchanges, f"unexpected {method} {path}"
        ex = self.exchanges.pop(0)
        assert bool(ex.get("stream")) == stream, f"{path}: streamed {stream}, recorded not"
        self.sent.append((path, body))
        assert ex["path"] == path, f"sent {method} {path}, recorded {ex['path']}"
        if "body" in ex:
            subset(ex["body"], body)
        status = ex.get("status", 200)
        if status >= 400:
            raise RainServerError(f"HTTP {status}", url=path, status=status)
        return ex["response"]

    async def post(self, path: str, body: dict[str, Any]) -> Any:
        return self._answer("POST", path, body)

    async def get(self, path: str) -> Any:
        return self._answer("GET", path, None)

    async def stream(self, path: str, body: dict[str, Any]) -> Any:
        return self._answer("POST", path, body, stream=True)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def pairs(rows: list[list[tuple[int, float]]]) -> list[list[list[float]]]:
    return [[[t, lp] for t, lp in row] for row in rows]


# --- vLLM --------------------------------------------------------------------------------


VLLM = load("vllm.json")
MODEL = "Qwen/Qwen2.5-7B-Instruct"


def test_vllm_probe_reads_models_and_context_window() -> None:
    replay = Replay(VLLM["probe"])
    info = run(VLLMDialect.probe(replay.io))
    assert info.dialect == "vllm"
    assert info.models == [MODEL]
    assert info.context_window == 32768


def test_vllm_top_tokens_one_batched_request() -> None:
    case = VLLM["top_tokens"]
    replay = Replay([case["request"] | {"response": case["response"]}])
    got = run(VLLMDialect(MODEL).top_logprobs(replay.io, [[9707, 11, 1879], [9707, 11, 358]], 3))
    assert pairs(got) == case["expected"]
    assert replay.io.traffic.requests == 0  # counted by the transport, not the dialect
    assert replay.io.traffic.cached_tokens == 3


def test_vllm_sample_maps_token_ids_logprobs_and_finish() -> None:
    case = VLLM["sample"]
    replay = Replay([case["request"] | {"response": case["response"]}])
    rows = run(
        VLLMDialect(MODEL).sample(
            replay.io, [9707, 11], n=2, max_tokens=4, temperature=0.7, top_k=5, seed=42
        )
    )
    assert [r.__dict__ for r in rows] == case["expected"]


def test_vllm_sample_sends_top_k_minus_one_for_whole_vocabulary() -> None:
    case = VLLM["sample"]
    replay = Replay(
        [{"path": "/v1/completions", "body": {"top_k": -1}, "response": case["response"]}]
    )
    run(
        VLLMDialect(MODEL).sample(replay.io, [1], n=2, max_tokens=4, temperature=1, top_k=0, seed=0)
    )


def test_vllm_labels_by_generative_scoring_one_request_per_label() -> None:
    case = VLLM["generative_scoring"]
    replay = Replay(case["requests"])
    got = run(VLLMDialect(MODEL).label_logprobs(replay.io, case["prompts"], case["labels"]))
    probs = [math.exp(v) for row in got for v in row]
    assert probs == pytest.approx([p for row in case["expected_probs"] for p in row])
    assert not replay.exchanges


def test_vllm_labels_without_scoring_endpoint_top_k_then_forced_read() -> None:
    case = VLLM["labels_without_scoring"]
    dialect = VLLMDialect(MODEL)
    replay = Replay(case["requests"])
    got = run(dialect.label_logprobs(replay.io, case["prompts"], case["labels"]))
    # Label 32 was in the top 20 (exact); 33 was not and was read by forcing it.
    assert got == case["expected"]
    assert dialect.scoring_path is None  # the 404 is remembered: no second try
    assert not replay.exchanges


def test_vllm_forced_read_after_bias_is_an_error_not_a_value() -> None:
    case = VLLM["labels_without_scoring"]
    dialect = VLLMDialect(MODEL)
    dialect.scoring_path = None
    biased = dict(case["requests"][2], response=VLLM["biased_forced_read"]["response"])
    replay = Replay([case["requests"][1], biased])
    with pytest.raises(RainServerError, match="logprobs-mode raw_logprobs"):
        run(dialect.label_logprobs(replay.io, case["prompts"], case["labels"]))


def test_vllm_more_top_tokens_than_max_logprobs_names_the_flag() -> None:
    dialect = VLLMDialect(MODEL)
    with pytest.raises(RainServerError, match="--max-logprobs"):
        run(dialect.top_logprobs(Replay([]).io, [[1, 2]], 21))


# --- SGLang ------------------------------------------------------------------------------


SGLANG = load("sglang.json")


def test_sglang_probe() -> None:
    replay = Replay(SGLANG["probe"][1:])
    info = run(SGLangDialect.probe(replay.io))
    assert info.dialect == "sglang"
    assert info.model_path == "meta-llama/Llama-3.1-8B-Instruct"
    assert info.context_window == 131072


def test_llamacpp_probe_declines_a_server_without_props() -> None:
    replay = Replay(SGLANG["probe"][:1])
    with pytest.raises(RainServerError) as err:
        run(LlamaCppDialect.probe(replay.io))
    assert err.value.status == 404  # the backend's detection then tries the next dialect


def test_sglang_top_tokens() -> None:
    case = SGLANG["top_tokens"]
    replay = Replay([case["request"] | {"response": case["response"]}])
    got = run(SGLangDialect().top_logprobs(replay.io, [[128000, 9906], [128000, 13347]], 2))
    assert pairs(got) == case["expected"]
    assert replay.io.traffic.cached_tokens == 2


def test_sglang_sample() -> None:
    case = SGLANG["sample"]
    replay = Replay([case["request"] | {"response": case["response"]}])
    rows = run(
        SGLangDialect().sample(
            replay.io, [128000, 9906], n=2, max_tokens=3, temperature=0.7, top_k=5, seed=7
        )
    )
    assert [r.__dict__ for r in rows] == case["expected"]


def test_sglang_labels_by_token_ids_logprob_in_one_request() -> None:
    case = SGLANG["labels"]
    replay = Replay([case["request"] | {"response": case["response"]}])
    got = run(SGLangDialect().label_logprobs(replay.io, [[1, 2, 3], [1, 2, 4]], [32, 33]))
    assert got == case["expected"]


def test_sglang_missing_label_is_an_error() -> None:
    case = SGLANG["labels"]
    response = json.loads(json.dumps(case["response"]))
    del response[1]["meta_info"]["output_token_ids_logprobs"][0][1]
    replay = Replay([case["request"] | {"response": response}])
    with pytest.raises(RainServerError, match="unexpected response"):
        run(SGLangDialect().label_logprobs(replay.io, [[1, 2, 3], [1, 2, 4]], [32, 33]))


# --- llama.cpp (recorded from the real server) -------------------------------------------


LLAMACPP = load("llamacpp.json")


def test_llamacpp_probe() -> None:
    replay = Replay(LLAMACPP["probe"])
    info = run(LlamaCppDialect.probe(replay.io))
    assert info.dialect == "llamacpp"
    assert info.slots == LLAMACPP["expected_probe"]["slots"]
    assert info.context_window == LLAMACPP["expected_probe"]["context_window"]
    assert info.model_path and info.model_path.endswith(".gguf")


@pytest.mark.parametrize("case", LLAMACPP["calls"], ids=lambda c: c["name"])
def test_llamacpp_recorded(case: dict[str, Any]) -> None:
    replay = Replay(case["exchanges"])
    dialect = LlamaCppDialect(LLAMACPP.get("model"))
    dialect.label_top_n = 20  # what the recording asked (n_probs 20, then forced reads)
    args = case["args"]
    if case["kind"] == "top":
        got: Any = pairs(run(dialect.top_logprobs(replay.io, args["prefixes"], args["n"])))
    elif case["kind"] == "sample":
        rows = run(dialect.sample(replay.io, args["prefix"], **args["options"]))
        got = [r.__dict__ for r in rows]
    else:
        got = run(dialect.label_logprobs(replay.io, args["prompts"], args["labels"]))
    assert got == case["expected"]
    assert not replay.exchanges


def test_llamacpp_labels_found_in_the_first_read_need_no_forced_read() -> None:
    """By default the first read lists the top ``label_top_n`` tokens (1024): labels far
    down the list are read there, in one request, not one forced read each."""
    case = next(c for c in LLAMACPP["calls"] if c["kind"] == "labels")
    first = json.loads(json.dumps(case["exchanges"][0]))
    labels, expected = case["args"]["labels"], case["expected"]
    for result, row in zip(first["response"], expected, strict=True):
        top = result["completion_probabilities"][0]["top_logprobs"]
        listed = {t["id"] for t in top}
        # The longer list the server returns: the forced-read values, further down.
        top += [
            {"id": t, "logprob": lp} for t, lp in zip(labels, row, strict=True) if t not in listed
        ]
    first["body"]["n_probs"] = LlamaCppDialect.label_top_n
    replay = Replay([first])
    got = run(
        LlamaCppDialect(LLAMACPP.get("model")).label_logprobs(
            replay.io, case["args"]["prompts"], labels
        )
    )
    assert got == expected
    assert not replay.exchanges  # one request: no forced read


def _unstreamed(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The non-streamed answer a stream of events stands for (one final per sample)."""
    finals: dict[int, dict[str, Any]] = {}
    for ev in events:
        final = finals.setdefault(ev["index"], {"tokens": [], "completion_probabilities": []})
        if ev["stop"]:
            final.update({k: v for k, v in ev.items() if k != "tokens"})
        else:
            final["tokens"] += ev["tokens"]
            final["completion_probabilities"] += ev["completion_probabilities"]
    return [finals[i] for i in sorted(finals)]


def test_llamacpp_token_without_a_logprob_is_read_exactly() -> None:
    """The server gives no log-prob for a token that ends mid-way through a UTF-8
    character (an emoji's byte tokens); the dialect reads that one with a label read."""
    case = next(c for c in LLAMACPP["calls"] if c["name"] == "sample_two_rows")
    exchange = json.loads(json.dumps(case["exchanges"][0]))
    answer = _unstreamed(exchange["response"])
    first = answer[0]
    hole = first["completion_probabilities"].pop(1)
    args = case["args"]
    read = {
        "path": "/completion",
        "body": {"prompt": [args["prefix"] + first["tokens"][:1]], "n_predict": 1},
        "response": [
            {
                "index": 0,
                "tokens_evaluated": len(args["prefix"]) + 1,
                "completion_probabilities": [
                    {"id": hole["id"], "logprob": hole["logprob"], "top_logprobs": [hole]}
                ],
            }
        ],
    }
    replay = Replay([{"path": "/completion", "response": answer}, read])
    replay.io.stream = None  # a transport without streaming: one JSON answer
    rows = run(LlamaCppDialect(None).sample(replay.io, args["prefix"], **args["options"]))
    assert [r.__dict__ for r in rows] == case["expected"]
    assert not replay.exchanges


def test_llamacpp_stream_missing_byte_tokens_is_asked_again_unstreamed() -> None:
    case = next(c for c in LLAMACPP["calls"] if c["name"] == "sample_two_rows")
    exchange = json.loads(json.dumps(case["exchanges"][0]))
    events = exchange["response"]
    answer = _unstreamed(events)
    # Drop one partial event, as the server does for a byte token of an emoji.
    dropped = next(i for i, ev in enumerate(events) if not ev["stop"] and ev["index"] == 0)
    del events[dropped]
    replay = Replay([exchange, {"path": "/completion", "response": answer}])
    args = case["args"]
    rows = run(LlamaCppDialect(None).sample(replay.io, args["prefix"], **args["options"]))
    assert [r.__dict__ for r in rows] == case["expected"]
    assert not replay.exchanges
