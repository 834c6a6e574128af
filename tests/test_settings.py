"""shared_core.settings: one precedence for every entry point, presets as a base, clear refusals."""

from __future__ import annotations

import argparse

import pytest

from shared_core import RainConfig, RainConfigError, RainInputError
from shared_core.cli import _read_config, build_parser
from shared_core.settings import (
    ENGINE,
    LANGCHAIN,
    LLAMA_INDEX,
    EngineSource,
    UnknownOptionError,
    from_generate_kwargs,
    resolve,
)

DEFAULTS = RainConfig(T=9, min_new_iterations=3, seed=4)


def _lc(**levels: dict) -> tuple[RainConfig, str]:
    s = resolve(LANGCHAIN, defaults=DEFAULTS, default_rubric="harmless", **levels)
    assert s.rubric is not None
    return s.config, s.rubric.name


def test_call_beats_context_beats_instance_beats_preset_beats_defaults() -> None:
    instance = {"rubric": "truthful", "max_tokens": 5, "rain_config": {"preset": "fast", "V": 0.6}}
    context = {"rubric": "positive", "max_tokens": 4}
    call = {"rubric": "harmless", "max_tokens": 3}
    cfg, rubric = _lc(instance=instance, context=context, call=call)
    assert (rubric, cfg.max_new_tokens) == ("harmless", 3)
    cfg, rubric = _lc(instance=instance, context=context)
    assert (rubric, cfg.max_new_tokens) == ("positive", 4)
    cfg, rubric = _lc(instance=instance)
    assert (rubric, cfg.max_new_tokens, cfg.V) == ("truthful", 5, 0.6)
    assert cfg.num_candidates == RainConfig.fast().num_candidates  # the preset, under them
    assert cfg.T == RainConfig.fast().T  # a preset replaces the defaults (T=9) ...
    cfg, rubric = _lc()
    assert (rubric, cfg.T, cfg.seed) == ("harmless", 9, 4)  # ... which apply without one


def test_a_higher_preset_replaces_the_base_and_lower_settings_stay() -> None:
    cfg, _ = _lc(instance={"rain_config": {"T": 8}, "max_tokens": 2},
                 call={"rain_config": {"preset": "fast"}})
    assert (cfg.T, cfg.max_new_tokens, cfg.num_candidates) == (8, 2, 4)
    # A whole RainConfig counts as a base too; named settings still go over it.
    cfg, _ = _lc(instance={"max_tokens": 2}, call={"rain_config": RainConfig(c=1.0)})
    assert (cfg.c, cfg.max_new_tokens, cfg.T) == (1.0, 2, RainConfig().T)
    # A preset name alone.
    assert _lc(call={"rain_config": "fast"})[0] == RainConfig.fast()


def test_within_a_level_flat_names_beat_the_nested_config() -> None:
    cfg, _ = _lc(call={"rain_config": {"max_new_tokens": 7}, "max_tokens": 3})
    assert cfg.max_new_tokens == 3


def test_framework_names_and_none_as_not_set() -> None:
    cfg, _ = _lc(call={"timeout": 2.5, "stop": ["\n\n"], "temperature": None, "seed": None})
    assert (cfg.max_time_s, cfg.stop, cfg.temperature, cfg.seed) == (2.5, ("\n\n",), 0.0, 4)
    # In a nested config dict None is a value (it removes a budget).
    cfg = resolve(LANGCHAIN, defaults=RainConfig(max_time_s=3.0),
                  call={"rain_config": {"max_time_s": None}}).config
    assert cfg.max_time_s is None


def test_unknown_options_are_refused_with_the_accepted_names() -> None:
    with pytest.raises(UnknownOptionError, match=r"ChatRain got an unknown option 'max_tokenz' "
                       r"\(did you mean 'max_tokens'\?\); accepted options: .*rubric") as info:
        _lc(call={"max_tokenz": 3})
    assert isinstance(info.value, RainInputError) and isinstance(info.value, RainConfigError)
    with pytest.raises(UnknownOptionError, match="tools"):
        resolve(LANGCHAIN, defaults=DEFAULTS, call={"bogus": 1}, other_options=("tools",))
    # The engine leaves unknown names to RainConfig's own report.
    with pytest.raises(RainConfigError, match=r"RainConfig\.temprature: unknown setting"):
        resolve(ENGINE, defaults=DEFAULTS, call={"temprature": 1.0})
    with pytest.raises(RainConfigError, match=r"RainConfig\.bogus: unknown setting"):
        _lc(call={"rain_config": {"bogus": 1}})
    with pytest.raises(RainConfigError, match="unknown config preset"):
        _lc(call={"rain_config": {"preset": "turbo"}})


