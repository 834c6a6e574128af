"""The model backend: chat template, stop tokens, and prefix reuse that changes nothing.

Runs the real :class:`TransformersBackend` over the tiny random Llama (SmolLM2's
tokenizer and chat template), so every transformers code path is exercised.
"""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest

from shared_core import RainCancelled, RainError, RainInputError
from shared_core.models.hf import TransformersBackend
from shared_core.models.protocol import Continuation, Grammar, SampleRequest, TopTokensRequest
from tests.scripted import EOS, VOCAB, ScriptedLM, choice_table


@pytest.fixture
def backend(tiny_model, smol_tokenizer) -> TransformersBackend:
    """A fresh backend per test, so pins of one test do not help another."""
    return TransformersBackend(tiny_model, smol_tokenizer, name="tiny-random-llama")


TEXT = "The quick brown fox jumps over the lazy dog, and then it rests under a tree."


# --- text, chat template, stops ------------------------------------------------------------


def test_chat_messages_use_the_tokenizers_template(backend, smol_tokenizer) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    text = backend.render_chat(msgs)
    assert backend.has_chat_template
    assert text == smol_tokenizer.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n")


def test_end_of_text_and_new_turns_stop_generation(backend, smol_tokenizer) -> None:
    stops = backend.stop_token_ids
    assert smol_tokenizer.convert_tokens_to_ids("<|im_end|>") in stops
    assert smol_tokenizer.convert_tokens_to_ids("<|im_start|>") in stops  # a new turn


def test_facts_from_the_model_config(backend, tiny_model) -> None:
    assert backend.context_window == tiny_model.config.max_position_embeddings
    assert backend.vocab_size == tiny_model.config.vocab_size
    ids = backend.encode(TEXT)
    assert backend.decode(ids) == TEXT
    assert len(backend.token_texts()) == backend.vocab_size


def test_loads_from_a_local_folder_and_refuses_a_missing_one(
    tiny_model, smol_tokenizer, tmp_path
) -> None:
    tiny_model.save_pretrained(tmp_path)
    smol_tokenizer.save_pretrained(tmp_path)
    loaded = TransformersBackend.from_pretrained(tmp_path)
    memory = TransformersBackend(tiny_model, smol_tokenizer)
    ids = [memory.encode(TEXT)]
    np.testing.assert_allclose(
        loaded.next_token_logprobs(ids), memory.next_token_logprobs(ids), atol=1e-5
    )
    assert loaded.stop_token_ids == memory.stop_token_ids
    with pytest.raises(RainError, match="HF_HUB_OFFLINE"):
        TransformersBackend.from_pretrained(tmp_path / "missing")


# --- prefix reuse ---------------------------------------------------------------------------


def _sequences(backend: TransformersBackend) -> tuple[list[int], list[list[int]]]:
    base = backend.encode(TEXT)
    other = backend.encode(" Meanwhile, elsewhere")
    seqs = [
        base + other[:1],
        base + other,  # longer
        base[:10] + other[:3],  # diverges inside the pinned prefix
        base,  # exactly the pinned prefix
        other,  # shares nothing
    ]
    return base, seqs


def test_prefix_reuse_gives_the_same_logprobs_as_recomputation(backend) -> None:
    base, seqs = _sequences(backend)
    reference = backend.next_token_logprobs(seqs, reuse=False)
    assert reference.shape == (len(seqs), backend.vocab_size)
    # Unpinned: the batch's common part is run once, each row's tail padded.
    batched = backend.next_token_logprobs(seqs[:3], reuse=True)
    np.testing.assert_allclose(batched, reference[:3], atol=1e-4)
    # Pinned: the prefix comes from a KV snapshot (cropped where a row diverges).
    backend.pin(base)
    assert tuple(base) in backend.pinned_prefixes()
    for rows in (seqs, seqs[:2], [seqs[3]], [seqs[2]]):
        idx = [seqs.index(r) for r in rows]
        np.testing.assert_allclose(
            backend.next_token_logprobs(rows, reuse=True), reference[idx], atol=1e-4
        )
    backend.unpin(base)
    assert backend.pinned_prefixes() == []


