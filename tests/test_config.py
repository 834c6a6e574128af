"""RainConfig: the paper's constants, immutability, and errors that name the field."""

from __future__ import annotations

import pydantic
import pytest

from shared_core import RainConfig, RainConfigError
from shared_core.config import build_config


def test_paper_preset_keeps_the_papers_and_reference_codes_constants() -> None:
    cfg = RainConfig.paper()
    assert cfg.c == 2.0  # PUCT exploration, paper
    assert cfg.num_candidates == 10
    assert cfg.token_set_lengths == (1, 2, 4, 10)
    assert (cfg.expansion_top_k, cfg.expansion_temperature) == (15, 1.0)
    assert cfg.root_prior_mix == 0.25
    assert (cfg.gamma_s, cfg.similarity_threshold) == (0.2, 0.95)
    assert (cfg.dynamic_max_children, cfg.dynamic_variance_factor) == (20, 0.03)
    assert cfg.dynamic_value_threshold == 0.0
    assert (cfg.T, cfg.min_new_iterations, cfg.T_m, cfg.V) == (50, 15, 6, 0.8)
    assert cfg.unvisited_value == 0.0
    assert cfg.simulate and cfg.similarity_update and cfg.dynamic_addition
    assert cfg.reuse_cache
    assert cfg.simulation_max_tokens == 24 and cfg.expand_after_visits == 0
    assert not (cfg.greedy_early_commit or cfg.final_check or cfg.prior_length_norm)
    assert cfg.best_of == 0  # the search, not best-of-N
    assert RainConfig.paper(seed=3, T=60).T == 60  # overrides go over the preset
    assert build_config("paper") == cfg == build_config({"preset": "paper"})


def test_every_field_documents_itself() -> None:
    import inspect

    import shared_core.config as module

    source = inspect.getsource(module.RainConfig)
    for name in RainConfig.model_fields:
        # Each field is followed by its docstring (house style).
        after = source.split(f"\n    {name}:", 1)[1]
        assert '"""' in after.split("\n")[1], f"RainConfig.{name} has no docstring"


def test_token_set_length_grows_with_depth_and_the_last_repeats() -> None:
    cfg = RainConfig.paper()
    assert [cfg.token_set_length(d) for d in range(6)] == [1, 2, 4, 10, 10, 10]


def test_config_is_immutable() -> None:
    cfg = RainConfig()
    with pytest.raises(pydantic.ValidationError):
        cfg.c = 3.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"c": -1.0}, ["RainConfig.c", "greater than or equal to 0"]),
        ({"num_candidates": 0}, ["RainConfig.num_candidates", "greater than or equal to 1"]),
        ({"T": 5, "T_m": 6}, ["T_m (6)", "T (5)", "lower T_m or raise T"]),
        ({"gamma_s": 1.5}, ["RainConfig.gamma_s"]),
        ({"V": 2.0}, ["RainConfig.V"]),
        ({"max_new_tokens": 0}, ["RainConfig.max_new_tokens"]),
        ({"token_set_lengths": ()}, ["token_set_lengths", "(1, 2, 4, 10)"]),
        ({"token_set_lengths": (1, 0)}, ["token_set_lengths"]),
        ({"stop": ("",)}, ["stop strings"]),
        ({"expansion_temperature": 0.0}, ["RainConfig.expansion_temperature"]),
    ],
)
def test_invalid_values_fail_with_the_field_named(kwargs: dict, names: list[str]) -> None:
    with pytest.raises(RainConfigError) as err:
        RainConfig(**kwargs)
    for name in names:
        assert name in str(err.value)


def test_unknown_field_is_named_and_known_fields_listed() -> None:
    with pytest.raises(RainConfigError) as err:
        RainConfig(temprature=0.5)
    msg = str(err.value)
    assert "RainConfig.temprature" in msg
    assert "unknown setting" in msg and "temperature" in msg and "max_new_tokens" in msg


def test_config_errors_are_value_errors() -> None:
    # Callers that catch ValueError (pydantic, LangChain) still see them.
    with pytest.raises(ValueError):
        RainConfig(c=-1)


def test_merged_validates_like_a_new_config() -> None:
    cfg = RainConfig(T=10, T_m=3, min_new_iterations=4)
    assert cfg.merged() is cfg
    assert cfg.merged(V=0.5).V == 0.5 and cfg.merged(V=0.5).T == 10
    with pytest.raises(RainConfigError, match="T_m"):
        cfg.merged(T_m=11)


def test_build_config_from_plain_data_and_presets() -> None:
    assert build_config({"c": 1.0}).c == 1.0
    assert build_config(None) == RainConfig()
    fast = build_config({"preset": "fast", "seed": 3})
    assert fast == RainConfig.fast(seed=3)
    paper = RainConfig.paper()
    assert fast.num_candidates < paper.num_candidates and fast.T < paper.T
    with pytest.raises(RainConfigError, match="'paper', 'tuned' or 'tuned_fast'"):
        build_config({"preset": "turbo"})
    with pytest.raises(RainConfigError, match=r"RainConfig\.c"):
        build_config({"c": -2})


def test_config_round_trips_through_a_dict() -> None:
    cfg = RainConfig(T=12, min_new_iterations=5, stop=("\n\n",), seed=5)
    assert RainConfig(**cfg.model_dump()) == cfg
    assert RainConfig.model_validate_json(cfg.model_dump_json()) == cfg


def test_min_new_iterations_is_capped_at_t_so_a_small_t_alone_is_valid() -> None:
    from shared_core.search import should_commit
    from shared_core.tree import Node

    cfg = RainConfig.paper(T=6, T_m=2)  # min_new_iterations keeps the paper's 15
    root = Node(())
    root.add_children([Node((1,), raw_prob=1.0)])
    root.visits = 6.0
    assert not should_commit(root, 5, cfg)
    assert should_commit(root, 6, cfg)
