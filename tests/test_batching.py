"""Cross-request batching: merged forward passes of requests with caches of their own.

The merged pass is checked against each request's pass alone (log-probs and
argmax, and the cache it leaves behind), on the tiny random Llama (real
transformers code) and on the embedded SmolLM2; the scheduler against threads
that decode side by side.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from transformers import DynamicCache

from shared_core.models.protocol import WorkCounter
from shared_core.models.scheduler import (
    BATCHING_ENV,
    BatchScheduler,
    batching_default,
    merge_forward,
)
from shared_core.models.scheduler import _Job as Job

# Merged rows differ from a pass alone only by float summation order (another batch
# shape): measured ~1e-5 on SmolLM2 in float32; this bound leaves a margin.
TOLERANCE = 1e-4


def _prefill(model: Any, ids: list[int], rows: int = 1) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True)
    if rows > 1:
        cache.batch_repeat_interleave(rows)  # as the backend does for n rows of one prefix
    return cache


def _alone(model: Any, cache: DynamicCache, new: list[list[int]], keep: Any) -> torch.Tensor:
    with torch.inference_mode():
        out = model(input_ids=torch.tensor(new), cache=cache, use_cache=True, logits_to_keep=keep)
    return torch.log_softmax(out.logits.float(), -1)


def _prompts(n: int = 4) -> list[list[int]]:
    # Different lengths: the merged pass must pad the shorter caches.
    return [[(7 * i + 3 * j) % 900 + 10 for j in range(5 + 9 * i)] for i in range(n)]


def _check_merge(model: Any, news: list[list[list[int]]], keeps: list[Any]) -> None:
    prompts = _prompts(len(news))
    ref_caches = [_prefill(model, p, len(n)) for p, n in zip(prompts, news, strict=True)]
    ref = [_alone(model, c, n, k) for c, n, k in zip(ref_caches, news, keeps, strict=True)]
    caches = [_prefill(model, p, len(n)) for p, n in zip(prompts, news, strict=True)]
    jobs = [Job(torch.tensor(n), c, k) for c, n, k in zip(caches, news, keeps, strict=True)]
    got = merge_forward(model, jobs)
    for r, g in zip(ref, got, strict=True):
        lp = torch.log_softmax(g.logits.float(), -1)
        assert lp.shape == r.shape
        assert float((lp - r).abs().max()) < TOLERANCE
        assert torch.equal(lp.argmax(-1), r.argmax(-1))
    # Each cache now holds its own past plus its own new positions, as alone.
    for mine, theirs in zip(caches, ref_caches, strict=True):
        assert mine.get_seq_length() == theirs.get_seq_length()
        for a, b in zip(mine.layers, theirs.layers, strict=True):
            assert a.keys is not None and b.keys is not None
            assert a.keys.shape == b.keys.shape
            assert float((a.keys - b.keys).abs().max()) < TOLERANCE
    # ...and a next step from the merged caches matches the next step alone.
    step = [[[5]] * len(n) for n in news]
    nxt_ref = [_alone(model, c, s, 1) for c, s in zip(ref_caches, step, strict=True)]
    jobs = [Job(torch.tensor(s), c, 1) for c, s in zip(caches, step, strict=True)]
    nxt = merge_forward(model, jobs)
    for r, g in zip(nxt_ref, nxt, strict=True):
        assert float((torch.log_softmax(g.logits.float(), -1) - r).abs().max()) < TOLERANCE


def test_merged_decode_step_matches_each_request_alone(tiny_model) -> None:
    _check_merge(tiny_model, [[[11]], [[12]], [[13]], [[14]]], [1, 1, 1, 1])


def test_merged_tails_of_different_lengths_and_rows(tiny_model) -> None:
    # Rows per request (2, 1, 3), tails of 1, 6 and 3 tokens, logits of the last, of
    # all, and of chosen positions: what top_tokens, label_logprobs and sample send.
    news = [[[21], [22]], [[1, 2, 3, 4, 5, 6]], [[7, 8, 9], [9, 8, 7], [5, 5, 5]]]
    keeps = [1, 0, torch.tensor([0, 2])]
    _check_merge(tiny_model, news, keeps)


def test_a_pass_alone_is_bit_identical(tiny_model) -> None:
    prompt = _prompts(1)[0]
    ref = _alone(tiny_model, _prefill(tiny_model, prompt), [[3]], 1)
    (out,) = merge_forward(tiny_model, [Job(torch.tensor([[3]]), _prefill(tiny_model, prompt), 1)])
    assert torch.equal(torch.log_softmax(out.logits.float(), -1), ref)


def test_a_request_with_an_empty_cache_merges_with_cached_ones(tiny_model) -> None:
    prompts = _prompts(2)
    ref_new = _alone(tiny_model, DynamicCache(config=tiny_model.config), [prompts[0]], 1)
    ref_old = _alone(tiny_model, _prefill(tiny_model, prompts[1]), [[4]], 1)
    fresh = DynamicCache(config=tiny_model.config)
    jobs = [
        Job(torch.tensor([prompts[0]]), fresh, 1),
        Job(torch.tensor([[4]]), _prefill(tiny_model, prompts[1]), 1),
    ]
    new, old = merge_forward(tiny_model, jobs)
    assert float((torch.log_softmax(new.logits.float(), -1) - ref_new).abs().max()) < TOLERANCE
    assert float((torch.log_softmax(old.logits.float(), -1) - ref_old).abs().max()) < TOLERANCE
    assert fresh.get_seq_length() == len(prompts[0])


# --- the scheduler ------------------------------------------------------------------------


def _greedy_decoder(model: Any, scheduler: BatchScheduler, lock: threading.RLock, steps: int):
    """A decode loop shaped like the backend's: each pass under the backend lock."""

    def run(prompt: list[int]) -> tuple[list[int], list[float]]:
        tokens, logprobs = [], []
        with lock:
            cache = DynamicCache(config=model.config)
            out = scheduler.forward(torch.tensor([prompt]), cache, 1)
        for _ in range(steps):
            row = torch.log_softmax(out.logits[0, -1].float(), -1)
            tok = int(row.argmax())
            tokens.append(tok)
            logprobs.append(float(row[tok]))
            with lock:
                out = scheduler.forward(torch.tensor([[tok]]), cache, 1)
        return tokens, logprobs

    return run


