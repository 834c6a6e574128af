"""Every constant of RAIN in one validated, immutable object.

Symbols follow Li et al., "RAIN: Your Language Models Can Align Themselves
without Finetuning" (ICLR 2024). Each field's docstring names the paper's value, or
the authors' reference code's where the paper is silent (see ``shared/RAIN.md``);
:meth:`RainConfig.paper` sets all of them. The defaults are the setting chosen on the
alignment benchmark's dev split (README, Alignment).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared_core.errors import RainConfigError

__all__ = ["RainConfig", "build_config"]


class RainConfig(BaseModel):
    """Search and decoding settings. Invalid values fail at construction.

    The field defaults are the setting chosen on the alignment benchmark's dev split
    within 10x greedy's time (:meth:`tuned`, README, Alignment): what ``ChatRain()``,
    ``RainLLM()`` and the CLI get. :meth:`fast` is the one chosen within 4x, and
    :meth:`paper` restores the paper's constants (each field's docstring names them).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # --- Selection (PUCT) -------------------------------------------------------------
    c: float = Field(2.0, ge=0.0)
    """Exploration constant *c* of the PUCT rule (paper: 2). ``0`` disables exploration."""
    unvisited_value: float = Field(0.0, ge=0.0, le=1.0)
    """Normalised value an unvisited child counts with during selection (reference code: 0)."""

    # --- Expansion ----------------------------------------------------------------------
    num_candidates: int = Field(4, ge=1, le=64)
    """Candidate token sets per expansion, *k* (reference code: about 10)."""
    token_set_lengths: tuple[int, ...] = (8,)
    """Token-set length by the expanded node's depth from the start of the answer; the
    last entry repeats (reference code: 1, 2, 4, then 10)."""
    expansion_top_k: int = Field(15, ge=1)
    """Sample multi-token candidates from the top-k distribution (reference code: 15)."""
    expansion_temperature: float = Field(1.0, gt=0.0)
    """Temperature for sampling multi-token candidates (reference code: 1)."""
    expand_after_visits: int = Field(0, ge=0)
    """Expand a reached leaf only once it has this many visits (0: at once, as the reference
    code does). With 1 a new candidate is first judged by a rollout of its own and grows
    children only when the search returns to it: far fewer multi-token expansions."""
    root_prior_mix: float = Field(1.0, ge=0.0, le=1.0)
    """Weight of the uniform prior mixed into the root's children: (1-w)·p + w/k (code:
    0.25). 1: the judge, not the product prior, decides between the root's candidates."""
    prior_length_norm: bool = False
    """Prior of a token set from the geometric mean of its token probabilities (the
    product's L-th root) instead of their product, renormalised over siblings. A product
    of 8 or 10 token probabilities gives the greedy set ~99 % of the mass, so PUCT never
    looks at a sibling; per token, the priors stay comparable across set lengths."""

    # --- Simulation ---------------------------------------------------------------------
    simulate: bool = True
    """Extend a leaf to the end of its clause before it is evaluated (reference code)."""
    clause_delimiters: tuple[str, ...] = (",", ".", "?", ":", ";", "!", "\n")
    """A rollout stops after a token containing one of these (end of the current clause)."""
    simulation_max_tokens: int = Field(8, ge=0)
    """Upper bound on the tokens one rollout may add (paper preset: 24)."""
    simulation_top_k: int = Field(15, ge=1)
    """Top-k for sampling rollout tokens."""
    simulation_temperature: float = Field(1.0, gt=0.0)
    """Temperature for sampling rollout tokens."""

    # --- Similarity update (paper §3, Eq. 3) --------------------------------------------
    similarity_update: bool = False
    """Let siblings learn from a rollout whose embedding is similar (the paper: on; it
    needs sentence embeddings)."""
    gamma_s: float = Field(0.2, ge=0.0, le=1.0)
    """γ_s, weight of a similarity update (paper: 0.2)."""
    similarity_threshold: float = Field(0.95, ge=0.0, le=1.0)
    """Cosine similarity above which a sibling is updated (reference code: 0.95). Not
    below 0: the update weight γ_s·sim must be positive, or n and v leave their range."""

    # --- Dynamic node addition ----------------------------------------------------------
    dynamic_addition: bool = False
    """Add candidates to a node whose children look alike and all score low (the paper:
    on; it needs sentence embeddings)."""
    dynamic_max_children: int = Field(20, ge=1)
    """No addition once a node has this many children (reference code: 20)."""
    dynamic_variance_factor: float = Field(0.03, ge=0.0)
    """Fire when ‖Var(children embeddings)‖ < factor × token-set length (code: 0.03)."""
    dynamic_value_threshold: float = Field(0.0, ge=-1.0, le=1.0)
    """…and the best child value is below this (reference code: 0)."""
    dynamic_addition_count: int = Field(1, ge=1)
    """How many candidates one addition brings."""

    # --- Commit (outer loop) ------------------------------------------------------------
    T: int = Field(6, ge=1)
    """Commit once the root has this many visits (reference code: 50)."""
    min_new_iterations: int = Field(3, ge=1)
    """…but only after at least this many new iterations on the current root (code: 15);
    capped at T, so setting a small T alone is enough for a small search."""
    T_m: int = Field(2, ge=1)
    """Early commit allowed after T_m iterations if the best child scores ≥ V (code: 6)."""
    V: float = Field(0.8, ge=-1.0, le=1.0)
    """Value threshold V of the early commit (reference code: 0.8)."""
    greedy_early_commit: bool = True
    """Commit the greedy child as soon as its first evaluation is ≥ V (not in the paper)."""
    commit_rule: Literal["visits", "value"] = "value"
    """Which child a commit takes: ``visits``, the most visited (the paper; ties: higher
    value), or ``value``, the visited child with the highest value (ties: more visits).
    With a few iterations per commit, visit counts mostly tie or follow the prior, and
    the most visited child was below a sibling's value on 30 % of commits (dev split)."""
    final_check: bool = True
    """Also decode the answer greedily, judge it by the same rubric, and return it instead
    when the judge scores it above the search's answer: the search never ends below
    greedy decoding by its own judge. Costs one greedy decode and one evaluation; a
    stream holds its token sets until the check is done."""

    # --- Best-of-N (the paper's Table 5 baseline) ---------------------------------------
    best_of: int = Field(0, ge=0, le=256)
    """0: the RAIN search. N ≥ 1: no search; sample N whole answers in one batched call and
    return the one the self-evaluation scores highest (ties: the first drawn)."""
    best_of_temperature: float = Field(0.7, gt=0.0)
    """Sampling temperature of the best-of-N answers."""
    best_of_top_k: int = Field(50, ge=0)
    """Sample best-of-N answers from the top-k tokens (at T=0.7 the top 50 hold nearly
    all the mass); 0: the whole vocabulary, which on a CPU costs ~20 ms per drawn token
    for sorting a 49k vocabulary -- more than the model's forward pass."""

    # --- Decoding limits and stops ------------------------------------------------------
    max_new_tokens: int = Field(256, ge=1)
    """Maximum number of response tokens."""
    stop: tuple[str, ...] = ()
    """Generation stops before the first of these strings (it is not returned)."""
    seed: int = 0
    """Seed of every random draw: same input, rubric, config and seed → same output."""
    temperature: float = Field(0.0, ge=0.0)
    """Vanilla decoding only: 0 is greedy, otherwise sampled at this temperature."""

    # --- Budgets ------------------------------------------------------------------------
    max_time_s: float | None = Field(None, gt=0.0)
    """Wall-clock budget per call; when spent the search commits what it has."""
    max_iterations: int | None = Field(None, ge=1)
    """Cap on search iterations per call; when spent the search commits what it has."""
    max_nodes: int | None = Field(None, ge=2)
    """Cap on tree nodes per call; when reached the search commits what it has."""

    # --- Engineering --------------------------------------------------------------------
    leaves_per_round: int = Field(1, ge=1, le=64)
    """Leaves one search round selects (a virtual loss keeps them distinct; walks that
    reach one leaf being expanded go on into distinct new children), expands, rolls out
    and judges in shared model calls before backing all of them up; each counts as one
    iteration, and a walk to a leaf that needs no model call (terminal, judged before)
    takes no place. 1: one leaf per iteration, as in the paper. More leaves make fewer,
    wider forward passes (faster where a pass costs less than proportionally to its
    rows) but choose each leaf knowing less."""
    reuse_cache: bool = True
    """Reuse KV caches of shared prefixes and batch work (off: same search, recomputed)."""
    rubric_cache_size: int = Field(8, ge=1)
    """Rubric preambles kept computed per loaded model."""

    def __init__(self, **data: Any) -> None:
        # Re-raise pydantic's report as one error that names each field and the fix.
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise RainConfigError(_explain(exc)) from None

    @model_validator(mode="after")
    def _check_relations(self) -> Self:
        if not self.token_set_lengths:
            raise ValueError("token_set_lengths must not be empty; the paper uses (1, 2, 4, 10)")
        if any(n < 1 for n in self.token_set_lengths):
            raise ValueError("every entry of token_set_lengths must be ≥ 1, e.g. (1, 2, 4, 10)")
        if self.T_m > self.T:
            raise ValueError(f"T_m ({self.T_m}) must not exceed T ({self.T}); lower T_m or raise T")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if not self.clause_delimiters or any(not d for d in self.clause_delimiters):
            raise ValueError("clause_delimiters must be a non-empty tuple of non-empty strings")
        return self

    @classmethod
    def paper(cls, **overrides: Any) -> RainConfig:
        """The paper's constants, and the reference code's where the paper is silent
        (``shared/RAIN.md``): 10 candidates, token sets of 1, 2, 4, then 10 tokens,
        T=50 (≥ 15 new iterations per commit), T_m=6, V=0.8, c=2, a 0.25 uniform mix
        at the root, similarity update and dynamic node addition. For reproduction:
        on a CPU it takes ~50× the time of greedy decoding."""
        base: dict[str, Any] = {name: f.default for name, f in cls.model_fields.items()}
        base.update(_PAPER)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def fast(cls, **overrides: Any) -> RainConfig:
        """The ≤ 4× preset, chosen on the alignment benchmark's dev split and reported on
        its test split (README, Alignment).

        4 candidates of 16-token sets (a 32-token answer is two commits), T=4 (each
        candidate judged about once; at least 2 new iterations; T_m=2), leaves expanded
        only on their second visit, commit by value, greedy early commit at V=0.8,
        8-token rollouts, a uniform root prior, no similarity update or dynamic
        addition (no sentence embeddings) and no final check against greedy (it would
        cost a greedy decode). Trade-off: coarse, once-judged choices, so a bad branch
        that only shows later is caught less often, and the answer can end below
        greedy's by the judge.
        """
        base: dict[str, Any] = {**_FAST, **overrides}
        return cls(**base)

    @classmethod
    def tuned(cls, **overrides: Any) -> RainConfig:
        """The field defaults, by the name the alignment benchmark reports them under: the
        ≤ 10× preset chosen on the dev split.

        4 candidates of 8-token sets at every depth, a uniform root prior (the judge, not
        the product prior, decides between the root's candidates), T=6 with at least 3
        new iterations per commit (T_m=2, V=0.8, greedy early commit), 8-token rollouts,
        commit by value, and a final check: the greedy answer is decoded and judged too,
        and returned when the judge scores it higher. No similarity update or dynamic
        addition (no sentence embeddings). A stream holds its token sets until the check.
        """
        base: dict[str, Any] = {**_TUNED, **overrides}
        return cls(**base)

    @classmethod
    def tuned_fast(cls, **overrides: Any) -> RainConfig:
        """:meth:`fast`, by the name the alignment benchmark reports it under."""
        return cls.fast(**overrides)

    def merged(self, **overrides: Any) -> RainConfig:
        """A copy with some fields replaced, validated like a new config."""
        if not overrides:
            return self
        data = self.model_dump()
        data.update(overrides)
        return RainConfig(**data)

    def token_set_length(self, depth: int) -> int:
        """Length of the token sets created under a node at ``depth``."""
        return self.token_set_lengths[min(depth, len(self.token_set_lengths) - 1)]