def test_prefix_reuse_runs_fewer_tokens(backend) -> None:
    base, _ = _sequences(backend)
    tails = [backend.encode(w) for w in (" yes", " no", " maybe so")]
    batch = [base + t for t in tails]
    before = backend.work.tokens_processed
    backend.next_token_logprobs(batch, reuse=False)
    recomputed = backend.work.tokens_processed - before
    backend.pin(base)
    before = backend.work.tokens_processed
    backend.next_token_logprobs(batch, reuse=True)
    reused = backend.work.tokens_processed - before
    backend.unpin(base)
    assert recomputed == sum(len(s) for s in batch)
    assert reused <= len(batch) * max(len(t) for t in tails)  # only the padded tails


def test_rows_continuing_their_own_pins_start_from_their_own_snapshots(backend) -> None:
    # The judge's two option orders: prompts that diverge early, each pinned.
    base = backend.encode(TEXT)
    heads = [base + backend.encode(w) for w in (" first, then second.", " second, then first!")]
    rows = [heads[0] + backend.encode(" it ends"), heads[1] + backend.encode(" it ends here")]
    reference = backend.next_token_logprobs(rows, reuse=False)
    for head in heads:
        backend.pin(head)
    before = backend.work.tokens_processed
    reused = backend.next_token_logprobs(rows, reuse=True)
    ran = backend.work.tokens_processed - before
    for head in heads:
        backend.unpin(head)
    np.testing.assert_allclose(reused, reference, atol=1e-4)
    # Only what follows the shorter pin was run, padded to the longer row.
    shorter = min(len(h) for h in heads)
    assert ran == len(rows) * max(len(r) - shorter for r in rows)


def test_pins_are_reference_counted(backend) -> None:
    ids = backend.encode(TEXT)
    backend.pin(ids)
    backend.pin(ids)
    backend.unpin(ids)
    assert tuple(ids) in backend.pinned_prefixes()
    backend.unpin(ids)
    assert backend.pinned_prefixes() == []
    backend.unpin(ids)  # unpinning what is not pinned is harmless


def _chat_prefix(backend: TransformersBackend) -> tuple[int, ...]:
    return tuple(backend.encode(backend.render_chat([{"role": "user", "content": "Say hi."}])))


def test_batched_sampling_matches_the_stateless_loop(backend) -> None:
    prefix = _chat_prefix(backend)
    # Rows stop at different clause ends, so finished rows leave the batch early.
    request = SampleRequest(
        prefix, 4, 8, top_k=50, seed=3, greedy_rows=1, stop_after=(",", ".", " a")
    )
    (fast,) = backend.sample([request])
    (slow,) = backend.sample([replace(request, reuse=False)])
    assert [c.token_ids for c in fast] == [c.token_ids for c in slow]
    assert len({len(c.token_ids) for c in fast}) > 1  # finished rows left the batch
    for f, s in zip(fast, slow, strict=True):
        np.testing.assert_allclose(f.logprobs, s.logprobs, atol=1e-4)
    # Same request, same seed: same rows; another seed: other rows.
    assert [c.token_ids for c in backend.sample([request])[0]] == [c.token_ids for c in fast]
    other = backend.sample([replace(request, seed=4)])[0]
    assert [c.token_ids for c in other] != [c.token_ids for c in fast]


def test_greedy_rows_and_temperature_zero_take_the_argmax(backend) -> None:
    prefix = _chat_prefix(backend)
    ((greedy,),) = backend.sample([SampleRequest(prefix, 1, 5, temperature=0.0)])
    steps = [list(prefix)]
    for tok in greedy.token_ids[:-1]:
        steps.append(steps[-1] + [tok])
    expected = [int(row.argmax()) for row in backend.next_token_logprobs(steps, reuse=False)]
    assert greedy.token_ids == expected
    rows = backend.sample([SampleRequest(prefix, 3, 5, seed=9, greedy_rows=1)])[0]
    assert rows[0].token_ids == greedy.token_ids


def test_top_tokens_are_the_best_of_the_next_token_distribution(backend) -> None:
    prefix = _chat_prefix(backend)
    (top,) = backend.top_tokens([TopTokensRequest(prefix, 5)])
    row = backend.next_token_logprobs([prefix], reuse=False)[0]
    assert list(top.token_ids) == [int(t) for t in np.argsort(-row, kind="stable")[:5]]
    np.testing.assert_allclose(top.logprobs, row[list(top.token_ids)], atol=1e-4)


def test_label_logprobs_read_the_given_tokens(backend) -> None:
    prompts = [backend.encode(TEXT), backend.encode(TEXT + " Then")]
    labels = backend.encode(" A B yes")
    got = backend.label_logprobs(prompts, labels)
    rows = backend.next_token_logprobs(prompts, reuse=False)
    np.testing.assert_allclose(got, rows[:, labels], atol=1e-4)


