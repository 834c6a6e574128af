"""Property-based tests (hypothesis): the tree stays consistent, parsing never crashes.

1. Any sequence of expansions, back-ups, similarity updates and commits keeps
   every visit count ≥ 0, every value in [-1, 1], the parent links intact, and
   the committed nodes a path of the tree.
2. The whole search, over a scripted model with drawn scores and settings,
   commits only what the commit rule allows and reports consistent candidates.
3. Config and rubric parsing, fed arbitrary data, returns a valid object or
   raises RainConfigError / RubricError -- never any other exception.
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from shared_core import RainConfig, RainConfigError, RubricError, build_config, get_rubric
from shared_core.embeddings import Embedder
from shared_core.rubric import PRESETS, Rubric
from shared_core.search import (
    backup,
    choose_commit,
    iterate,
    run_search,
    select,
    should_commit,
    similarity_update,
)
from shared_core.tree import Node, Tree, path_tokens
from tests.scripted import ScriptedEvaluator, ScriptedLM, make_context

EPS = 1e-9
"""Float slack for the running means (v·n + s)/(n + 1)."""

_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- helpers -------------------------------------------------------------------------------


class _BucketEmbedder(Embedder):
    """Deterministic 2-d unit vectors in a few directions, so many texts are alike.

    crc32 (not ``hash``) keeps the vectors the same in every process.
    """

    def __init__(self, angles: Sequence[float]) -> None:
        self.angles = list(angles)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = []
        for text in texts:
            a = self.angles[zlib.crc32(text.encode()) % len(self.angles)]
            out.append([math.cos(a), math.sin(a)])
        return np.asarray(out, dtype=np.float32).reshape(len(texts), 2)


def _random_lm(vocab_answers: int = 6) -> ScriptedLM:
    """A scripted model whose next-token weights are a fixed function of the text."""
    letters = "abcdef,. "[: vocab_answers + 3]

    def next_fn(context: str) -> dict[str, float]:
        seed = zlib.crc32(context.encode())
        rng = np.random.default_rng(seed)
        weights = rng.random(len(letters) + 1)
        dist = {ch: float(w) for ch, w in zip(letters, weights[:-1], strict=True)}
        dist["<eos>"] = float(weights[-1]) * 0.3
        return dist

    return ScriptedLM(next_fn)


def _check_subtree(root: Node) -> None:
    """n ≥ 0, v ∈ [-1, 1], parent links and sibling priors consistent, below ``root``."""
    for node in root.iter_subtree():
        assert node.visits >= 0.0, f"negative visit count {node.visits}"
        assert -1.0 - EPS <= node.value <= 1.0 + EPS, f"value {node.value} outside [-1, 1]"
        assert math.isfinite(node.value) and math.isfinite(node.visits)
        if node.children:
            assert all(child.parent is node for child in node.children)
            assert math.isclose(sum(c.prior for c in node.children), 1.0, rel_tol=1e-6)


def _check_path(tree: Tree, path: list[Node]) -> None:
    assert path[0] is tree.root
    for parent, child in itertools.pairwise(path):
        assert child in parent.children


# --- 1. operations on the tree -------------------------------------------------------------

_op = st.one_of(
    st.tuples(
        st.just("expand"),
        st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4),
        st.booleans(),
    ),
    st.tuples(st.just("backup"), st.floats(-1.0, 1.0)),
    st.tuples(st.just("similarity"), st.floats(-1.0, 1.0)),
    st.tuples(st.just("commit")),
)


@_SETTINGS
@given(
    ops=st.lists(_op, min_size=1, max_size=40),
    c=st.floats(0.0, 4.0),
    gamma_s=st.floats(0.0, 1.0),
    threshold=st.floats(-1.0, 1.0),
    angles=st.lists(st.floats(0.0, 3.2), min_size=1, max_size=3),
)
def test_tree_stays_consistent_under_any_operations(
    ops: list[tuple[Any, ...]], c: float, gamma_s: float, threshold: float, angles: list[float]
) -> None:
    try:
        config = RainConfig.paper(c=c, gamma_s=gamma_s, similarity_threshold=threshold)
    except RainConfigError:
        assume(False)  # the config refuses it: nothing to run
        raise
    lm = _random_lm()
    ctx = make_context(
        lm, ScriptedEvaluator(lambda _: 0.0), config, embedder=_BucketEmbedder(angles)
    )
    tree = Tree()
    committed: list[Node] = [tree.root]
    next_token = 1
    for op in ops:
        path = select(tree, config)
        _check_path(tree, path)
        leaf = path[-1]
        if op[0] == "expand" and leaf.is_leaf and not leaf.terminal:
            children = []
            for p in op[1]:
                children.append(Node((next_token,), raw_prob=p))
                next_token = next_token % 60 + 1
            children[0].terminal = op[2] and len(children) > 1
            leaf.add_children(children)
        elif op[0] == "backup":
            backup(tree, path, op[1])
        elif op[0] == "similarity":
            backup(tree, path, op[1])
            similarity_update(ctx, tree, path, [], op[1])
        elif op[0] == "commit" and tree.root.children:
            chosen = choose_commit(tree.root)
            assert chosen.visits == max(ch.visits for ch in tree.root.children)
            chosen.parent = None
            tree.root = chosen
            committed.append(chosen)
        _check_subtree(tree.root)
        assert tree.min_value <= -1.0 and tree.max_value >= 1.0 - EPS
    # The committed nodes form one chain: each was a child of the previous root.
    for parent, child in itertools.pairwise(committed):
        assert child in parent.children


@_SETTINGS
@given(
    value=st.floats(-1.0, 1.0),
    visits=st.floats(1.0, 5.0),
    score=st.floats(-1.0, 1.0),
    angle=st.floats(0.0, math.pi),
    gamma_s=st.floats(0.0, 1.0),
    threshold=st.floats(-1.0, 1.0),
)
# Found by this test: a negative threshold let cos = -0.42 through, a negative
# weight γ_s·sim drove v to 2.43 (now the config refuses thresholds below 0).
@example(value=1.0, visits=1.0, score=-1.0, angle=2.0, gamma_s=1.0, threshold=-0.5)
def test_similarity_update_keeps_the_sibling_in_range(
    value: float, visits: float, score: float, angle: float, gamma_s: float, threshold: float
) -> None:
    # Any threshold the config accepts: a sibling at any angle to the path node
    # (cosine down to -1) must keep n ≥ 0 and v ∈ [-1, 1] after Eq. 3.
    try:
        config = RainConfig.paper(gamma_s=gamma_s, similarity_threshold=threshold)
    except RainConfigError:
        assume(False)
        raise
    ctx = make_context(
        _random_lm(), ScriptedEvaluator(lambda _: 0.0), config, embedder=_BucketEmbedder([0.0])
    )
    y, x = Node((1,), raw_prob=0.5), Node((2,), raw_prob=0.5)
    x.visits, x.value = visits, value
    x.update_embedding(np.array([math.cos(angle), math.sin(angle)], dtype=np.float32))
    root = Node(())
    root.add_children([y, x])
    tree = Tree(root=root)
    backup(tree, [root, y], score)
    similarity_update(ctx, tree, [root, y], [], score)
    _check_subtree(root)


# --- 2. the whole search over a scripted model ---------------------------------------------


@_SETTINGS
@given(
    scores=st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=12),
    num_candidates=st.integers(1, 4),
    lengths=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    T=st.integers(1, 6),
    T_m=st.integers(1, 6),
    min_new=st.integers(1, 6),
    V=st.floats(-1.0, 1.0),
    threshold=st.floats(-1.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_search_commits_follow_the_rule_for_any_scores(
    scores: list[float],
    num_candidates: int,
    lengths: list[int],
    T: int,
    T_m: int,
    min_new: int,
    V: float,
    threshold: float,
    seed: int,
) -> None:
    try:
        config = RainConfig.paper(
            num_candidates=num_candidates,
            token_set_lengths=tuple(lengths),
            T=T,
            T_m=T_m,
            min_new_iterations=min_new,
            V=V,
            similarity_threshold=threshold,
            max_new_tokens=8,
            simulation_max_tokens=2,
            dynamic_value_threshold=0.5,
            dynamic_variance_factor=1.0,
            seed=seed,
        )
    except RainConfigError:
        assume(False)
        raise
    counter = iter(range(10**6))
    evaluator = ScriptedEvaluator(lambda _: scores[next(counter) % len(scores)])
    ctx = make_context(_random_lm(), evaluator, config, embedder=_BucketEmbedder([0.0, 0.1]))
    answer: list[int] = []
    for commit in run_search(ctx):
        answer.extend(commit.token_ids)
        if commit.forced is not None and not commit.candidates:
            continue  # the greedy finish after a spent budget (none is set here)
        kids = commit.candidates
        assert kids, "a commit always chooses among searched children"
        assert all(k["n"] >= 0 and -1.0 - EPS <= k["v"] <= 1.0 + EPS for k in kids)
        chosen = [k for k in kids if tuple(k["token_ids"]) == commit.token_ids]
        assert len(chosen) == 1, "the committed set is one of the root's children"
        assert chosen[0]["n"] >= max(k["n"] for k in kids) - 1e-3, "the most visited child"
    assert ctx.stats.nodes >= 1 and ctx.stats.iterations >= 1
    assert len(answer) <= config.max_new_tokens
    # The request ended the answer by one of its rules, at the first commit that met it.
    assert ctx.request.committed == answer and ctx.request.finish_reason in {"stop", "length"}
    assert ctx.request.end_reason() == ctx.request.finish_reason


@_SETTINGS
@given(scores=st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=8), steps=st.integers(1, 25))
def test_every_iteration_leaves_a_consistent_tree(scores: list[float], steps: int) -> None:
    config = RainConfig.paper(
        num_candidates=3,
        token_set_lengths=(1, 2),
        T=4,
        T_m=1,
        min_new_iterations=1,
        max_new_tokens=6,
        simulation_max_tokens=2,
        similarity_threshold=0.5,
        dynamic_value_threshold=0.5,
        dynamic_variance_factor=1.0,
    )
    counter = iter(range(10**6))
    evaluator = ScriptedEvaluator(lambda _: scores[next(counter) % len(scores)])
    ctx = make_context(_random_lm(), evaluator, config, embedder=_BucketEmbedder([0.0, 0.05]))
    tree = Tree()
    new = 0
    for _ in range(steps):
        iterate(ctx, tree)
        new += 1
        _check_subtree(tree.root)
        if should_commit(tree.root, new, config):
            chosen = choose_commit(tree.root)
            chosen.parent = None
            tree.root = chosen
            ctx.request.commit(chosen.token_ids)
            new = 0
            if chosen.terminal:
                assert ctx.request.finished
                break
    committed = ctx.request.committed
    assert len(committed) + len(path_tokens(select(tree, config))) <= config.max_new_tokens


# --- 3. fuzzing config and rubric parsing ------------------------------------------------

_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.binary(max_size=6),
)
_value = st.recursive(
    _scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(st.text(max_size=8), inner, max_size=4),
    ),
    max_leaves=8,
)
_config_key = st.one_of(st.sampled_from([*sorted(RainConfig.model_fields), "preset"]), st.text())


@_SETTINGS
@given(
    data=st.one_of(
        st.dictionaries(_config_key, _value, max_size=6),
        st.dictionaries(st.integers(), _value, max_size=2),
        _value,
    )
)
def test_config_parsing_raises_only_rain_config_error(data: Any) -> None:
    try:
        config = build_config(data)
    except RainConfigError as exc:
        assert str(exc)  # names what was wrong
    else:
        assert isinstance(config, RainConfig)
        assert config.T_m <= config.T and config.min_new_iterations <= config.T


@_SETTINGS
@given(
    overrides=st.dictionaries(st.sampled_from(sorted(RainConfig.model_fields)), _value, max_size=4)
)
def test_config_overrides_raise_only_rain_config_error(overrides: dict[str, Any]) -> None:
    try:
        config = RainConfig().merged(**overrides)
    except RainConfigError:
        return
    assert isinstance(config, RainConfig)


def _rubric_like() -> st.SearchStrategy[Any]:
    option = st.fixed_dictionaries(
        {},
        optional={"label": _value | st.sampled_from(["A", "B", "a", "yes"]), "text": _value},
    )
    fields = {
        "name": _value,
        "instruction": _value,
        "question": _value,
        "good": option | _value,
        "bad": option | _value,
        "examples": st.lists(
            st.fixed_dictionaries(
                {}, optional={"prompt": _value, "response": _value, "good": _value}
            ),
            max_size=2,
        )
        | _value,
        "style": st.sampled_from(["chat", "plain", "other"]) | _value,
        "scoring": st.sampled_from(["hard", "soft", "x"]),
        "preset": st.sampled_from([*PRESETS, "HARMLESS ", "nope"]) | _value,
        "swap_options": _value,
    }
    return st.fixed_dictionaries({}, optional=fields)


@_SETTINGS
@given(spec=st.one_of(_rubric_like(), _value, st.sampled_from([*PRESETS, "nope", ""])))
def test_rubric_parsing_raises_only_rubric_error(spec: Any) -> None:
    try:
        rubric = get_rubric(spec)
    except RubricError as exc:
        assert str(exc)
    else:
        assert isinstance(rubric, Rubric)
        assert rubric.good.label.strip().lower() != rubric.bad.label.strip().lower()


@_SETTINGS
@given(
    config=st.one_of(
        st.none(),
        st.sampled_from(["fast", "default", "turbo", ""]),
        st.dictionaries(_config_key, _value, max_size=4),
        _value,
    ),
    overrides=st.dictionaries(st.sampled_from(sorted(RainConfig.model_fields)), _value, max_size=2),
)
def test_engine_config_resolution_raises_only_rain_config_error(
    config: Any, overrides: dict[str, Any]
) -> None:
    # What generate/stream/vanilla and the adapters do with a per-call config.
    engine = _scripted_engine()
    try:
        resolved = engine.resolve_config(config, **overrides)
    except RainConfigError as exc:
        assert str(exc)
    else:
        assert isinstance(resolved, RainConfig)


_ENGINE: list[Any] = []


def _scripted_engine() -> Any:
    from shared_core import RainEngine

    if not _ENGINE:
        _ENGINE.append(RainEngine(backend=_random_lm(), evaluator=ScriptedEvaluator(lambda _: 0.0)))
    return _ENGINE[0]