_PAPER: dict[str, Any] = {
    "c": 2.0,
    "unvisited_value": 0.0,
    "num_candidates": 10,
    "token_set_lengths": (1, 2, 4, 10),
    "expansion_top_k": 15,
    "expansion_temperature": 1.0,
    "expand_after_visits": 0,
    "root_prior_mix": 0.25,
    "prior_length_norm": False,
    "simulate": True,
    "simulation_max_tokens": 24,
    "similarity_update": True,
    "gamma_s": 0.2,
    "similarity_threshold": 0.95,
    "dynamic_addition": True,
    "T": 50,
    "min_new_iterations": 15,
    "T_m": 6,
    "V": 0.8,
    "greedy_early_commit": False,
    "commit_rule": "visits",
    "final_check": False,
    "leaves_per_round": 1,
    "best_of": 0,
}
"""The search constants of :meth:`RainConfig.paper`, whatever the field defaults become."""

_TUNED: dict[str, Any] = {
    "num_candidates": 4,
    "token_set_lengths": (8,),
    "root_prior_mix": 1.0,
    "T": 6,
    "min_new_iterations": 3,
    "T_m": 2,
    "V": 0.8,
    "greedy_early_commit": True,
    "simulation_max_tokens": 8,
    "similarity_update": False,
    "dynamic_addition": False,
    "commit_rule": "value",
    "final_check": True,
}
"""The fields :meth:`RainConfig.tuned` sets (the others keep their defaults)."""

