"""How settings combine, in one place: the engine, ChatRain, RainLLM and the CLI use it.

One precedence, highest first::

    call keyword          invoke(..., rubric=...), .bind(...), complete(..., T=8), --set
    runnable config       LangChain config={"configurable": {...}}, LlamaIndex rain_rubric(...)
    instance field        ChatRain(max_tokens=..., rain_config=...), RainLLM(max_new_tokens=...)
    preset                {"preset": "fast"}, a preset name, or a whole RainConfig object
    defaults              the engine's config (RainConfig() unless the engine was given one)

Each level is a mapping of option names: RainConfig fields, the framework's names
for some of them (LangChain's ``max_tokens`` is ``max_new_tokens``), ``rubric``, and
one nested config (``rain_config=`` for ChatRain, ``config=`` elsewhere). Within a
level, the flat names beat the nested config's settings.

A preset is a base, not a set of explicit settings: the highest level that names
one (or passes a whole :class:`RainConfig`) replaces the defaults with it, and the
settings named at every level still go over it. A value of ``None`` at a flat name
means "not set" (LangChain's fields default to ``None``); inside a nested config
dict it is a value (``{"max_time_s": None}`` removes a budget).
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

from shared_core.config import RainConfig, build_config
from shared_core.errors import RainConfigError, RainInputError
from shared_core.rubric import Rubric, RubricSpec, get_rubric

__all__ = [
    "CLI",
    "ENGINE",
    "LANGCHAIN",
    "LLAMA_INDEX",
    "EngineSource",
    "Names",
    "Settings",
    "UnknownOptionError",
    "from_generate_kwargs",
    "resolve",
    "unknown_keyword",
    "unknown_option",
]

_FIELDS = frozenset(RainConfig.model_fields)


class UnknownOptionError(RainInputError, RainConfigError):
    """An option name no level accepts (both an input and a config error)."""


@dataclass(frozen=True)
class Names:
    """The option names one entry point accepts, for resolution and error messages."""

    owner: str
    """Who is asking, as the user wrote it (``ChatRain``, ``RainLLM``, ...)."""
    config_key: str = "config"
    """The name of the nested config (a RainConfig, a dict, or a preset name)."""
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Framework names -> the RainConfig fields they set."""
    extra_settings: frozenset[str] = frozenset()
    """Settings resolved here that are not RainConfig fields (``context_window``)."""
    strict: bool = True
    """Refuse unknown flat names here; ``False``: RainConfig's validation names them."""
    none_is_unset: bool = True
    """A flat name given ``None`` is not set (framework fields); ``False``: it is a value."""

    def accepted(self, *other: str) -> list[str]:
        names = {"rubric", self.config_key, *self.aliases, *self.extra_settings, *_FIELDS, *other}
        return sorted(names)


ENGINE = Names(owner="RainEngine", strict=False, none_is_unset=False)
LANGCHAIN = Names(
    owner="ChatRain",
    config_key="rain_config",
    aliases={"max_tokens": ("max_new_tokens",), "timeout": ("max_time_s",)},
)
LLAMA_INDEX = Names(owner="RainLLM", extra_settings=frozenset({"context_window"}))
CLI = Names(owner="rain", strict=False, none_is_unset=False)


@dataclass(frozen=True)
class Settings:
    """The outcome of one resolution."""

    config: RainConfig
    rubric: Rubric | None
    """``None`` only when no level and no default named one (the engine's config alone)."""
    context_window: int | None = None
    """A cap on prompt + answer tokens below the model's own window, if one was set."""

    def fit(self, prompt_tokens: int, model_window: int) -> RainConfig:
        """The config with ``max_new_tokens`` cut to what the context window leaves.

        Raises :class:`RainInputError` when the prompt alone fills the window.
        """
        window = model_window if self.context_window is None else min(
            model_window, self.context_window
        )
        if prompt_tokens >= window:
            why = f"context_window={self.context_window}" if window < model_window else "the model"
            raise RainInputError(
                f"the prompt is {prompt_tokens} tokens but the context window is {window} "
                f"({why}); shorten the prompt or the conversation history, or raise "
                "context_window"
            )
        room = window - prompt_tokens
        cfg = self.config
        return cfg if cfg.max_new_tokens <= room else cfg.merged(max_new_tokens=room)


