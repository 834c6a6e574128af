"""Reliability of the engine: budgets, cancellation, concurrency, determinism, bad input.

The engine here is real end to end -- transformers backend, prefix cache,
SelfEvaluator -- over a tiny random Llama built from a fixed torch seed, with
SmolLM2's real tokenizer and chat template. Its weights are untied and spread
out so that different seeds give different answers (the conftest model only
ever repeats its last token), which is what makes "same seed, same output"
a claim that can fail.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared_core import (
    RainCancelled,
    RainConfig,
    RainConfigError,
    RainEngine,
    RainError,
    RainInputError,
    RainResult,
    RubricError,
)

pytestmark = pytest.mark.timeout(180)

MODEL_SEED = 1234
"""torch seed the tiny model is built from (in this process and in the restarted one)."""
RUBRIC: dict[str, Any] = {
    "name": "tiny-judge",
    "instruction": "Judge the reply.",
    "question": "Is it good?",
    "good": {"label": "A", "text": "good"},
    "bad": {"label": "B", "text": "bad"},
    "scoring": "soft",
}
"""A short rubric (no few-shot examples) with soft scores, so values differ between branches."""
SEARCH = RainConfig.paper(
    num_candidates=3,
    token_set_lengths=(2,),
    T=6,
    min_new_iterations=6,
    T_m=6,
    V=1.0,
    root_prior_mix=1.0,
    max_new_tokens=5,
    simulation_max_tokens=3,
    similarity_update=False,
    dynamic_addition=False,
)
"""A small search whose commits depend on the seed (uniform root priors, value-driven)."""
LONG = SEARCH.merged(T=50, min_new_iterations=15, T_m=6, max_new_tokens=64)
"""A search that would run for minutes on this machine without a budget."""
PROMPTS = ("Tell me a story.", "What is 2+2?", "Name a colour.")


def build_model(vocab_size: int) -> Any:
    """The tiny random Llama, identical in every process for the same torch version."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(MODEL_SEED)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.config.name_or_path = "tiny-random-llama-untied"
    return model


def answer_of(result: RainResult) -> dict[str, Any]:
    """Everything of a result that must be reproducible (timings left out)."""
    data = result.to_dict()
    data.pop("elapsed_s")
    data["stats"].pop("breakdown_s")
    data["token_ids"] = result.token_ids
    return data


def _same_answer(got: Any, alone: dict[str, Any]) -> bool:
    """Same text, tokens and trace (every candidate's p/n/v); final score to float rounding.

    The last bits of a float sum on CPU are not fixed: a shared prefix may have
    been cached in other chunks (concurrent requests), and the BLAS library may
    split a product over another number of threads when the machine is busy.
    Scores then differ by ~1e-7, which the 4-decimal trace does not see.
    """
    if isinstance(got, Exception):
        raise got
    got, alone = copy.deepcopy(got), copy.deepcopy(alone)
    a, b = got["stats"].pop("final_score"), alone["stats"].pop("final_score")
    return bool(got == alone and a == pytest.approx(b, abs=1e-5))


@pytest.fixture(scope="module")
def engine(smol_tokenizer) -> RainEngine:
    eng = RainEngine(model=build_model(len(smol_tokenizer)), tokenizer=smol_tokenizer)
    eng.generate("warm up", rubric=RUBRIC, config=SEARCH, max_new_tokens=1)
    return eng


@pytest.fixture(scope="module")
def solo(engine: RainEngine) -> dict[tuple[str, int], dict[str, Any]]:
    """Each prompt and seed run alone, one after another: the reference answers."""
    return {
        (p, seed): answer_of(engine.generate(p, rubric=RUBRIC, config=SEARCH, seed=seed))
        for p in PROMPTS
        for seed in (0, 1)
    }


def pins(engine: RainEngine) -> set[tuple[int, ...]]:
    return set(engine.backend.pinned_prefixes())  # type: ignore[attr-defined]


@pytest.fixture
def no_leak(engine: RainEngine) -> Iterator[None]:
    """Asserts that the test leaves the backend's pinned KV prefixes as it found them."""
    before = pins(engine)
    yield
    assert pins(engine) == before, "pinned KV-cache prefixes leaked"