_FAST: dict[str, Any] = {
    **_TUNED,
    "token_set_lengths": (16,),
    "expand_after_visits": 1,
    "T": 4,
    "min_new_iterations": 2,
    "final_check": False,
}
"""The fields :meth:`RainConfig.fast` sets: the tuned ones with 16-token sets, T=4, leaves
expanded on their second visit, and no final check."""


def build_config(
    data: Mapping[str, Any] | RainConfig | str | None = None, **overrides: Any
) -> RainConfig:
    """Validate a config from a mapping, turning pydantic's report into a RainConfigError."""
    if isinstance(data, RainConfig):
        return data.merged(**overrides)
    if isinstance(data, str):
        data = {"preset": data}  # a preset name alone, e.g. "fast"
    if data is not None and not isinstance(data, Mapping):
        raise RainConfigError(
            f"a config must be a RainConfig, a dict of settings or a preset name "
            f"('default', 'fast', 'paper', 'tuned', 'tuned_fast'), not {type(data).__name__}"
        )
    payload = dict(data or {})
    bad_keys = [k for k in payload if not isinstance(k, str)]
    if bad_keys:
        raise RainConfigError(f"config keys must be setting names (strings), got {bad_keys!r:.80}")
    preset = payload.pop("preset", None)
    payload.update(overrides)
    if preset == "fast":
        return RainConfig.fast(**payload)
    if preset == "paper":
        return RainConfig.paper(**payload)
    if preset == "tuned":
        return RainConfig.tuned(**payload)
    if preset == "tuned_fast":
        return RainConfig.tuned_fast(**payload)
    if preset not in (None, "default"):
        raise RainConfigError(
            f"unknown config preset {preset!r}; "
            "use 'default', 'fast', 'paper', 'tuned' or 'tuned_fast'"
        )
    return RainConfig(**payload)


def _explain(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        msg = err["msg"]
        if not err["loc"]:
            # A rule between fields: the message names them; the input is the whole config.
            lines.append(f"RainConfig: {msg.removeprefix('Value error, ')}")
            continue
        field = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            known = ", ".join(sorted(RainConfig.model_fields))
            msg = f"unknown setting; known settings are: {known}"
        lines.append(f"RainConfig.{field}: {msg} (got {err.get('input')!r})")
    return "invalid RAIN config:\n  " + "\n  ".join(lines)
