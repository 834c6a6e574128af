"""Rubrics: presets, plain-data round trips, label tokens, and the self-evaluation verdict."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pytest

from shared_core import PRESETS, RainEngine, Rubric, RubricError, get_rubric
from shared_core.evaluation import SelfEvaluator, build_layout, render_judge_prompt
from shared_core.models.hf import TransformersBackend
from tests.scripted import ScriptedEvaluator, ScriptedLM

# --- presets and plain data --------------------------------------------------------------


def test_presets_by_name() -> None:
    assert set(PRESETS) >= {"harmless", "truthful", "positive"}
    for name in ("harmless", "truthful", "positive"):
        assert get_rubric(name) is PRESETS[name]
        assert get_rubric(name).name == name
    assert get_rubric(" Positive ") is PRESETS["positive"]


def test_unknown_name_lists_the_known_presets() -> None:
    with pytest.raises(RubricError) as err:
        get_rubric("kind")
    msg = str(err.value)
    assert "'kind'" in msg and "harmless, positive, truthful" in msg


@pytest.mark.parametrize("name", ["harmless", "truthful", "positive"])
def test_rubric_round_trips_through_a_dict_and_json(name: str) -> None:
    rubric = get_rubric(name)
    assert get_rubric(rubric.model_dump()) == rubric
    assert get_rubric(rubric.model_dump(mode="json")) == rubric
    assert Rubric.model_validate_json(rubric.model_dump_json()) == rubric


def test_a_dict_can_start_from_a_preset() -> None:
    soft = get_rubric({"preset": "harmless", "scoring": "soft", "name": "harmless-soft"})
    assert soft.scoring == "soft" and soft.name == "harmless-soft"
    assert soft.examples == PRESETS["harmless"].examples


def test_custom_word_rubric_from_a_dict() -> None:
    rubric = get_rubric(
        {
            "name": "polite",
            "instruction": "You judge politeness.",
            "question": "Is the text polite or rude?",
            "good": {"label": "polite", "text": "The text is polite."},
            "bad": {"label": "rude", "text": "The text is rude."},
        }
    )
    assert rubric.good.label == "polite" and not rubric.labels_follow_position
    assert PRESETS["harmless"].labels_follow_position  # one-letter labels stay in place


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ({"name": "x"}, "instruction"),
        ({"preset": "harmless", "scoring": "medium"}, "scoring"),
        ({"preset": "harmless", "colour": "red"}, "colour"),
        ({"preset": "nope"}, "known presets"),
        (42, "not int"),
    ],
)
def test_malformed_rubrics_are_clear_errors(spec: object, fragment: str) -> None:
    with pytest.raises(RubricError, match=fragment):
        get_rubric(spec)  # type: ignore[arg-type]


def test_two_options_need_different_labels() -> None:
    with pytest.raises(RubricError, match="different labels"):
        get_rubric(
            {
                "preset": "truthful",
                "good": {"label": "Yes", "text": "true"},
                "bad": {"label": "yes", "text": "false"},
            }
        )


# --- label tokens come from the tokenizer ------------------------------------------------


@pytest.fixture(scope="module")
def smol_backend(tiny_model, smol_tokenizer) -> TransformersBackend:
    return TransformersBackend(tiny_model, smol_tokenizer, name="tiny-random-llama")


def _first(tokenizer, text: str) -> int:
    return int(tokenizer(text, add_special_tokens=False)["input_ids"][0])


def test_word_label_tokens_come_from_the_tokenizer(smol_backend, smol_tokenizer) -> None:
    layout = build_layout(smol_backend, get_rubric("positive"))
    expected_good = {_first(smol_tokenizer, t) for t in ("positive", " positive", "Positive")}
    expected_bad = {_first(smol_tokenizer, t) for t in ("negative", " negative", "Negative")}
    # Word labels move with their option: "positive" means good in both orders.
    assert len(layout.good_ids) == 2
    for good, bad in zip(layout.good_ids, layout.bad_ids, strict=True):
        assert expected_good <= good and expected_bad <= bad
        assert not good & bad


def test_letter_labels_stay_in_place_when_options_swap(smol_backend, smol_tokenizer) -> None:
    layout = build_layout(smol_backend, get_rubric("harmless"))
    a, b = _first(smol_tokenizer, " A"), _first(smol_tokenizer, " B")
    assert a in layout.good_ids[0] and b in layout.bad_ids[0]
    # Swapped: (A) now says "harmful", so A means bad.
    assert b in layout.good_ids[1] and a in layout.bad_ids[1]


def test_labels_sharing_a_first_token_are_rejected(smol_backend, smol_tokenizer) -> None:
    assert _first(smol_tokenizer, "good") == _first(smol_tokenizer, "goodness")
    rubric = get_rubric(
        {
            "preset": "positive",
            "good": {"label": "good", "text": "Good."},
            "bad": {"label": "goodness", "text": "Bad."},
        }
    )
    with pytest.raises(RubricError, match="same token") as err:
        build_layout(smol_backend, rubric)
    assert "'good'" in str(err.value) and "'goodness'" in str(err.value)


def test_unscorable_labels_fail_the_call_not_the_search(tiny_engine) -> None:
    rubric = {
        "preset": "truthful",
        "good": {"label": "good", "text": "True."},
        "bad": {"label": "goodness", "text": "False."},
    }
    with pytest.raises(RubricError, match="cannot be told apart"):
        tiny_engine.generate("hello", rubric=rubric, max_new_tokens=2)


@pytest.mark.parametrize("position", ["before", "after"])
@pytest.mark.parametrize("name", ["harmless", "truthful", "positive"])
def test_cached_layout_pieces_spell_the_judge_prompt(smol_backend, name: str, position) -> None:
    # The evaluator assembles the judge prompt from cached token pieces; they
    # must read exactly as the rendered prompt does, in both option orders.
    rubric = get_rubric({"preset": name, "question_position": position})
    layout = build_layout(smol_backend, rubric)
    prompt, response = "Tell me about the sea.", "The sea is vast and calm."
    prompt_ids = smol_backend.encode(prompt) if rubric.include_prompt else []
    pieces = zip((False, True), layout.heads, layout.middles, layout.tails, strict=True)
    for swapped, head, middle, tail in pieces:
        assert head[: len(layout.preamble)] == layout.preamble  # cached once per rubric
        ids = [*head, *prompt_ids, *middle, *smol_backend.encode(response), *tail]
        text = render_judge_prompt(smol_backend, rubric, prompt, response, swapped)
        assert smol_backend.tokenizer.decode(ids) == text
        question_at = text.rindex(rubric.question)  # the case's, after the examples'
        assert (question_at < text.index(response)) == (position == "before")
    assert "<|im_start|>assistant" in text  # chat style: the model's own template
    if position == "before":
        # The orders differ only before the response: the per-evaluation tail is
        # shared and short, and the examples are part of the common preamble.
        assert layout.tails[0] == layout.tails[1] and len(layout.tails[0]) < 25
        assert max(len(h) for h in layout.heads) - len(layout.preamble) < 40


# --- the verdict: hard votes, soft scores, swapped orders --------------------------------


def _letter_judge(prefers: Callable[[str], Mapping[str, float]]) -> Callable[[str], dict]:
    """A scripted judge for A/B rubrics: ``prefers(response) -> {"harmless": w, ...}``.

    It reads the options of the last question and answers the letter of each
    option text with that weight, so its verdict follows meaning, not position.
    """

    def next_fn(context: str) -> dict[str, float]:
        response = context.rsplit("<response>\n", 1)[-1].split("\n</response>", 1)[0]
        # The case's own question and options: after the examples, before the response.
        question = context.rsplit("<response>\n", 1)[0].rsplit("Now the case to judge", 1)[-1]
        out: dict[str, float] = {}
        for word, weight in prefers(response).items():
            line = next(x for x in question.splitlines() if x.endswith(f"is {word}."))
            out[" " + line[1]] = weight  # "(A) The response is harmless." -> " A"
        return out

    return next_fn


def _score(next_fn, response: str, **rubric_overrides: object) -> tuple[float, dict]:
    lm = ScriptedLM(next_fn)
    rubric = get_rubric({"preset": "harmless", **rubric_overrides})
    session = SelfEvaluator(lm).session(rubric, "How do I bake bread?")
    judgement = session.score(lm.encode(response), response)
    return judgement.score, judgement.details


def _reads_meaning(confidence: float = 1.0):
    def prefers(response: str) -> dict[str, float]:
        good = "flour" in response
        return {"harmless": confidence if good else 1 - confidence} | {
            "harmful": 1 - confidence if good else confidence
        }

    return _letter_judge(prefers)


def test_a_session_keeps_one_cached_prefix_per_option_order(tiny_engine) -> None:
    backend = tiny_engine.backend
    evaluator = SelfEvaluator(backend)
    rubric = get_rubric("harmless")
    evaluator.layout(rubric)  # the rubric's own pin, shared by every session
    before = set(backend.pinned_prefixes())
    session = evaluator.session(rubric, "How do I bake bread?")
    assert set(backend.pinned_prefixes()) - before == set(session.requests)
    ids = backend.encode(" Mix flour, water and yeast, then bake it.")
    session.committed(ids[:3])
    session.committed(ids[:6])
    # Only the newest committed prefix per order is kept: the older ones and the
    # request-only ones are released (each holds a copy of the rubric's examples).
    assert set(backend.pinned_prefixes()) - before == {r + tuple(ids[:6]) for r in session.requests}
    score = session.score(ids, backend.decode(ids)).score
    session.close()
    assert set(backend.pinned_prefixes()) == before
    # The cached prefixes change the work, not the verdict.
    fresh = evaluator.session(rubric, "How do I bake bread?", reuse=False)
    assert fresh.score(ids, backend.decode(ids)).score == score
    backend.unpin(evaluator.layout(rubric).preamble)  # this evaluator's own, not shared


def test_hard_verdict_follows_the_judges_choice() -> None:
    assert _score(_reads_meaning(), "Mix flour and water.")[0] == 1.0
    score, details = _score(_reads_meaning(), "Go away.")
    assert score == -1.0
    assert details["votes"] == [-1.0, -1.0]  # both option orders agree


def test_swapping_the_options_cancels_a_letter_bias() -> None:
    def always_a(context: str) -> dict[str, float]:
        return {" A": 1.0}

    score, details = _score(always_a, "Mix flour and water.")
    assert details["votes"] == [1.0, -1.0]
    assert score == 0.0
    # Without the swap the biased judge's letter decides alone.
    assert _score(always_a, "Go away.", swap_options=False)[0] == 1.0


def test_soft_scoring_compares_label_probabilities() -> None:
    score, details = _score(_reads_meaning(0.9), "Mix flour and water.", scoring="soft")
    # (p_good - p_bad) / (p_good + p_bad) per order, then averaged.
    assert score == pytest.approx(0.8, abs=1e-4)
    assert details["p_good"] == pytest.approx([0.9, 0.9], abs=1e-3)  # FLOOR mass aside
    assert _score(_reads_meaning(0.9), "Go away.", scoring="soft")[0] == pytest.approx(
        -0.8, abs=1e-4
    )


def test_the_judge_sees_the_request_and_the_response_apart() -> None:
    seen: list[str] = []

    def spy(context: str) -> dict[str, float]:
        seen.append(context)
        return {" A": 1.0}

    _score(spy, "Mix flour and water.")
    last = seen[-1]
    assert last.index("How do I bake bread?") < last.index("<response>\nMix flour and water.")
    assert last.startswith(PRESETS["harmless"].instruction)  # plain style: no chat template


def test_the_engine_scores_with_a_scripted_judge_by_name() -> None:
    # self_evaluate goes through the evaluator the engine was built with.
    lm = ScriptedLM(_reads_meaning())
    engine = RainEngine(backend=lm, evaluator=ScriptedEvaluator(lambda t: 0.5))
    assert engine.self_evaluate("hi", "anything", rubric="positive").score == 0.5
    with pytest.raises(RubricError, match="known presets"):
        engine.self_evaluate("hi", "anything", rubric="kindness")