def test_reference_answers_depend_on_the_seed(solo: dict[Any, dict[str, Any]]) -> None:
    # Otherwise "same seed → same output" below would hold trivially.
    for p in PROMPTS:
        assert solo[(p, 0)]["token_ids"] != solo[(p, 1)]["token_ids"]
    assert len({tuple(a["token_ids"]) for a in solo.values()}) == len(solo)


# --- 1. budgets ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "budget", [{"max_iterations": 3}, {"max_nodes": 2}, {"max_time_s": 0.05}], ids=str
)
def test_budget_commits_what_it_has_and_says_so(
    engine: RainEngine, budget: dict[str, Any], no_leak: None
) -> None:
    ((name, limit),) = budget.items()
    result = engine.generate("Tell me a story.", rubric=RUBRIC, config=LONG, **budget)
    # An answer, never an exception and never nothing.
    assert result.token_ids and result.text.strip()
    assert result.stats.budget_exhausted == name
    assert result.finish_reason in {"budget", "stop", "length"}
    last = result.trace[-1]
    assert last["forced"] and last["forced"].startswith(name)
    assert result.to_dict()["stats"]["budget_exhausted"] == name  # what adapters report
    if name == "max_iterations":
        assert result.stats.iterations == limit
    if name == "max_nodes":
        assert result.stats.iterations == 1  # one expansion already reaches 2 nodes
    # Far below what LONG would spend unbudgeted (50 iterations per commit, 64 tokens).
    assert result.stats.iterations < 50 and result.elapsed_s < 60


def test_budget_in_a_stream_ends_with_a_forced_commit(engine: RainEngine, no_leak: None) -> None:
    stream = engine.stream("Name a colour.", rubric=RUBRIC, config=LONG, max_iterations=7)
    commits = list(stream)
    assert commits[-1].forced is not None and "max_iterations" in commits[-1].forced
    assert "".join(c.text for c in commits) == stream.result.text
    assert stream.result.stats.budget_exhausted == "max_iterations"


# --- 2. cancellation -------------------------------------------------------------------------