def test_a_stop_string_ends_a_row_at_the_token_that_completes_it(backend) -> None:
    prefix = _chat_prefix(backend)
    ((free,),) = backend.sample([SampleRequest(prefix, 1, 8, temperature=0.0)])
    text = backend.decode(free.token_ids)
    stop = text[2:4]
    assert stop and stop in text
    ((cut,),) = backend.sample([SampleRequest(prefix, 1, 8, temperature=0.0, stop_strings=(stop,))])
    assert stop in backend.decode(cut.token_ids)
    assert stop not in backend.decode(cut.token_ids[:-1])
    assert cut.token_ids == free.token_ids[: len(cut.token_ids)]


def test_a_grammar_keeps_every_row_inside_the_schema(backend) -> None:
    import json

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    grammar = Grammar.from_schema(schema)
    prefix = _chat_prefix(backend)
    rows = backend.sample(
        [SampleRequest(prefix, 2, 12, seed=1, grammar=grammar, response_start=len(prefix))]
    )[0]
    for row in rows:
        text = backend.decode(row.token_ids)
        assert '{"ok":'.startswith(text[:6]) or text.startswith('{"ok":'), text
    (top,) = backend.top_tokens(
        [TopTokensRequest(prefix, 3, grammar=grammar, response_start=len(prefix))]
    )
    assert all(
        backend.decode([t]) and "{".startswith(backend.decode([t])[:1]) for t in top.token_ids
    )
    full = backend.sample(
        [SampleRequest(prefix, 1, 30, temperature=0.0, grammar=grammar, response_start=len(prefix))]
    )[0][0]
    assert json.loads(backend.decode(full.token_ids)).keys() == {"ok"}


def test_a_set_cancel_starts_no_model_work(backend) -> None:
    cancel = threading.Event()
    cancel.set()
    calls = backend.work.forward_calls
    prefix = _chat_prefix(backend)
    with pytest.raises(RainCancelled):
        backend.sample([SampleRequest(prefix, 2, 4)], cancel=cancel)
    with pytest.raises(RainCancelled):
        backend.top_tokens([TopTokensRequest(prefix, 2)], cancel=cancel)
    with pytest.raises(RainCancelled):
        backend.label_logprobs([prefix], [1, 2], cancel=cancel)
    assert backend.work.forward_calls == calls


def test_bad_sequences_are_clear_errors(backend) -> None:
    with pytest.raises(RainInputError, match="non-empty"):
        backend.next_token_logprobs([[]])
    too_long = [backend.encode("a")[0]] * (backend.context_window + 1)
    with pytest.raises(RainInputError, match="context window"):
        backend.next_token_logprobs([too_long])
    with pytest.raises(RainInputError, match="context window"):
        backend.sample([SampleRequest(tuple(backend.encode(TEXT)), 1, backend.context_window)])


# --- the shared decode loop, on the scripted model -----------------------------------------


def test_decode_loop_stops_on_stop_token_clause_end_and_length() -> None:
    lm = ScriptedLM(choice_table({"ab, c": 1.0}))
    prefix = tuple(lm.encode(">"))

    def greedy(limit: int, **kw: object) -> Continuation:
        ((cont,),) = lm.sample([SampleRequest(prefix, 1, limit, temperature=0.0, **kw)])  # type: ignore[arg-type]
        return cont

    cont = greedy(10)
    assert lm.decode(cont.token_ids) == "ab, c" and VOCAB[cont.token_ids[-1]] == EOS
    np.testing.assert_allclose(np.exp(cont.logprobs), 1 - 1e-6 * (len(VOCAB) - 1), rtol=1e-5)
    assert lm.decode(greedy(1).token_ids) == "a"
    assert lm.decode(greedy(10, stop_after=(",",)).token_ids) == "ab,"
    assert lm.decode(greedy(10, stop_strings=("b,",)).token_ids) == "ab,"
    # Sampling: a fixed seed gives fixed rows; a low-probability branch appears with top_k.
    lm = ScriptedLM(choice_table({"x.": 0.5, "y.": 0.5}))
    rows = lm.sample([SampleRequest(prefix, 6, 2, seed=1)])[0]
    assert rows == lm.sample([SampleRequest(prefix, 6, 2, seed=1)])[0]
    assert {lm.decode(r.token_ids) for r in rows} == {"x.", "y."}