def _decode_all(model: Any, enabled: bool, threads: bool, steps: int = 6):
    lock = threading.RLock()
    work = WorkCounter()
    scheduler = BatchScheduler(model, lock, work, enabled=enabled)
    run = _greedy_decoder(model, scheduler, lock, steps)
    prompts = _prompts(4)
    if not threads:
        out = scheduler.map(run, prompts)
    else:
        # Four independent callers, each with one request (concurrent searches).
        results: list[Any] = [None] * len(prompts)

        def caller(i: int) -> None:
            results[i] = scheduler.map(run, [prompts[i]])[0]

        workers = [threading.Thread(target=caller, args=(i,)) for i in range(len(prompts))]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=60)
        out = results
    scheduler.close()
    return out, work


@pytest.mark.parametrize("threads", [False, True], ids=["one-call", "four-callers"])
def test_concurrent_decodes_share_passes_and_keep_their_tokens(tiny_model, threads) -> None:
    ref, ref_work = _decode_all(tiny_model, enabled=False, threads=False)
    got, work = _decode_all(tiny_model, enabled=True, threads=threads)
    assert [t for t, _ in got] == [t for t, _ in ref]
    pairs = [ab for (_, x), (_, y) in zip(got, ref, strict=True) for ab in zip(x, y, strict=True)]
    worst = max(abs(a - b) for a, b in pairs)
    assert worst < TOLERANCE
    assert ref_work.forward_calls == 4 * 7  # a prefill and 6 steps each, one by one
    # Side by side the four requests share passes: ideally 7, never more than 28.
    assert work.forward_calls < ref_work.forward_calls
    assert work.extra["merged_passes"] >= 1
    if not threads:
        # One call's streams wait for each other: the prompts (5, 14, 23, 32 tokens) in
        # two passes (5+14 padded to 14 is within 1.5x of the real positions, 23 is not;
        # 23+32 is), then the six decode steps of all four in one pass each.
        assert work.forward_calls == 2 + 6


def test_batching_off_is_bit_identical_to_no_scheduler(tiny_model) -> None:
    lock = threading.RLock()
    scheduler = BatchScheduler(tiny_model, lock, WorkCounter(), enabled=False)
    prompt = _prompts(1)[0]
    ref = _alone(tiny_model, _prefill(tiny_model, prompt), [[9]], 1)
    cache = _prefill(tiny_model, prompt)
    with lock:
        out = scheduler.forward(torch.tensor([[9]]), cache, 1)
    assert torch.equal(torch.log_softmax(out.logits.float(), -1), ref)


def test_an_error_in_a_merged_pass_reaches_every_caller(tiny_model) -> None:
    lock = threading.RLock()
    scheduler = BatchScheduler(tiny_model, lock, WorkCounter(), enabled=True)

    def run(prompt: list[int]) -> None:
        with lock:
            cache = DynamicCache(config=tiny_model.config)
            # Token ids past the vocabulary: the embedding lookup fails in the shared pass.
            scheduler.forward(torch.tensor([[10**7, *prompt]]), cache, 1)

    with pytest.raises(IndexError):
        scheduler.map(run, _prompts(3))
    scheduler.close()


def test_a_stream_busy_elsewhere_delays_a_pass_but_never_blocks_it(tiny_model) -> None:
    lock = threading.RLock()
    scheduler = BatchScheduler(tiny_model, lock, WorkCounter(), enabled=True, max_wait_s=0.05)
    release = threading.Event()

    def busy() -> None:
        with scheduler.stream():
            release.wait(timeout=30)  # inside a call, but making no pass

    other = threading.Thread(target=busy)
    other.start()
    try:
        cache = _prefill(tiny_model, _prompts(1)[0])
        with lock:
            out = scheduler.forward(torch.tensor([[3]]), cache, 1)  # runs after max_wait_s
        assert out.logits.shape[0] == 1
    finally:
        release.set()
        other.join()


@pytest.mark.parametrize(
    ("value", "expected"), [("0", False), ("off", False), ("1", True), ("on", True), ("", True)]
)
def test_the_environment_switch(monkeypatch, value: str, expected: bool) -> None:
    monkeypatch.setenv(BATCHING_ENV, value)
    assert batching_default() is expected


def test_a_bad_environment_value_is_an_error(monkeypatch) -> None:
    monkeypatch.setenv(BATCHING_ENV, "maybe")
    with pytest.raises(ValueError, match=BATCHING_ENV):
        batching_default()


def test_passes_group_by_new_length_so_padding_stays_bounded(tiny_model) -> None:
    scheduler = BatchScheduler(tiny_model, threading.RLock(), WorkCounter(), max_padding=1.5)
    jobs = [
        Job(torch.zeros((n, q), dtype=torch.long), None, 1)
        for n, q in ((4, 1), (2, 30), (1, 1), (2, 24))
    ]
    groups = scheduler._groups(jobs)
    # Decode steps (1 token) together; the two judge-like tails (24, 30) together.
    assert [[int(j.input_ids.shape[1]) for j in g] for g in groups] == [[1, 1], [24, 30]]
