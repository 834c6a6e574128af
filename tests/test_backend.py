"""The model backend: chat template, stop tokens, and prefix reuse that changes nothing.

Runs the real :class:`TransformersBackend` over the tiny random Llama (SmolLM2's
tokenizer and chat template), so every transformers code path is exercised.
"""

from __future__ import annotations

import numpy as np
import pytest

from shared_core import RainError, RainInputError
from shared_core.hf_backend import TransformersBackend
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


def _pick_ranked(logprobs: np.ndarray, step: int, *active: np.ndarray) -> np.ndarray:
    # Row i takes its (i+1)-th most likely token: rows diverge, all deterministic.
    order = np.argsort(-logprobs, axis=1, kind="stable")
    return np.array([order[i, min(i, order.shape[1] - 1)] for i in range(len(logprobs))])


def test_batched_extend_matches_the_stateless_loop(backend) -> None:
    prefix = backend.encode(backend.render_chat([{"role": "user", "content": "Say hi."}]))

    def done(row: list[int]) -> bool:
        # Rows start with different tokens, so they finish at different steps.
        return len(row) >= 2 + row[0] % 4

    fast = backend.extend(prefix, 3, 6, _pick_ranked, done, reuse=True)
    slow = backend.extend(prefix, 3, 6, _pick_ranked, done, reuse=False)
    assert [c.token_ids for c in fast] == [c.token_ids for c in slow]
    assert len({len(c.token_ids) for c in fast}) > 1  # finished rows left the batch
    for f, s in zip(fast, slow, strict=True):
        np.testing.assert_allclose(f.logprobs, s.logprobs, atol=1e-4)


def test_bad_sequences_are_clear_errors(backend) -> None:
    with pytest.raises(RainInputError, match="non-empty"):
        backend.next_token_logprobs([[]])
    too_long = [backend.encode("a")[0]] * (backend.context_window + 1)
    with pytest.raises(RainInputError, match="context window"):
        backend.next_token_logprobs([too_long])
    with pytest.raises(RainInputError, match="context window"):
        backend.extend(backend.encode(TEXT), 1, backend.context_window, _pick_ranked)


# --- the shared decode loop, on the scripted model -----------------------------------------


def test_decode_loop_stops_on_stop_token_is_done_and_length() -> None:
    lm = ScriptedLM(choice_table({"ab": 1.0}))
    prefix = lm.encode(">")

    def greedy(logprobs: np.ndarray, step: int, *active: np.ndarray) -> np.ndarray:
        return np.argmax(logprobs, axis=1)

    (cont,) = lm.extend(prefix, 1, 10, greedy)
    assert lm.decode(cont.token_ids) == "ab" and VOCAB[cont.token_ids[-1]] == EOS
    np.testing.assert_allclose(np.exp(cont.logprobs), 1 - 1e-6 * (len(VOCAB) - 1), rtol=1e-5)
    (cont,) = lm.extend(prefix, 1, 1, greedy)
    assert lm.decode(cont.token_ids) == "a"
    (cont,) = lm.extend(prefix, 1, 10, greedy, lambda row: VOCAB[row[-1]] == "a")
    assert lm.decode(cont.token_ids) == "a"