class _CancelProbe:
    """Watches a search being cancelled during model forward pass ``at``.

    At pass ``at`` the search blocks until :meth:`release`, so the caller can
    cancel while that pass is in progress. Afterwards ``calls_after`` counts the
    model calls (``top_tokens``, ``sample``, ``label_logprobs``, ``pin``) that *started*
    once ``cancelled()`` was true -- the promise is none -- and ``passes_after``
    the raw forward passes (at most the second pass of the call in progress:
    a call may run a shared prefix, then the tails).
    """

    _CALLS = ("top_tokens", "sample", "label_logprobs", "pin")

    def __init__(self, engine: RainEngine, at: int, cancelled: Any) -> None:
        self.backend: Any = engine.backend
        self.at, self.cancelled = at, cancelled
        self.passes = self.passes_after = self.calls_after = 0
        self.reached, self._go = threading.Event(), threading.Event()
        self._handle = self.backend.model.register_forward_pre_hook(self._on_pass)
        for name in self._CALLS:
            setattr(self.backend, name, self._counted(getattr(self.backend, name)))

    def _counted(self, method: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            if self.cancelled():
                self.calls_after += 1
            return method(*args, **kwargs)

        return call

    def _on_pass(self, *_: Any) -> None:
        self.passes += 1
        if self.cancelled():
            self.passes_after += 1
        if self.passes == self.at:
            self.reached.set()
            self._go.wait(10)  # cancelled while this pass is in progress

    def release(self) -> None:
        self._go.set()

    def close(self) -> None:
        self.release()
        self._handle.remove()
        for name in self._CALLS:
            delattr(self.backend, name)  # back to the class's methods

    def check(self) -> None:
        assert self.passes >= self.at, "cancelled before the search reached the probe"
        assert self.calls_after == 0, f"{self.calls_after} model calls started after the cancel"
        assert self.passes_after <= 1, f"{self.passes_after} passes ran after the cancel"


@pytest.mark.parametrize(
    ("at", "lengths"),
    [
        (1, (2,)),
        (4, (2,)),
        (13, (2,)),
        (17, (2,)),
        (30, (2,)),
        (8, (1,)),
        (21, (1,)),
    ],
)
def test_cancel_from_another_thread_stops_within_one_forward_pass(
    engine: RainEngine,
    solo: dict[Any, dict[str, Any]],
    at: int,
    lengths: tuple[int, ...],
    no_leak: None,
) -> None:
    # Token sets of 2 are sampled runs (sample); of 1, the top-k of one call (top_tokens).
    cancel = threading.Event()
    probe = _CancelProbe(engine, at, cancel.is_set)

    def canceller() -> None:  # another thread, as a server or an event loop would
        if probe.reached.wait(30):
            cancel.set()
            probe.release()

    thread = threading.Thread(target=canceller, daemon=True)
    thread.start()
    try:
        with pytest.raises(RainCancelled):
            engine.generate(
                PROMPTS[0], rubric=RUBRIC, config=SEARCH, token_set_lengths=lengths, cancel=cancel
            )
    finally:
        probe.close()
        thread.join(5)
    probe.check()
    # The model is free and the cache intact: the next call gives the usual answer.
    again = engine.generate(PROMPTS[0], rubric=RUBRIC, config=SEARCH, seed=0)
    assert _same_answer(answer_of(again), solo[(PROMPTS[0], 0)])


def test_cancel_set_before_the_call(engine: RainEngine, no_leak: None) -> None:
    cancel = threading.Event()
    cancel.set()
    started = time.perf_counter()
    with pytest.raises(RainCancelled):
        engine.generate(PROMPTS[1], rubric=RUBRIC, config=LONG, cancel=cancel)
    assert time.perf_counter() - started < 10


def test_closing_a_stream_early_releases_its_cache(
    engine: RainEngine, solo: dict[Any, dict[str, Any]], no_leak: None
) -> None:
    stream = engine.stream(PROMPTS[2], rubric=RUBRIC, config=SEARCH, seed=1)
    first = next(stream)
    assert first.token_ids
    stream.close()
    with pytest.raises(RainError):
        _ = stream.result  # not finished: says so instead of returning half an answer
    again = engine.generate(PROMPTS[2], rubric=RUBRIC, config=SEARCH, seed=1)
    assert _same_answer(answer_of(again), solo[(PROMPTS[2], 1)])


# --- 3. concurrency --------------------------------------------------------------------------


def test_threads_sharing_one_engine_get_their_solo_answers(
    engine: RainEngine, solo: dict[Any, dict[str, Any]], no_leak: None
) -> None:
    jobs = list(solo)  # 6 callers: 3 prompts × 2 seeds, all at once
    barrier = threading.Barrier(len(jobs))
    out: dict[tuple[str, int], Any] = {}

    def call(job: tuple[str, int]) -> None:
        barrier.wait()
        try:
            out[job] = answer_of(engine.generate(job[0], rubric=RUBRIC, config=SEARCH, seed=job[1]))
        except Exception as exc:  # reported below with the job that failed
            out[job] = exc

    threads = [threading.Thread(target=call, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a caller hung"
    for job in jobs:
        assert _same_answer(out[job], solo[job]), f"caller {job}: not the answer it gets alone"


def test_rain_vanilla_and_judge_interleave_safely(
    engine: RainEngine, solo: dict[Any, dict[str, Any]], no_leak: None
) -> None:
    vanilla_alone = engine.vanilla(PROMPTS[1], max_new_tokens=6, temperature=1.0, seed=3)
    judge_alone = engine.self_evaluate(PROMPTS[1], "Four.", rubric=RUBRIC).score
    results: dict[str, Any] = {}
    barrier = threading.Barrier(3)

    def rain() -> None:
        barrier.wait()
        results["rain"] = answer_of(
            engine.generate(PROMPTS[1], rubric=RUBRIC, config=SEARCH, seed=0)
        )

    def vanilla() -> None:
        barrier.wait()
        results["vanilla"] = engine.vanilla(
            PROMPTS[1], max_new_tokens=6, temperature=1.0, seed=3
        ).token_ids

    def judge() -> None:
        barrier.wait()
        results["judge"] = engine.self_evaluate(PROMPTS[1], "Four.", rubric=RUBRIC).score

    threads = [threading.Thread(target=f) for f in (rain, vanilla, judge)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert _same_answer(results["rain"], solo[(PROMPTS[1], 0)])
    assert results["vanilla"] == vanilla_alone.token_ids
    assert results["judge"] == pytest.approx(judge_alone, abs=1e-6)


# --- 4. determinism ----------------------------------------------------------------------------


def test_same_call_twice_gives_the_same_answer_and_trace(
    engine: RainEngine, solo: dict[Any, dict[str, Any]]
) -> None:
    again = answer_of(engine.generate(PROMPTS[0], rubric=RUBRIC, config=SEARCH, seed=1))
    assert _same_answer(again, solo[(PROMPTS[0], 1)])  # text, tokens, every commit's candidates
    assert again["trace"] and again["trace"][0]["candidates"]


_RESTART_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from transformers import AutoTokenizer
    from shared_core import RainEngine
    from tests.test_reliability import RUBRIC, SEARCH, answer_of, build_model

    tok = AutoTokenizer.from_pretrained(sys.argv[1])
    engine = RainEngine(model=build_model(len(tok)), tokenizer=tok)
    out = [answer_of(engine.generate(p, rubric=RUBRIC, config=SEARCH, seed=s))
           for p, s in json.loads(sys.argv[2])]
    print("RESULT " + json.dumps(out))
    """
)


def test_same_answer_after_a_process_restart(
    solo: dict[Any, dict[str, Any]], smol_tokenizer: Any, tmp_path: Path
) -> None:
    smol_tokenizer.save_pretrained(tmp_path)  # a plain tokenizer.json loads in < 1 s
    jobs = [(PROMPTS[0], 0), (PROMPTS[2], 1)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "123"}
    proc = subprocess.run(
        [sys.executable, "-c", _RESTART_SCRIPT, str(tmp_path), json.dumps(jobs)],
        capture_output=True,
        text=True,
        timeout=150,
        cwd=Path(__file__).resolve().parents[1],
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    fresh = json.loads(line[len("RESULT ") :])
    for job, answer in zip(jobs, fresh, strict=True):
        assert _same_answer(answer, json.loads(json.dumps(solo[job]))), f"{job} changed"


# --- 5. bad input, everywhere the user can reach -------------------------------------------

BAD_MESSAGES = {
    "empty": ("", "no text"),
    "whitespace": ("  \n\t ", "no text"),
    "no_messages": ([], "no messages"),
    "not_messages": (42, "no messages"),
    "unknown_role": ([{"role": "wizard", "content": "hi"}], "unsupported role"),
    "content_blocks": (
        [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
        "text only",
    ),
    "missing_content": ([{"role": "user"}], "'role' and 'content'"),
    "bytes_content": ([{"role": "user", "content": b"\xff\xfe"}], "text only"),
    "lone_surrogate": ("caf\udce9", "UTF-8"),
    "ends_with_assistant": ([{"role": "assistant", "content": "hi"}], "assistant"),
    "too_long": ("hello " * 5000, "context window"),
}


@pytest.mark.parametrize("case", sorted(BAD_MESSAGES))
@pytest.mark.parametrize("entry", ["generate", "stream", "vanilla", "self_evaluate"])
def test_bad_messages_get_a_clear_error_before_any_work(
    engine: RainEngine, case: str, entry: str, no_leak: None
) -> None:
    messages, says = BAD_MESSAGES[case]
    calls = engine.backend.work.forward_calls
    call = {
        "generate": lambda: engine.generate(messages, rubric=RUBRIC, config=SEARCH),
        "stream": lambda: engine.stream(messages, rubric=RUBRIC, config=SEARCH),
        "vanilla": lambda: engine.vanilla(messages, max_new_tokens=2),
        "self_evaluate": lambda: engine.self_evaluate(messages, "ok", rubric=RUBRIC),
    }[entry]
    with pytest.raises(RainInputError, match=says):
        call()
    assert engine.backend.work.forward_calls == calls, "validated before the model runs"


def test_control_characters_are_dropped_as_documented(engine: RainEngine) -> None:
    assert engine.prompt_ids("\x00Hel\x07lo\x1b\x7f") == engine.prompt_ids("Hello")
    result = engine.generate("\x00Hel\x07lo", rubric=RUBRIC, config=SEARCH, max_new_tokens=2)
    assert result.prompt_tokens == len(engine.prompt_ids("Hello"))


def test_prompt_that_leaves_no_room_for_the_judge(engine: RainEngine, no_leak: None) -> None:
    # Fits the model's window alone, but not inside the judge's prompt: a clear
    # RainInputError naming the window, raised before the search starts.
    prompt = "hello " * (engine.context_window - 40)  # one token per word
    assert len(engine.prompt_ids(prompt)) < engine.context_window
    with pytest.raises(RainInputError, match="context window"):
        engine.generate(prompt, rubric=RUBRIC, config=SEARCH)


BAD_CONFIGS = {
    "negative_c": ({"c": -1.0}, "RainConfig.c"),
    "T_m_over_T": ({"T": 5, "T_m": 8}, "T_m"),
    "zero_candidates": ({"num_candidates": 0}, "num_candidates"),
    "zero_tokens": ({"max_new_tokens": 0}, "max_new_tokens"),
    "unknown_field": ({"temprature": 0.5}, "unknown setting"),
    "wrong_type": ({"T": "many"}, "RainConfig.T"),
    "nan_value": ({"V": float("nan")}, "RainConfig.V"),
    "zero_budget": ({"max_time_s": 0}, "max_time_s"),
    "negative_threshold": ({"similarity_threshold": -0.5}, "similarity_threshold"),
    "empty_lengths": ({"token_set_lengths": ()}, "token_set_lengths"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
@pytest.mark.parametrize("how", ["override", "config_dict"])
def test_invalid_config_names_the_field(engine: RainEngine, case: str, how: str) -> None:
    values, says = BAD_CONFIGS[case]
    with pytest.raises(RainConfigError, match=says):
        if how == "override":
            engine.generate("hi", rubric=RUBRIC, **values)
        else:
            engine.generate("hi", rubric=RUBRIC, config=values)


@pytest.mark.parametrize("config", ["turbo", 3, ["c", 1]], ids=repr)
def test_config_of_the_wrong_kind(engine: RainEngine, config: Any) -> None:
    with pytest.raises(RainConfigError, match="config"):
        engine.generate("hi", rubric=RUBRIC, config=config)


BAD_RUBRICS = {
    "unknown_preset": ("kindness", "unknown rubric"),
    "malformed_dict": ({"name": "x"}, "malformed rubric"),
    "option_not_a_dict": ({"preset": "harmless", "good": "A"}, "malformed rubric"),
    "identical_labels": (
        {"preset": "harmless", "good": {"label": "B", "text": "fine"}},
        "different labels",
    ),
    "labels_share_first_token": (
        {
            **RUBRIC,
            "good": {"label": "positive", "text": "g"},
            "bad": {"label": "positive!", "text": "b"},
        },
        "same token",
    ),
    "reserved_marker": ({**RUBRIC, "instruction": "Judge [[RAIN_RESPONSE]]."}, "reserves"),
    "wrong_type": (3.5, "preset name"),
}


@pytest.mark.parametrize("case", sorted(BAD_RUBRICS))
def test_bad_rubric_gets_a_rubric_error(engine: RainEngine, case: str, no_leak: None) -> None:
    rubric, says = BAD_RUBRICS[case]
    with pytest.raises(RubricError, match=says):
        engine.generate("hi", rubric=rubric, config=SEARCH)


def test_model_without_chat_template_uses_a_plain_transcript(
    smol_tokenizer: Any, engine: RainEngine
) -> None:
    from shared_core.models.hf import TransformersBackend

    plain_tok = copy.deepcopy(smol_tokenizer)
    plain_tok.chat_template = None
    backend = TransformersBackend(engine.backend.model, plain_tok)  # type: ignore[attr-defined]
    plain = RainEngine(backend=backend, rubric=RUBRIC, config=SEARCH)
    rendered = backend.render_chat(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    assert rendered == "System: Be brief.\nUser: Hi\nAssistant:"
    result = plain.generate("Hi", max_new_tokens=3)
    assert isinstance(result.text, str) and result.completion_tokens >= 1
    assert result.stats.final_score is not None and -1.0 <= result.stats.final_score <= 1.0


# --- 6. Ctrl-C in the CLI (the CLI's own tests cover its messages) ---------------------------


def test_ctrl_c_in_the_cli_releases_the_model_for_the_next_call(
    engine: RainEngine,
    solo: dict[Any, dict[str, Any]],
    tmp_path: Path,
    no_leak: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import _thread
    import io

    from shared_core import cli

    interrupts = []
    after_cancel = []
    events: list[threading.Event] = []

    class _RecordingEvent(threading.Event):
        # How soon the main thread sees Ctrl-C depends on the machine's load; what
        # the engine promises is that no model pass starts once the cancel is set.
        # The CLI creates its cancel event first, before its "done" event.
        def __init__(self) -> None:
            super().__init__()
            events.append(self)

    monkeypatch.setattr(cli.threading, "Event", _RecordingEvent)

    def cancelled() -> bool:
        return bool(events) and events[0].is_set()

    def ctrl_c_at_fifth_forward(*_: Any) -> None:
        interrupts.append(1)
        if cancelled():
            after_cancel.append(1)
        if len(interrupts) == 5:
            _thread.interrupt_main()  # what Ctrl-C does: KeyboardInterrupt in the main thread

    handle = engine.backend.model.register_forward_pre_hook(ctrl_c_at_fifth_forward)  # type: ignore[attr-defined]
    err = io.StringIO()
    rubric_file = tmp_path / "rubric.json"  # the module's rubric: its preamble is cached already
    rubric_file.write_text(json.dumps(RUBRIC))
    try:
        code = cli.main(
            ["Hi", "--quiet", "--fast", "--rubric", str(rubric_file), "--max-new-tokens", "64"],
            engine_factory=lambda *_: engine,
            stdout=io.StringIO(),
            stderr=err,
        )
    finally:
        handle.remove()
    assert code == 130 and "cancelled" in err.getvalue()
    assert cancelled()
    assert len(after_cancel) <= 1, "model passes started after the cancel"
    assert not any(t.name == "rain-search" for t in threading.enumerate())
    again = engine.generate(PROMPTS[1], rubric=RUBRIC, config=SEARCH, seed=1)
    assert _same_answer(answer_of(again), solo[(PROMPTS[1], 1)])


# --- 7. the adapters: ChatRain (LangChain) and RainLLM (LlamaIndex) ---------------------------


@pytest.fixture(scope="module")
def chat(engine: RainEngine) -> Any:
    from langchain_rain import ChatRain

    return ChatRain(engine=engine, rubric=RUBRIC, rain_config=SEARCH, seed=0)


@pytest.fixture(scope="module")
def llm(engine: RainEngine) -> Any:
    from llama_index_rain import RainLLM

    return RainLLM(engine=engine, rubric=RUBRIC, config=SEARCH)


async def _cancel_mid_search(engine: RainEngine, start: Any, at: int = 6) -> None:
    """Start ``start()`` as a task and cancel it during model forward pass ``at``.

    Then waits until the search has released its cached prefixes (it stopped)
    and checks that no model call started after the task was cancelled.
    """
    import asyncio

    before = pins(engine)
    state = {"cancelled": False}
    probe = _CancelProbe(engine, at, lambda: state["cancelled"])
    try:
        task = asyncio.ensure_future(start())
        assert await asyncio.to_thread(probe.reached.wait, 60), "the search never started"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        state["cancelled"] = True
        probe.release()
        deadline = time.monotonic() + 30
        while pins(engine) != before and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert pins(engine) == before, "the cancelled search kept its cache (still running?)"
    finally:
        probe.close()
    probe.check()


async def _consume(aiter: Any) -> list[Any]:
    return [item async for item in aiter]


async def test_chatrain_ainvoke_cancelled_stops_the_search(
    engine: RainEngine, chat: Any, solo: dict[Any, dict[str, Any]], no_leak: None
) -> None:
    long_chat = chat.model_copy(update={"rain_config": LONG})
    await _cancel_mid_search(engine, lambda: long_chat.ainvoke(PROMPTS[0]))
    again = await chat.ainvoke(PROMPTS[0])
    assert again.content == solo[(PROMPTS[0], 0)]["text"]


async def test_chatrain_astream_cancelled_stops_the_search(
    engine: RainEngine, chat: Any, no_leak: None
) -> None:
    long_chat = chat.model_copy(update={"rain_config": LONG})
    await _cancel_mid_search(engine, lambda: _consume(long_chat.astream(PROMPTS[1])), at=20)


async def test_rainllm_acomplete_and_astream_cancelled_stop_the_search(
    engine: RainEngine, llm: Any, solo: dict[Any, dict[str, Any]], no_leak: None
) -> None:
    await _cancel_mid_search(engine, lambda: llm.acomplete(PROMPTS[2], config=LONG))

    async def stream() -> list[Any]:
        return await _consume(await llm.astream_complete(PROMPTS[2], config=LONG))

    await _cancel_mid_search(engine, stream, at=20)
    again = await llm.acomplete(PROMPTS[2], seed=1)
    assert again.text == solo[(PROMPTS[2], 1)]["text"]


async def test_concurrent_async_calls_get_their_solo_answers(
    chat: Any, llm: Any, solo: dict[Any, dict[str, Any]], no_leak: None
) -> None:
    import asyncio

    lc = [chat.ainvoke(p) for p in PROMPTS]
    li = [llm.acomplete(p, seed=1) for p in PROMPTS]
    results = await asyncio.gather(*lc, *li)
    for p, msg in zip(PROMPTS, results[:3], strict=True):
        assert msg.content == solo[(p, 0)]["text"]
        assert msg.response_metadata["rain_trace"] == solo[(p, 0)]["trace"]
    for p, resp in zip(PROMPTS, results[3:], strict=True):
        assert resp.text == solo[(p, 1)]["text"]
        assert resp.additional_kwargs["rain_trace"] == solo[(p, 1)]["trace"]


def test_chatrain_batch_with_max_concurrency(
    chat: Any, solo: dict[Any, dict[str, Any]], no_leak: None
) -> None:
    messages = chat.batch(list(PROMPTS), config={"max_concurrency": 2})
    assert [m.content for m in messages] == [solo[(p, 0)]["text"] for p in PROMPTS]


def test_adapters_report_a_spent_budget_in_their_metadata(
    chat: Any, llm: Any, no_leak: None
) -> None:
    timed = chat.model_copy(update={"rain_config": LONG, "timeout": 0.05})
    msg = timed.invoke(PROMPTS[0])
    assert msg.content and msg.response_metadata["rain_stats"]["budget_exhausted"] == "max_time_s"
    resp = llm.complete(PROMPTS[0], config=LONG, max_iterations=2)
    assert resp.text and resp.additional_kwargs["rain_stats"]["budget_exhausted"] == (
        "max_iterations"
    )


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"input": "   "}, RainInputError),
        ({"input": "hi", "rubric": "kindness"}, RubricError),
        ({"input": "hi", "c": -1.0}, RainConfigError),
        ({"input": "hi", "T_m": 99}, RainConfigError),
    ],
    ids=["blank", "unknown_rubric", "negative_c", "T_m_over_T"],
)
def test_adapters_raise_the_engine_errors(
    chat: Any, llm: Any, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    kwargs = dict(kwargs)
    prompt = kwargs.pop("input")
    with pytest.raises(error):
        chat.invoke(prompt, **kwargs)
    with pytest.raises(error):
        llm.complete(prompt, **kwargs)


def test_sync_adapter_streams_left_early_release_the_search(
    chat: Any, llm: Any, engine: RainEngine, no_leak: None
) -> None:
    before = pins(engine)
    for chunk in chat.stream(PROMPTS[0]):
        assert chunk.content
        break
    assert pins(engine) == before
    for response in llm.stream_complete(PROMPTS[0]):
        assert response.delta
        break
    assert pins(engine) == before


@pytest.mark.parametrize("config", ["turbo", 3], ids=repr)
def test_rainllm_config_of_the_wrong_kind(llm: Any, config: Any) -> None:
    with pytest.raises(RainConfigError, match="config"):
        llm.complete("hi", config=config)


@pytest.mark.parametrize("config", ["turbo", 3], ids=repr)
def test_chatrain_config_of_the_wrong_kind(chat: Any, config: Any) -> None:
    with pytest.raises(RainConfigError, match="config"):
        chat.invoke("hi", rain_config=config)
