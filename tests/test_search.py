"""The search, one mechanism at a time, against answers known in advance.

Every expected number below is worked out by hand from the formulas in
``shared/RAIN.md``; none is read back from the code under test.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest

from shared_core import RainConfig, RainEngine
from shared_core.search import (
    backup,
    choose_commit,
    dynamic_addition,
    needs_more_children,
    puct_score,
    select,
    should_commit,
    similarity_update,
)
from shared_core.tree import Node, Tree
from tests.scripted import (
    ScriptedEmbedder,
    ScriptedEvaluator,
    ScriptedLM,
    choice_table,
    make_context,
)

# --- helpers ----------------------------------------------------------------------------


def _node(prob: float, visits: float = 0.0, value: float = 0.0, tokens: tuple[int, ...] = (1,)):
    node = Node(tokens, raw_prob=prob)
    node.visits, node.value = visits, value
    return node


def _parent(children: list[Node], visits: float, tokens: tuple[int, ...] = ()) -> Node:
    parent = Node(tokens)
    parent.add_children(children)  # priors renormalised over siblings
    parent.visits = visits
    return parent


def _cfg(**kw: object) -> RainConfig:
    return RainConfig.paper(**kw)  # type: ignore[arg-type]


# --- 1. PUCT selection ------------------------------------------------------------------


def test_puct_matches_the_formula_below_the_root() -> None:
    # v ∈ [-1, 1] is min-max normalised with the initial bounds -1 and +1.
    a, b, c = _node(0.6, 4, 0.5), _node(0.3, 1, -0.2), _node(0.1)
    parent = _parent([a, b, c], visits=9)
    tree = Tree()
    cfg = _cfg(c=2.0)
    # q + c · p · sqrt(n_parent) / (1 + n_child)
    assert puct_score(tree, parent, a, cfg, is_root=False) == pytest.approx(0.75 + 0.72)
    assert puct_score(tree, parent, b, cfg, is_root=False) == pytest.approx(0.40 + 0.90)
    assert puct_score(tree, parent, c, cfg, is_root=False) == pytest.approx(0.00 + 0.60)


def test_puct_mixes_a_uniform_into_the_root_priors() -> None:
    a, b, c = _node(0.6, 4, 0.5), _node(0.3, 1, -0.2), _node(0.1)
    root = _parent([a, b, c], visits=9)
    tree = Tree(root=root)
    cfg = _cfg(c=2.0, root_prior_mix=0.25)
    # p' = 0.75 · p + 0.25 / 3
    pa, pb, pc = 0.75 * 0.6 + 0.25 / 3, 0.75 * 0.3 + 0.25 / 3, 0.75 * 0.1 + 0.25 / 3
    assert puct_score(tree, root, a, cfg, True) == pytest.approx(0.75 + 2 * pa * 3 / 5)
    assert puct_score(tree, root, b, cfg, True) == pytest.approx(0.40 + 2 * pb * 3 / 2)
    assert puct_score(tree, root, c, cfg, True) == pytest.approx(0.00 + 2 * pc * 3 / 1)


def test_root_prior_mixing_changes_the_choice_only_at_the_root() -> None:
    # A: p=0.8, tried once and scored -1 (q=0); B: p=0.2, unvisited (q=0).
    # No mixing: A 2·0.8·1/2 = 0.8 > B 2·0.2·1/1 = 0.4.
    # Mixing 0.5: A 2·0.65/2 = 0.65 < B 2·0.35 = 0.7.
    def build() -> tuple[Tree, Node, Node]:
        a, b = _node(0.8, 1, -1.0, (1,)), _node(0.2, 0, 0.0, (2,))
        return Tree(root=_parent([a, b], visits=1)), a, b

    tree, a, _ = build()
    assert select(tree, _cfg(root_prior_mix=0.0))[1] is a
    tree, _, b = build()
    assert select(tree, _cfg(root_prior_mix=0.5))[1] is b
    # The same children one level down are not mixed: A wins again.
    tree, a, _ = build()
    inner = tree.root
    tree.root = _parent([inner], visits=1)
    assert select(tree, _cfg(root_prior_mix=0.5))[2] is a


def test_root_prior_mixing_moves_with_the_root() -> None:
    # After a commit the chosen child becomes the root; its children are mixed now.
    a, b = _node(0.8, 1, -1.0, (1,)), _node(0.2, 0, 0.0, (2,))
    inner = _parent([a, b], visits=1, tokens=(9,))
    tree = Tree(root=_parent([inner], visits=1))
    cfg = _cfg(root_prior_mix=0.5)
    assert select(tree, cfg)[2] is a
    inner.parent = None
    tree.root = inner
    assert select(tree, cfg)[1] is b


def test_unvisited_children_count_the_configured_value() -> None:
    # c = 0: pure value. A visited with v=0 (normalised 0.5); B unvisited.
    def pick(unvisited: float) -> tuple[int, ...]:
        a, b = _node(0.5, 1, 0.0, (1,)), _node(0.5, 0, 0.0, (2,))
        tree = Tree(root=_parent([a, b], visits=1))
        return select(tree, _cfg(c=0.0, unvisited_value=unvisited))[1].token_ids

    assert pick(0.0) == (1,)
    assert pick(1.0) == (2,)


def test_values_are_min_max_normalised_by_the_bounds_seen() -> None:
    a = _node(0.5, 2, 0.25)
    parent = _parent([a], visits=2)
    tree = Tree()
    tree.min_value, tree.max_value = -0.5, 0.5
    assert puct_score(tree, parent, a, _cfg(c=0.0), False) == pytest.approx(0.75)
    # Back-up widens the bounds it observes; the initial ones are -1 and +1.
    fresh = Tree()
    assert (fresh.min_value, fresh.max_value) == (-1.0, 1.0)
    assert fresh.normalise(0.0) == pytest.approx(0.5)


def test_select_walks_to_a_leaf_and_stops_at_terminal_nodes() -> None:
    leaf = _node(1.0, 0, 0.0, (3,))
    mid = _node(0.9, 2, 0.5, (1,))
    mid.add_children([leaf])
    other = _node(0.1, 1, -1.0, (2,))
    tree = Tree(root=_parent([mid, other], visits=3))
    assert select(tree, _cfg()) == [tree.root, mid, leaf]
    mid.terminal = True
    assert select(tree, _cfg()) == [tree.root, mid]


# --- 2. expansion and 3. simulation ----------------------------------------------------


def _chain(lm: ScriptedLM, *texts: str) -> list[Node]:
    """A path root → texts[0] → texts[1] ... (each node one token set)."""
    path = [Node(())]
    for text in texts:
        node = Node(tuple(lm.encode(text)))
        path[-1].add_children([node])
        path.append(node)
    return path


def test_one_token_sets_are_the_top_k_tokens_with_renormalised_priors() -> None:
    from shared_core.search import expand

    lm = ScriptedLM(choice_table({"bad.": 0.6, "good.": 0.3, "fine.": 0.1}))
    ctx = make_context(lm, ScriptedEvaluator(lambda t: 0.0), _cfg(num_candidates=2))
    path = _chain(lm)
    kids = expand(ctx, path)
    assert [lm.decode(k.token_ids) for k in kids] == ["b", "g"]
    assert [k.prior for k in kids] == [pytest.approx(2 / 3, abs=1e-4), pytest.approx(1 / 3, 1e-3)]
    assert [k.is_greedy for k in kids] == [True, False]


def test_longer_sets_are_a_greedy_run_plus_distinct_samples() -> None:
    from shared_core.search import expand

    lm = ScriptedLM(choice_table({"bad.": 0.7, "good.": 0.3}))
    cfg = _cfg(num_candidates=8, token_set_lengths=(1, 2))
    ctx = make_context(lm, ScriptedEvaluator(lambda t: 0.0), cfg)
    path = [Node((), depth=1)]  # a node one level down: its children are 2-token sets
    kids = expand(ctx, path)
    texts = [lm.decode(k.token_ids) for k in kids]
    assert texts[:2] == ["ba", "go"] and len(set(texts)) == len(texts)
    assert kids[0].is_greedy
    # Prior of a set: product of its token probabilities, normalised over siblings.
    assert kids[0].prior == pytest.approx(0.7, abs=1e-3)
    assert kids[1].prior == pytest.approx(0.3, abs=1e-3)


def test_simulation_rolls_out_to_the_end_of_the_clause() -> None:
    from shared_core.search import simulate

    lm = ScriptedLM(choice_table({"ab, cd.": 1.0}))

    def rollout(*texts: str, **cfg: object) -> str:
        ctx = make_context(lm, ScriptedEvaluator(lambda t: 0.0), _cfg(**cfg))
        return lm.decode(simulate(ctx, _chain(lm, *texts)))

    assert rollout("a") == "b,"  # stops after the delimiter
    assert rollout("ab,", " c") == "d."
    assert rollout("ab,") == ""  # the clause is already complete
    assert rollout("ab, c") == ""  # the clause under way ended inside the token set
    assert rollout("a", simulation_max_tokens=1) == "b"
    assert rollout("a", simulate=False) == ""
    assert rollout("ab, cd.") == ""  # "." ends the clause; end of text comes next


# --- 4. back-up ----------------------------------------------------------------------------


def test_backup_is_a_running_mean_with_unit_visits() -> None:
    root, a, b = _node(1.0, 3, 0.2), _node(1.0, 2, -0.5), _node(1.0)
    tree = Tree(root=root)
    backup(tree, [root, a, b], 1.0)
    assert (root.visits, root.value) == (4.0, pytest.approx((0.2 * 3 + 1) / 4))
    assert (a.visits, a.value) == (3.0, pytest.approx((-0.5 * 2 + 1) / 3))
    assert (b.visits, b.value) == (1.0, pytest.approx(1.0))


def test_backup_of_several_scores_gives_their_mean() -> None:
    node = _node(1.0)
    tree = Tree(root=node)
    for s in (1.0, -1.0, 0.5, 0.0):
        backup(tree, [node], s)
    assert node.visits == 4.0
    assert node.value == pytest.approx(0.125)


# --- 5. similarity update --------------------------------------------------------------


def _similarity_setup(theta: float, threshold: float = 0.95):
    """Root → Y ('a') on the path, siblings X ('b') and Z ('c'); rollout 'd.'."""
    lm = ScriptedLM(choice_table({"ad.": 1.0}))
    # Y's text to the end of the rollout is "ad.", embedded as e_Y = [1, 0].
    embedder = ScriptedEmbedder({"ad.": [1.0, 0.0]})
    cfg = _cfg(gamma_s=0.2, similarity_threshold=threshold)
    ctx = make_context(lm, ScriptedEvaluator(lambda t: 0.0), cfg, embedder=embedder)
    y = _node(0.5, 1, 0.0, tuple(lm.encode("a")))
    x = _node(0.3, 2, 0.5, tuple(lm.encode("b")))
    z = _node(0.2, 1, 0.7, tuple(lm.encode("c")))
    x.update_embedding(np.array([math.cos(theta), math.sin(theta)], dtype=np.float32))
    z.update_embedding(np.array([0.0, 1.0], dtype=np.float32))
    root = _parent([y, x, z], visits=4)
    return ctx, Tree(root=root), root, x, y, z, lm.encode("d.")


def test_similarity_update_matches_eq_3() -> None:
    theta = 0.15  # sim = cos(0.15) ≈ 0.9888 > 0.95
    ctx, tree, root, x, y, z, rollout = _similarity_setup(theta)
    updated = similarity_update(ctx, tree, [root, y], rollout, score=-1.0)
    sim = math.cos(theta)
    w = 0.2 * sim
    assert updated == 1
    # v_X ← (v_X·n_X + γ_s·sim·s) / (n_X + γ_s·sim),  n_X ← n_X + γ_s·sim
    assert x.value == pytest.approx((0.5 * 2 + w * -1.0) / (2 + w), abs=1e-6)
    assert x.visits == pytest.approx(2 + w, abs=1e-6)
    # Z is orthogonal (sim 0): untouched. Y itself is left to back-up.
    assert (z.visits, z.value) == (1.0, 0.7)
    assert (y.visits, y.value) == (1.0, 0.0)
    np.testing.assert_allclose(y.embedding, [1.0, 0.0])


def test_similarity_below_the_threshold_updates_nothing() -> None:
    theta = 0.5  # sim = cos(0.5) ≈ 0.8776 < 0.95
    ctx, tree, root, x, y, _, rollout = _similarity_setup(theta)
    assert similarity_update(ctx, tree, [root, y], rollout, score=-1.0) == 0
    assert (x.visits, x.value) == (2.0, 0.5)
    # The same pair passes a lower threshold.
    ctx, tree, root, x, y, _, rollout = _similarity_setup(theta, threshold=0.85)
    assert similarity_update(ctx, tree, [root, y], rollout, score=-1.0) == 1
    assert x.visits == pytest.approx(2 + 0.2 * math.cos(theta), abs=1e-6)


def test_node_embedding_is_a_running_mean_of_rollout_embeddings() -> None:
    ctx, tree, root, x, y, _, rollout = _similarity_setup(0.15)
    y.update_embedding(np.array([0.0, 1.0], dtype=np.float32))  # an earlier rollout
    similarity_update(ctx, tree, [root, y], rollout, score=1.0)
    np.testing.assert_allclose(y.embedding, [0.5, 0.5])
    assert y.embedding_count == 2
    # sim(e_X, mean) = cos(45° - 0.15 rad) < 0.95: no update of X.
    assert x.visits == 2.0


# --- 6. dynamic node addition ------------------------------------------------------------


def _alike_children(values: list[float], length: int = 1, spread: float = 0.0) -> Node:
    """Children with embeddings at angles 0, spread, 2·spread ... radians."""
    kids = []
    for i, v in enumerate(values):
        kid = _node(1.0, 1, v, tuple(range(1 + i, 1 + i + length)))
        angle = i * spread
        kid.update_embedding(np.array([math.cos(angle), math.sin(angle)], dtype=np.float32))
        kids.append(kid)
    return _parent(kids, visits=len(values))


def test_dynamic_addition_fires_when_children_look_alike_and_all_score_low() -> None:
    node = _alike_children([-0.5, -0.2, -0.1])
    assert needs_more_children(node, _cfg())


@pytest.mark.parametrize(
    ("what", "node", "overrides"),
    [
        ("one child scores 0 (not < 0)", _alike_children([-0.5, 0.0, -0.1]), {}),
        ("one child scores well", _alike_children([-0.5, 0.9, -0.1]), {}),
        ("children differ", _alike_children([-0.5, -0.2, -0.1], spread=1.2), {}),
        ("already the maximum", _alike_children([-0.5, -0.2, -0.1]), {"dynamic_max_children": 3}),
        ("threshold lowered", _alike_children([-0.5, -0.2]), {"dynamic_value_threshold": -0.3}),
    ],
)
def test_dynamic_addition_does_not_fire_when_a_condition_fails(
    what: str, node: Node, overrides: dict
) -> None:
    assert not needs_more_children(node, _cfg(**overrides)), what


def test_dynamic_addition_needs_every_child_visited_and_embedded() -> None:
    node = _alike_children([-0.5, -0.2])
    node.children[1].visits = 0
    assert not needs_more_children(node, _cfg())
    node = _alike_children([-0.5, -0.2])
    node.terminal = True
    assert not needs_more_children(node, _cfg())
    assert not needs_more_children(_parent([], visits=0), _cfg())


def test_dynamic_addition_variance_threshold_scales_with_token_set_length() -> None:
    # Two unit vectors 0.5 rad apart: per-dimension variance ((a_i - b_i) / 2)²,
    # ‖Var‖ = sqrt(((1 - cos .5)/2)⁴ + (sin .5 / 2)⁴) ≈ 0.0576: above 0.03 × 1,
    # below 0.03 × 4.
    spread = math.hypot(((1 - math.cos(0.5)) / 2) ** 2, (math.sin(0.5) / 2) ** 2)
    assert 0.03 < spread < 0.12
    assert not needs_more_children(_alike_children([-0.5, -0.2], length=1, spread=0.5), _cfg())
    assert needs_more_children(_alike_children([-0.5, -0.2], length=4, spread=0.5), _cfg())


def test_dynamic_addition_adds_the_next_most_probable_token() -> None:
    lm = ScriptedLM(choice_table({"a.": 0.5, "b.": 0.3, "c.": 0.2}))
    ctx = make_context(lm, ScriptedEvaluator(lambda t: -1.0), _cfg(), embedder=ScriptedEmbedder())
    a, b = _node(0.5, 1, -1.0, tuple(lm.encode("a"))), _node(0.3, 1, -0.8, tuple(lm.encode("b")))
    for kid in (a, b):
        kid.update_embedding(np.array([1.0, 0.0], dtype=np.float32))
    root = _parent([a, b], visits=2)
    assert dynamic_addition(ctx, [root]) == 1
    added = root.children[-1]
    assert lm.decode(added.token_ids) == "c"
    # Priors are renormalised over all three siblings.
    assert sum(k.prior for k in root.children) == pytest.approx(1.0)
    assert added.prior == pytest.approx(0.2, abs=1e-4)
    # A root whose children differ gets nothing.
    b.embedding = np.array([0.0, 1.0], dtype=np.float32)
    assert dynamic_addition(ctx, [root]) == 0


# --- the commit rule ------------------------------------------------------------------


def _commit_root(root_visits: float, kids: list[tuple[float, float]]) -> Node:
    children = [_node(0.5, n, v, (i + 1,)) for i, (n, v) in enumerate(kids)]
    return _parent(children, visits=root_visits)


COMMIT_CFG = {"T": 10, "min_new_iterations": 4, "T_m": 3, "V": 0.8}


@pytest.mark.parametrize(
    ("root_visits", "new", "kids", "expected", "why"),
    [
        (10, 4, [(6, -1.0), (4, -1.0)], True, "T visits and min_new_iterations reached"),
        (10, 3, [(6, -1.0), (4, -1.0)], False, "T visits but too few new iterations"),
        (9, 9, [(5, -1.0), (4, -1.0)], False, "one visit short of T, values low"),
        (3, 3, [(2, 0.8), (1, -1.0)], True, "T_m iterations and best value = V"),
        (3, 3, [(2, 0.79), (1, 1.0)], False, "most visited child below V"),
        (2, 2, [(1, 0.9), (1, 0.9)], False, "fewer than T_m iterations"),
        (12, 3, [(11, 0.85), (1, 0.0)], True, "early rule needs T_m, not min_new"),
        (0, 5, [], False, "no children yet"),
    ],
)
def test_should_commit_honours_t_t_m_and_v(
    root_visits: float, new: int, kids: list, expected: bool, why: str
) -> None:
    root = _commit_root(root_visits, kids)
    assert should_commit(root, new, _cfg(**COMMIT_CFG)) is expected, why


def test_choose_commit_takes_the_most_visited_then_the_higher_value() -> None:
    root = _commit_root(6, [(2, 0.9), (3, -0.5), (1, 1.0)])
    assert choose_commit(root).token_ids == (2,)
    root = _commit_root(6, [(3, 0.1), (3, 0.4)])
    assert choose_commit(root).token_ids == (2,)


def _trace_engine(score: float) -> RainEngine:
    lm = ScriptedLM(choice_table({"abcdefghij.": 0.6, "abcxyz.": 0.4}))
    return RainEngine(
        backend=lm, evaluator=ScriptedEvaluator(lambda t: score), embedder=ScriptedEmbedder()
    )


def test_search_commits_after_t_visits_when_nothing_scores_well() -> None:
    cfg = _cfg(
        T=12, min_new_iterations=2, T_m=2, V=0.8, num_candidates=4, max_new_tokens=8,
        similarity_update=False, dynamic_addition=False,
    )  # fmt: skip
    result = _trace_engine(-1.0).generate("go", config=cfg)
    trace = result.trace
    assert len(trace) >= 3 and not any(c["forced"] for c in trace)
    assert trace[0]["iterations"] == 12  # a fresh root: T iterations
    for prev, cur in itertools.pairwise(trace):
        # The kept subtree brings its visits: T - n(new root), but ≥ min_new_iterations.
        assert cur["iterations"] == max(2, 12 - int(prev["visits"])), cur
    # Both parts of the rule were exercised: some commits waited for T, some for min_new.
    assert {c["iterations"] > 2 for c in trace[1:]} == {True, False}
    assert result.stats.iterations == sum(c["iterations"] for c in trace)


def test_search_commits_early_after_t_m_when_the_best_child_reaches_v() -> None:
    cfg = _cfg(
        T=20, min_new_iterations=10, T_m=3, V=0.8, num_candidates=3, max_new_tokens=5,
        similarity_update=False, dynamic_addition=False,
    )  # fmt: skip
    result = _trace_engine(1.0).generate("go", config=cfg)
    assert [c["iterations"] for c in result.trace if not c["forced"]] == [3] * len(result.trace)


# --- whole trees, worked out by hand (mctx-style snapshots) ----------------------------


def _snapshot(lm: ScriptedLM, node: Node) -> tuple:
    """(text, n, v, children) with n and v rounded, children in tree order."""
    kids = tuple(_snapshot(lm, k) for k in node.children)
    text = lm.decode(node.token_ids) if node.token_ids != (0,) else "<eos>"
    return (text, round(node.visits, 6), round(node.value, 6), kids)


def _four_iterations(**overrides: object) -> tuple[ScriptedLM, Any, Tree, list[float]]:
    """Four iterations on "bad." (p 0.7) / "good." (p 0.3); the judge dislikes "b"."""
    from shared_core.search import iterate

    lm = ScriptedLM(choice_table({"bad.": 0.7, "good.": 0.3}))

    def judge(text: str) -> float:
        return -1.0 if text.startswith("b") else 1.0 if text.startswith("g") else 0.0

    cfg = _cfg(
        num_candidates=2, token_set_lengths=(1,), simulate=False, c=2.0, root_prior_mix=0.25,
        similarity_update=False, dynamic_addition=False, **overrides,
    )  # fmt: skip
    ctx = make_context(lm, ScriptedEvaluator(judge), cfg)
    tree = Tree()
    return lm, ctx, tree, [iterate(ctx, tree).score for _ in range(4)]


def test_four_iterations_build_the_tree_the_formulas_predict() -> None:
    """One-token sets, no rollouts: every step is determined, so the tree is known.

    Priors b 0.7, g 0.3; mixed at the root: b 0.65, g 0.35. The judge scores a
    text starting with "b" -1, with "g" +1. After an expansion, selection steps
    into the new children; with no visits yet every score ties and the likelier
    child is taken.
    1. root is a leaf: expand (b, g), step into b; "b" = -1.     root n1, b n1 v-1
    2. √1: b q(-1)=0 + 2·0.65·1/2 = 0.65 < g 0 + 2·0.35·1/1 = 0.70;
       expand g (o, eos), step into o; "go" = +1
    3. √2: b 0 + 2·0.65·√2/2 = 0.92 < g 1 + 2·0.35·√2/2 = 1.49; below g (no
       mixing) o 1 + 2·1·1/2 = 2 beats eos; expand o, step into o; "goo" = +1
    4. √3: b 0 + 2·0.65·√3/2 = 1.13 < g 1 + 2·0.35·√3/3 = 1.40; down o, o;
       expand, step into d; "good" = +1
    """
    lm, ctx, tree, scores = _four_iterations()
    assert scores == [-1.0, 1.0, 1.0, 1.0]
    assert _snapshot(lm, tree.root) == (
        "", 4.0, 0.5, (
            ("b", 1.0, -1.0, ()),
            ("g", 3.0, 1.0, (
                ("o", 3.0, 1.0, (
                    ("o", 2.0, 1.0, (("d", 1.0, 1.0, ()), ("<eos>", 0.0, 0.0, ()))),
                    ("<eos>", 0.0, 0.0, ()),
                )),
                ("<eos>", 0.0, 0.0, ()),
            )),
        ),
    )  # fmt: skip
    b, g = tree.root.children
    assert (b.prior, g.prior) == (pytest.approx(0.7, abs=1e-4), pytest.approx(0.3, abs=1e-4))
    assert b.is_greedy and not g.is_greedy
    assert ctx.stats.rewinds == 1  # iteration 2 left b for g
    # The commit rule now takes g: most visited, and its value 1 ≥ V.
    assert choose_commit(tree.root) is g
    assert should_commit(tree.root, 4, _cfg(T_m=3, V=0.8))


def test_expand_after_visits_judges_a_new_candidate_before_growing_it() -> None:
    """The tree of the test above with ``expand_after_visits=1``.

    1. the root always expands: (b, g), step into b; "b" = -1 (b stays a leaf)
    2. g 0.70 > b 0.65: g is unvisited, so it is judged as it is; "g" = +1
    3. g again (1.49 > 0.92): now visited once, it expands; step into o; "go" = +1
    4. g, o (visited once: expands), step into the new o; "goo" = +1
    """
    lm, _, tree, scores = _four_iterations(expand_after_visits=1)
    assert scores == [-1.0, 1.0, 1.0, 1.0]
    assert _snapshot(lm, tree.root) == (
        "", 4.0, 0.5, (
            ("b", 1.0, -1.0, ()),
            ("g", 3.0, 1.0, (
                ("o", 2.0, 1.0, (("o", 1.0, 1.0, ()), ("<eos>", 0.0, 0.0, ()))),
                ("<eos>", 0.0, 0.0, ()),
            )),
        ),
    )  # fmt: skip


# --- the core promise, end to end -----------------------------------------------------


def _bad_good_engine(score_fn=None) -> tuple[RainEngine, ScriptedEvaluator]:
    # The model prefers "bad." 70 / 30 over "good."; the judge dislikes "bad".
    lm = ScriptedLM(choice_table({"bad.": 0.7, "good.": 0.3}))

    def judge(text: str) -> float:
        return -1.0 if "bad" in text else 1.0 if "good" in text else 0.0

    evaluator = ScriptedEvaluator(score_fn or judge)
    return RainEngine(backend=lm, evaluator=evaluator, embedder=ScriptedEmbedder()), evaluator


CORE_CFG = {"num_candidates": 3, "T": 8, "min_new_iterations": 4, "T_m": 3, "max_new_tokens": 8}


def test_vanilla_takes_the_bad_branch() -> None:
    engine, _ = _bad_good_engine()
    assert engine.vanilla("say something").text == "bad."


@pytest.mark.parametrize("mechanisms", [True, False])
def test_rain_rewinds_and_commits_the_good_continuation(mechanisms: bool) -> None:
    engine, evaluator = _bad_good_engine()
    cfg = _cfg(**CORE_CFG, similarity_update=mechanisms, dynamic_addition=mechanisms)
    result = engine.generate("say something", config=cfg)
    assert result.text == "good."
    assert result.finish_reason == "stop"
    first = result.trace[0]
    assert first["differs_from_greedy"] is True
    assert first["text"] == "g"
    by_text = {c["text"]: c for c in first["candidates"]}
    assert by_text["b"]["greedy"] is True
    assert by_text["b"]["v"] < 0 < by_text["g"]["v"]
    assert result.stats.overrides >= 1 and result.stats.rewinds >= 1
    # The judge saw the bad branch, rolled out to the end of its clause.
    assert "bad." in evaluator.judged
    assert result.stats.final_score == 1.0


def test_rain_agrees_with_greedy_when_the_judge_is_indifferent() -> None:
    engine, _ = _bad_good_engine(lambda t: 1.0)
    result = engine.generate("say something", config=_cfg(**CORE_CFG))
    assert result.text == "bad."
    assert result.stats.overrides == 0


def test_greedy_early_commit_takes_a_good_greedy_set_at_once() -> None:
    # The fast preset's shortcut: iteration 1 expands the root and judges the
    # greedy child; when that scores ≥ V it is committed without more search.
    engine, _ = _bad_good_engine(lambda t: 1.0)
    cfg = _cfg(**CORE_CFG, greedy_early_commit=True)
    result = engine.generate("say something", config=cfg)
    assert result.text == "bad."
    assert result.trace[0]["iterations"] == 1 and result.trace[0]["greedy_agrees"]
    # A greedy set the judge dislikes is not taken early: RAIN still rewinds.
    engine, _ = _bad_good_engine()
    assert engine.generate("say something", config=cfg).text == "good."


def test_an_iteration_budget_is_honoured_and_the_answer_ends_cleanly() -> None:
    engine, _ = _bad_good_engine()
    for budget, text in ((1, "bad."), (3, "good.")):
        result = engine.generate("say something", config=_cfg(**CORE_CFG, max_iterations=budget))
        assert result.stats.iterations == budget
        assert result.stats.budget_exhausted == "max_iterations"
        assert result.text == text  # finished greedily to the end of the sentence
        assert "clean stop" in result.trace[-1]["forced"]


def test_same_seed_same_output_and_trace() -> None:
    cfg = _cfg(**CORE_CFG, seed=7)
    a = _bad_good_engine()[0].generate("say something", config=cfg)
    b = _bad_good_engine()[0].generate("say something", config=cfg)
    assert a.token_ids == b.token_ids
    assert a.trace == b.trace


def test_ablation_switches_keep_the_embedder_out_of_the_search() -> None:
    lm = ScriptedLM(choice_table({"bad.": 0.7, "good.": 0.3}))
    embedder = ScriptedEmbedder()
    engine = RainEngine(backend=lm, evaluator=ScriptedEvaluator(lambda t: 0.0), embedder=embedder)
    cfg = _cfg(**CORE_CFG, similarity_update=False, dynamic_addition=False)
    engine.generate("say something", config=cfg)
    assert embedder.calls == []
    engine.generate("say something", config=_cfg(**CORE_CFG))
    assert embedder.calls