def resolve(
    names: Names,
    *,
    defaults: RainConfig,
    default_rubric: RubricSpec | None = None,
    instance: Mapping[str, Any] | None = None,
    context: Mapping[str, Any] | None = None,
    call: Mapping[str, Any] | None = None,
    other_options: tuple[str, ...] = (),
) -> Settings:
    """Combine the levels (lowest to highest: instance, context, call) over the defaults.

    ``other_options`` are names the entry point handles itself (``tools``, ...);
    they are only listed in the error for an unknown name, never read here.
    """
    base = defaults
    explicit: dict[str, Any] = {}
    rubric: RubricSpec | None = default_rubric
    cap: int | None = None
    for level in (instance, context, call):
        if not level:
            continue
        nested = level.get(names.config_key)
        if nested is not None:
            preset, settings = _split(nested)
            if preset is not None:
                base = preset  # the highest level naming a preset wins; settings stay
            explicit.update(settings)
        for key, value in level.items():
            if key == names.config_key or (value is None and names.none_is_unset):
                continue
            if key == "rubric":
                if value is not None:
                    rubric = value
            elif key == "context_window" and key in names.extra_settings:
                cap = _positive_int(key, value, names.owner)
            elif key in names.aliases:
                for target in names.aliases[key]:
                    explicit[target] = _coerce(target, value)
            elif key in _FIELDS or not names.strict:
                explicit[key] = _coerce(key, value)
            else:
                raise unknown_option(names, key, other_options)
    config = base.merged(**explicit)
    resolved = get_rubric(rubric) if rubric is not None else None
    return Settings(config=config, rubric=resolved, context_window=cap)


def unknown_option(names: Names, key: Any, other_options: tuple[str, ...] = ()) -> RainInputError:
    """The error for a per-call option nobody takes."""
    return unknown_keyword(names.owner, key, names.accepted(*other_options))


