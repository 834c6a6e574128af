"""Best-of-N (RainConfig.best_of, engine.best_of_n, --best-of) and the search's final check,
on the scripted model: every answer and score is known in advance."""

from __future__ import annotations

import io
from typing import Any

import pytest

from shared_core import RainConfig, RainConfigError, RainEngine
from tests.scripted import ScriptedEvaluator, ScriptedLM, choice_table

ANSWERS = {"bad.": 0.7, "good.": 0.3}


def _judge(text: str) -> float:
    return 1.0 if "good" in text else -1.0


def _engine(answers: dict[str, float] = ANSWERS, judge: Any = _judge) -> RainEngine:
    return RainEngine(backend=ScriptedLM(choice_table(answers)), evaluator=ScriptedEvaluator(judge))


def test_best_of_n_keeps_the_answer_the_judge_scores_highest() -> None:
    engine = _engine()
    result = engine.best_of_n("Say something.", n=8, rubric="positive", max_new_tokens=8)
    (commit,) = result.trace
    cands = commit["candidates"]
    assert len(cands) == 8 and {c["text"] for c in cands} == {"bad.", "good."}
    assert result.text == "good." and result.mode == "best_of"
    assert result.stats.final_score == 1.0 == max(c["score"] for c in cands)
    # Ties go to the first drawn: the chosen one is the first "good." sampled.
    first_good = next(i for i, c in enumerate(cands) if c["text"] == "good.")
    assert [c["chosen"] for c in cands] == [i == first_good for i in range(8)]
    assert result.stats.iterations == 8  # one evaluation per answer, no search


def test_best_of_is_a_config_mode_of_generate_and_stream() -> None:
    engine = _engine()
    direct = engine.best_of_n("Say something.", n=6, max_new_tokens=8, seed=4)
    via_config = engine.generate("Say something.", config={"best_of": 6}, max_new_tokens=8, seed=4)
    assert via_config.text == direct.text and via_config.trace == direct.trace
    stream = engine.stream("Say something.", best_of=6, max_new_tokens=8, seed=4)
    assert "".join(c.text for c in stream) == direct.text


def test_best_of_needs_at_least_one_answer() -> None:
    engine = _engine()
    with pytest.raises(RainConfigError, match="n >= 1"):
        engine.best_of_n("Say something.", n=0)
    with pytest.raises(RainConfigError, match="n >= 1"):
        engine.best_of_n("Say something.")  # best_of is 0 in the config: the search
    with pytest.raises(RainConfigError, match=r"RainConfig\.best_of"):
        RainConfig(best_of=-1)


def _misleading_judge(text: str) -> float:
    # Likes the first clause of "bad, sad." and dislikes the start of "good.", but judges
    # the finished answers the other way: a search that trusts partial text goes wrong.
    if text == "good.":
        return 0.5
    if text == "bad, sad.":
        return -1.0
    return 1.0 if text.startswith("b") else -1.0


SEARCH = {
    "preset": "paper",  # no final check unless a test asks for it
    "num_candidates": 2,
    "token_set_lengths": (1, 10),
    "T": 2,
    "min_new_iterations": 2,
    "T_m": 2,
    "simulate": False,
    "similarity_update": False,
    "dynamic_addition": False,
    "max_new_tokens": 12,
    "root_prior_mix": 1.0,
    "expand_after_visits": 1,
}


def test_final_check_never_returns_an_answer_the_judge_scores_below_greedys() -> None:
    answers = {"bad, sad.": 0.3, "good.": 0.7}  # greedy decoding writes "good."
    plain = _engine(answers, _misleading_judge).generate("Hi", config=SEARCH)
    assert plain.text == "bad, sad." and plain.stats.final_score == -1.0
    checked = _engine(answers, _misleading_judge).generate(
        "Hi", config={**SEARCH, "final_check": True}
    )
    assert checked.text == "good." and checked.stats.final_score == 0.5
    assert checked.stats.kept_greedy and checked.stats.greedy_score == 0.5
    assert checked.trace[-1]["forced"].startswith("final_check")
    # Streamed, the held commits come out as the one answer returned.
    stream = _engine(answers, _misleading_judge).stream(
        "Hi", config={**SEARCH, "final_check": True}
    )
    assert "".join(c.text for c in stream) == "good."


def test_final_check_keeps_the_search_answer_when_it_scores_at_least_greedys() -> None:
    likes_g = lambda text: 1.0 if text.startswith("g") else -1.0  # noqa: E731
    result = _engine(judge=likes_g).generate("Hi", config={**SEARCH, "final_check": True})
    assert result.text == "good." and not result.stats.kept_greedy  # greedy writes "bad."
    assert result.stats.final_score == 1.0 and result.stats.greedy_score == -1.0
    assert all(not (c["forced"] or "").startswith("final_check") for c in result.trace)


def test_length_normalised_priors_are_per_token_geometric_means() -> None:
    cfg = {
        **SEARCH,
        "num_candidates": 8,
        "token_set_lengths": (4,),
        "T": 1,
        "min_new_iterations": 1,
        "T_m": 1,
    }
    product = _engine().generate("Hi", config=cfg).trace[0]["candidates"]
    norm = (
        _engine().generate("Hi", config={**cfg, "prior_length_norm": True}).trace[0]["candidates"]
    )
    p = {c["text"]: c["p"] for c in product}
    q = {c["text"]: c["p"] for c in norm}
    assert p["bad."] == pytest.approx(0.7, abs=1e-3)
    a, b = 0.7**0.25, 0.3**0.25  # "bad." and "good" (4 tokens each)
    assert q["bad."] == pytest.approx(a / (a + b), abs=1e-3)


def test_cli_best_of_flag() -> None:
    from shared_core.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = main(
        ["Say something.", "--best-of", "8", "--max-new-tokens", "8", "--quiet"],
        engine_factory=lambda model, gguf: _engine(),
        stdout=out,
        stderr=err,
    )
    assert code == 0, err.getvalue()
    assert out.getvalue().strip() == "good."
    with pytest.raises(SystemExit) as exit_info:  # argparse: a usage error, status 2
        main(["x", "--best-of", "0"], engine_factory=lambda m, g: _engine(), stdout=out, stderr=err)
    assert exit_info.value.code == 2


def test_chatrain_gets_best_of_through_configurable() -> None:
    from langchain_rain import ChatRain

    chat = ChatRain(engine=_engine(), max_tokens=8)
    message = chat.invoke("Say something.", config={"configurable": {"best_of": 8}})
    assert message.content == "good."
