"""RainRequest: the one set of rules that ends an answer, its text, and its cache pins."""

from __future__ import annotations

import threading

import pytest

from shared_core import RainCancelled, RainConfig
from shared_core.request import FINISH_REASONS, RainRequest, TextEmitter
from tests.scripted import ScriptedLM, choice_table


def _request(**settings: object) -> tuple[ScriptedLM, RainRequest]:
    lm = ScriptedLM(choice_table({"ok.": 1.0}), context_window=40)
    prompt = lm.encode(lm.render_chat([{"role": "user", "content": "hi"}]))
    return lm, RainRequest(lm, prompt, RainConfig(**settings))  # type: ignore[arg-type]


def test_the_rules_are_checked_in_the_documented_order() -> None:
    lm, req = _request(stop=("wor",), max_new_tokens=6)
    eos = [0]
    assert req.end_reason(lm.encode("hi")) is None
    # A stop string and a stop token in the same set: the stop string cut the text.
    assert req.end_reason(lm.encode("a wor") + eos) == "stop_string"
    assert req.end_reason(lm.encode("ab") + eos) == "stop"
    # At the length limit with a stop token in it: the stop token ended it first.
    assert req.end_reason(lm.encode("abcde") + eos) == "stop"
    assert req.end_reason(lm.encode("abcdef")) == "length"
    assert req.end_reason(lm.encode("a wo")) is None  # a stop string not yet complete
    assert FINISH_REASONS[:3] == ("stop_string", "stop", "length")


def test_commits_grow_the_answer_and_hold_back_a_possible_stop_string() -> None:
    lm, req = _request(stop=("END",), max_new_tokens=20)
    assert req.commit(lm.encode("Hello")) == "Hel"  # "lo" may still start "END"
    assert req.commit(lm.encode(" there")) == "lo the"
    assert not req.finished
    assert req.commit(lm.encode(" ENDING")) == "re "
    assert (req.finish_reason, req.text()) == ("stop_string", "Hello there ")
    assert req.answer() == lm.encode("Hello there ENDING")  # tokens kept; the text is cut


def test_the_answer_is_clipped_to_the_room_the_prompt_leaves() -> None:
    lm, req = _request(max_new_tokens=500)
    assert req.max_new_tokens == lm.context_window - len(req.prompt_ids)
    req.commit(lm.encode("x" * req.max_new_tokens))
    assert req.finish_reason == "length" and req.room() == 0


def test_otherwise_names_the_reason_when_no_rule_ends_the_answer() -> None:
    lm, req = _request()
    req.commit(lm.encode("Done."), otherwise="budget")
    assert req.finish_reason == "budget"
    lm, req = _request()
    req.commit([*lm.encode("Done."), 0], otherwise="budget")
    assert req.finish_reason == "stop"  # a rule that holds wins over the caller's reason


def test_pins_move_with_the_committed_text_and_are_released() -> None:
    lm, req = _request()
    with req:
        req.start()
        assert lm.pinned_prefixes() == [tuple(req.prompt_ids)]
        req.commit(lm.encode("ab"))
        assert lm.pinned_prefixes() == [tuple(req.prompt_ids + lm.encode("ab"))]
    assert lm.pinned_prefixes() == []
    # reuse_cache off: nothing is pinned at all.
    lm, req = _request(reuse_cache=False)
    with req:
        req.start()
        req.commit(lm.encode("ab"))
        assert lm.pinned_prefixes() == []


def test_a_cancel_stops_the_next_pin() -> None:
    cancel = threading.Event()
    lm = ScriptedLM(choice_table({"ok.": 1.0}))
    with RainRequest(lm, lm.encode(">"), RainConfig(), cancel=cancel) as req:
        req.start()
        cancel.set()
        with pytest.raises(RainCancelled):
            req.commit(lm.encode("ab"))
    assert lm.pinned_prefixes() == []


def test_the_text_emitter_alone() -> None:
    lm = ScriptedLM(choice_table({"ok.": 1.0}))
    emitter = TextEmitter(lm, ("xy",))
    assert emitter.push(lm.encode("abx"), final=False) == "ab"
    assert emitter.push(lm.encode("abxz"), final=False) == "x"
    assert emitter.push(lm.encode("abxzxy!"), final=True) == "z"