def unknown_keyword(owner: str, key: Any, accepted: Iterable[str]) -> RainInputError:
    """What was wrong, a near miss if there is one, and every name that is accepted."""
    names = sorted(set(accepted))
    near = difflib.get_close_matches(str(key), names, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return UnknownOptionError(
        f"{owner} got an unknown option {key!r}{hint}; accepted options: {', '.join(names)}"
    )


# transformers' generate() names that have a RAIN meaning (HuggingFaceLLM's generate_kwargs).
_GENERATE_KWARGS: dict[str, tuple[str, ...]] = {
    "max_new_tokens": ("max_new_tokens",),
    "temperature": ("temperature",),
    "seed": ("seed",),
    "stop_strings": ("stop",),
    "top_k": ("expansion_top_k", "simulation_top_k"),
    "max_time": ("max_time_s",),
}


def from_generate_kwargs(generate_kwargs: Mapping[str, Any], owner: str) -> dict[str, Any]:
    """RainConfig settings for the ``generate_kwargs`` that have a RAIN meaning.

    ``do_sample=False`` is greedy decoding (``temperature=0`` for vanilla decoding);
    ``do_sample=True`` changes nothing (RAIN's search always samples its candidates).
    Anything else (``top_p``, ``num_beams``, ``repetition_penalty``, ...) has no
    counterpart in RAIN and is refused rather than dropped.
    """
    out: dict[str, Any] = {}
    for key, value in generate_kwargs.items():
        if key == "do_sample":
            if value is False:
                out.setdefault("temperature", 0.0)
            continue
        targets = _GENERATE_KWARGS.get(key)
        if targets is None:
            known = ", ".join(sorted([*_GENERATE_KWARGS, "do_sample"]))
            raise UnknownOptionError(
                f"{owner}: generate_kwargs[{key!r}] has no RAIN counterpart; the keys that "
                f"map are {known} (other search settings go in config=)"
            )
        for target in targets:
            out[target] = _coerce(target, value)
    return out


def _split(nested: Any) -> tuple[RainConfig | None, dict[str, Any]]:
    """A nested config as (its preset base, if any; its explicit settings)."""
    if isinstance(nested, RainConfig):
        return nested, {}
    if isinstance(nested, Mapping):
        data = dict(nested)
        bad = [k for k in data if not isinstance(k, str)]
        if bad:
            raise RainConfigError(f"config keys must be setting names (strings), got {bad!r:.80}")
        preset = data.pop("preset", None)
        base = build_config(preset) if preset is not None else None
        return base, {k: _coerce(k, v) for k, v in data.items()}
    # A preset name, or a RainConfigError that says what a config may be.
    return build_config(nested), {}


def _coerce(name: str, value: Any) -> Any:
    # Frameworks pass stop sequences as lists; RainConfig holds tuples.
    if name in ("stop", "token_set_lengths", "clause_delimiters") and isinstance(value, list):
        return tuple(value)
    return value


def _positive_int(name: str, value: Any, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RainConfigError(f"{owner}: {name} must be a positive whole number, got {value!r}")
    return value


# --- where the model comes from -------------------------------------------------------------
@dataclass(frozen=True)
class EngineSource:
    """The ways into an engine, the same for RainEngine users, ChatRain and RainLLM.

    Exactly one of: a model id or local path (``model=``, optionally ``gguf_file=``;
    ``None``: the embedded default), a loaded transformers model with its tokenizer
    (``model=`` + ``tokenizer=``), an existing ``engine=``, or a served model
    (``base_url=``, with ``model=`` the served model's name, ``api_key=``, ``dialect=``,
    and optionally ``tokenizer=``: the served model's tokenizer, else found from the server).
    :meth:`check` validates the combination without loading anything.
    """

    owner: str
    model: Any = None
    tokenizer: Any = None
    gguf_file: str | None = None
    engine: Any = None
    base_url: str | None = None
    api_key: str | None = None
    dialect: str | None = None

    @property
    def loaded_model(self) -> bool:
        return self.model is not None and not isinstance(self.model, str | PathLike)

    def check(self) -> EngineSource:
        """Raise a RainInputError naming the clash if the arguments do not fit together."""
        who = self.owner
        if self.engine is not None:
            others = [
                n
                for n in ("model", "tokenizer", "gguf_file", "base_url", "api_key", "dialect")
                if getattr(self, n) is not None
            ]
            if others:
                raise RainInputError(
                    f"{who}: pass either model= or engine=, not both (got engine= and "
                    f"{', '.join(o + '=' for o in others)})"
                )
            from shared_core.engine import RainEngine

            if not isinstance(self.engine, RainEngine):
                raise RainInputError(
                    f"{who}: engine= must be a RainEngine, got {type(self.engine).__name__}"
                )
            return self
        if self.base_url is None:
            for name in ("api_key", "dialect"):
                if getattr(self, name) is not None:
                    raise RainInputError(
                        f"{who}: {name}= is for a served model; pass base_url= (the "
                        "server's address) too, or drop it for a local model"
                    )
        elif self.gguf_file is not None or self.loaded_model:
            raise RainInputError(
                f"{who}: base_url= serves a model by name; pass model='<served model name>' "
                "without gguf_file= or a loaded model"
            )
        else:
            return self  # a served model: model= is a name, tokenizer= optional
        if self.tokenizer is not None and self.model is None:
            raise RainInputError(f"{who} got a tokenizer without a model; pass model= as well")
        if self.loaded_model and self.tokenizer is None:
            raise RainInputError(
                f"{who} got a loaded model ({type(self.model).__name__}) without its "
                "tokenizer; pass tokenizer= too, or a model id/path instead"
            )
        if self.tokenizer is not None and not self.loaded_model:
            raise RainInputError(
                f"{who}: a tokenizer goes with a loaded model object; with a model id or "
                "path the tokenizer is loaded with the model"
            )
        if self.gguf_file is not None and self.model is None:
            raise RainInputError(
                f"{who}: gguf_file= names a file inside model=; pass model= (the folder or "
                "repo that holds it) too"
            )
        return self

    def load(self) -> Any:
        """The engine (a RainEngine): shared per model id / server, built for a loaded model."""
        from shared_core.engine import RainEngine, load_engine

        self.check()
        if self.engine is not None:
            return self.engine
        if self.base_url is not None:
            return _served_engine(
                self.base_url, self.model, self.api_key, self.dialect, self.tokenizer
            )
        if self.loaded_model:
            return RainEngine(model=self.model, tokenizer=self.tokenizer)
        return load_engine(self.model, self.gguf_file)


def _served_engine(
    base_url: str, model: Any, api_key: str | None, dialect: str | None, tokenizer: Any
) -> Any:
    from shared_core.engine import RainEngine, load_engine

    def connect() -> Any:
        kwargs: dict[str, Any] = {"model": model, "api_key": api_key}
        if dialect is not None:
            kwargs["dialect"] = dialect
        if tokenizer is not None:
            kwargs["tokenizer"] = tokenizer
        return RainEngine.from_server(base_url, **kwargs)

    if tokenizer is not None and not isinstance(tokenizer, str | PathLike):
        return connect()  # a tokenizer object: not a cache key; this engine is its own
    # One engine per server, model, dialect, tokenizer and key, shared like local models.
    key_id = hashlib.sha256((api_key or "").encode()).hexdigest()[:12]
    key = f"{base_url}#{model}#{dialect}#{tokenizer}#{key_id}"
    return load_engine(key, None, factory=connect)