def test_engine_resolve_config_is_this_precedence() -> None:
    from shared_core import RainEngine
    from tests.scripted import ScriptedEvaluator, ScriptedLM, choice_table

    engine = RainEngine(
        backend=ScriptedLM(choice_table({"ok.": 1.0})),
        evaluator=ScriptedEvaluator(lambda t: 1.0),
        config=DEFAULTS,
    )
    assert engine.resolve_config({"V": 0.5}, V=0.7, max_new_tokens=7) == DEFAULTS.merged(
        V=0.7, max_new_tokens=7
    )
    assert engine.resolve_config("fast", T=8) == RainConfig.fast(T=8)


def test_context_window_is_a_cap() -> None:
    s = resolve(LLAMA_INDEX, defaults=RainConfig(), instance={"context_window": 100})
    assert s.context_window == 100
    assert s.fit(prompt_tokens=90, model_window=4096).max_new_tokens == 10
    assert s.fit(prompt_tokens=10, model_window=50).max_new_tokens == 40  # the model's is lower
    with pytest.raises(RainInputError, match=r"context window is 100 \(context_window=100\)"):
        s.fit(prompt_tokens=100, model_window=4096)
    with pytest.raises(RainConfigError, match="context_window must be a positive"):
        resolve(LLAMA_INDEX, defaults=RainConfig(), instance={"context_window": 0})
    with pytest.raises(UnknownOptionError, match="context_window"):  # not a ChatRain option
        _lc(call={"context_window": 100})


def test_generate_kwargs_map_or_are_refused() -> None:
    got = from_generate_kwargs(
        {"max_new_tokens": 6, "temperature": 0.7, "top_k": 5, "do_sample": True}, "RainLLM"
    )
    assert got == {
        "max_new_tokens": 6, "temperature": 0.7, "expansion_top_k": 5, "simulation_top_k": 5
    }
    assert from_generate_kwargs({"do_sample": False}, "RainLLM") == {"temperature": 0.0}
    with pytest.raises(UnknownOptionError, match=r"generate_kwargs\['top_p'\] has no RAIN"):
        from_generate_kwargs({"top_p": 0.9}, "RainLLM")


def test_cli_flags_beat_set_which_beats_fast() -> None:
    def read(*argv: str) -> RainConfig:
        args: argparse.Namespace = build_parser().parse_args(["hi", *argv])
        return _read_config(args)

    cfg = read("--fast", "--set", "T=8", "--set", "seed=3", "--seed", "5")
    assert (cfg.T, cfg.seed, cfg.num_candidates) == (8, 5, 4)
    assert read("--set", "preset=fast") == RainConfig.fast()
    assert read("--set", "max_new_tokens=9", "--max-new-tokens", "4").max_new_tokens == 4


def test_engine_sources_are_checked_without_loading() -> None:
    ok = EngineSource("X", model="org/model", gguf_file="m.gguf").check()
    assert not ok.loaded_model
    cases = [
        ({"model": "m", "engine": object()}, "either model= or engine="),
        ({"tokenizer": object()}, "tokenizer without a model"),
        ({"model": object()}, "without its"),
        ({"model": "org/m", "tokenizer": object()}, "goes with a loaded model"),
        ({"api_key": "k"}, "api_key= is for a served model"),
        ({"dialect": "vllm"}, "dialect= is for a served model"),
        ({"base_url": "http://x", "gguf_file": "a.gguf"}, "serves a model by name"),
        ({"gguf_file": "a.gguf"}, "gguf_file= names a file inside model="),
    ]
    for kwargs, message in cases:
        with pytest.raises(RainInputError, match=message):
            EngineSource("X", **kwargs).check()
    with pytest.raises(RainInputError, match="must be a RainEngine"):
        EngineSource("X", engine=object()).check()
