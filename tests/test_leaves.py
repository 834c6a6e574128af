"""Several leaves per search round (``RainConfig.leaves_per_round``).

- k = 1 is the search as it was before rounds existed: the answers, traces and
  statistics of fixed scenarios were recorded from commit 88f1548 (the search
  of the model protocol, one leaf per iteration) into
  ``tests/data/search_k1_reference.json`` (by running ``_run_scripted`` and
  ``_run_tiny`` below on that commit), and must come out the same.
- The virtual loss sends the k selections of a round to distinct leaves and is
  undone exactly: after back-up the tree is as if the k scores had been backed
  up one after the other.
- A round's model work is shared: one ``sample`` call carries every rollout,
  one ``label_logprobs`` call every judgement.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shared_core import RainConfig, RainEngine
from shared_core.search import VirtualLoss, select_leaves, select_walks
from shared_core.tree import Node, Tree
from tests.scripted import ScriptedEmbedder, ScriptedEvaluator, ScriptedLM, choice_table

REFERENCE = Path(__file__).parent / "data" / "search_k1_reference.json"

ANSWERS = {
    "a bad day, sadly.": 0.45,
    "a good day, truly.": 0.25,
    "a fine day, then bad.": 0.2,
    "bad news.": 0.1,
}


def _judge(text: str) -> float:
    # A soft verdict in [-1, 1]: words, not letters, so partial answers score too.
    score = 0.6 * ("good" in text) + 0.3 * ("fine" in text) - 0.8 * ("bad" in text)
    return max(-1.0, min(1.0, score - 0.05 * len(text) / 10))


def _scripted_engine() -> tuple[RainEngine, ScriptedEvaluator]:
    evaluator = ScriptedEvaluator(_judge)
    engine = RainEngine(
        backend=ScriptedLM(choice_table(ANSWERS)), evaluator=evaluator, embedder=ScriptedEmbedder()
    )
    return engine, evaluator


PAPERISH = {"num_candidates": 3, "T": 8, "min_new_iterations": 4, "T_m": 3, "max_new_tokens": 14}

# Thresholds at which the scripted embedder's vectors do trigger similarity updates and
# dynamic additions, so that both are part of what k = 1 must reproduce.
MECHANISMS = {
    "similarity_threshold": 0.6,
    "dynamic_variance_factor": 5.0,
    "dynamic_value_threshold": 0.3,
}

SCENARIOS: dict[str, dict[str, Any]] = {
    "paper-mechanisms-seed0": {**PAPERISH, **MECHANISMS, "seed": 0},
    "paper-mechanisms-seed7": {**PAPERISH, **MECHANISMS, "seed": 7},
    "no-mechanisms": {**PAPERISH, "similarity_update": False, "dynamic_addition": False},
    "expand-after-visit": {**PAPERISH, "expand_after_visits": 1, "seed": 3},
    "fast": {"preset": "fast", "max_new_tokens": 14, "seed": 1},
}
"""Scripted scenarios: the configs of the recorded k = 1 runs."""

LEGACY_FAST: dict[str, Any] = {
    "num_candidates": 4,
    "token_set_lengths": (4, 10),
    "expand_after_visits": 1,
    "T": 6,
    "min_new_iterations": 2,
    "T_m": 2,
    "greedy_early_commit": True,
    "V": 0.5,
    "simulation_max_tokens": 16,
    "similarity_update": False,
    "dynamic_addition": False,
}
"""``RainConfig.fast()`` as it was when the runs were recorded (on the paper's constants);
the preset was re-chosen on the alignment benchmark's dev split since."""

TINY_SCENARIO = {
    "num_candidates": 3,
    "T": 4,
    "min_new_iterations": 2,
    "T_m": 2,
    "max_new_tokens": 8,
    "simulation_max_tokens": 6,
    "seed": 5,
}
"""The real backend (tiny random Llama), the real judge and embedder."""


def _config(spec: dict[str, Any], **extra: Any) -> RainConfig:
    spec = {**spec, **extra}
    if spec.pop("preset", None) == "fast":
        return RainConfig.paper(**{**LEGACY_FAST, **spec})
    return RainConfig.paper(**spec)


def _record(result: Any) -> dict[str, Any]:
    stats = result.stats.to_dict()
    stats.pop("breakdown_s")  # timings
    stats.pop("budget_exhausted")
    return {"token_ids": list(result.token_ids), "trace": result.trace, "stats": stats}


def _run_scripted(name: str, **extra: Any) -> dict[str, Any]:
    engine, _ = _scripted_engine()
    return _record(
        engine.generate("tell me about your day", config=_config(SCENARIOS[name], **extra))
    )


def _run_tiny(tiny_engine: RainEngine, **extra: Any) -> dict[str, Any]:
    cfg = _config(TINY_SCENARIO, **extra)
    return _record(tiny_engine.generate("Describe a rainy day.", rubric="positive", config=cfg))


def _reference() -> dict[str, Any]:
    return json.loads(REFERENCE.read_text(encoding="utf-8"))


def _same(got: Any, ref: Any) -> bool:
    got = json.loads(json.dumps(got))
    # Statistics added since the recording (new fields, at their defaults) are not
    # part of the search's result: compare the recorded ones.
    got["stats"] = {k: v for k, v in got["stats"].items() if k in ref["stats"]}
    return bool(got == json.loads(json.dumps(ref)))


# --- k = 1 is the search before rounds ------------------------------------------------------


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_one_leaf_per_round_is_the_recorded_search(name: str) -> None:
    got = _run_scripted(name, leaves_per_round=1)
    assert _same(got, _reference()[name])


@pytest.mark.parametrize("batching", [True, False], ids=["batching-on", "batching-off"])
def test_one_leaf_per_round_is_the_recorded_search_on_a_real_backend(
    tiny_engine, batching: bool
) -> None:
    # Batching on or off, one search alone runs each of its passes alone.
    scheduler = tiny_engine.backend.scheduler
    scheduler.enabled = batching
    try:
        got = _run_tiny(tiny_engine, leaves_per_round=1)
    finally:
        scheduler.enabled = True
    assert _same(got, _reference()["tiny-real-backend"])


# --- the virtual loss ----------------------------------------------------------------------


def _root_with(priors: tuple[float, ...]) -> tuple[Tree, list[Node]]:
    root = Node(())
    kids = [Node((i + 1,), raw_prob=p) for i, p in enumerate(priors)]
    root.add_children(kids)
    return Tree(root=root), kids


def test_virtual_loss_spreads_a_round_over_distinct_leaves() -> None:
    """Priors 0.5, 0.3, 0.2; mixed at the root (0.75·p + 0.25/3): 0.4583, 0.3083, 0.2333.

    Without a virtual loss every walk ties at √0 = 0 and takes child 1, k times.
    With it (a pending visit; an unvisited child keeps q = unvisited_value = 0):
    1. √0: all 0, the first: child 1; pending: root n1, child 1 n1 v-1
    2. √1: child 1 0 + 2·0.4583·1/2 = 0.458, child 2 2·0.3083 = 0.617, child 3 0.467 → 2
    3. √2: child 1 2·0.4583·1.414/2 = 0.648, child 2 0.436, child 3 2·0.2333·1.414 = 0.660 → 3
    """
    tree, kids = _root_with((0.5, 0.3, 0.2))
    pending = VirtualLoss(tree, RainConfig.paper())
    paths = select_leaves(tree, RainConfig.paper(), 3, pending)
    assert [p[-1] for p in paths] == kids
    assert all(p[0] is tree.root for p in paths)
    # Pending: the first two walks (the last one has nothing left to steer).
    assert tree.root.visits == 2.0 and kids[0].visits == 1.0 and kids[2].visits == 0.0
    assert pending.visits(tree.root) == 0.0
    pending.undo()
    assert [(k.visits, k.value) for k in (tree.root, *kids)] == [(0.0, 0.0)] * 4


def test_virtual_loss_is_undone_exactly() -> None:
    tree, kids = _root_with((0.6, 0.4))
    start = ((3.0, 0.1), (2.0, 0.35), (1.2, -0.7))
    for node, (n, v) in zip((tree.root, *kids), start, strict=True):
        node.visits, node.value = n, v
    before = [(k.visits, k.value) for k in (tree.root, *kids)]
    pending = VirtualLoss(tree, RainConfig.paper())
    select_leaves(tree, RainConfig.paper(), 2, pending)
    assert [(k.visits, k.value) for k in (tree.root, *kids)] != before
    pending.undo()
    assert [(k.visits, k.value) for k in (tree.root, *kids)] == before  # bit for bit


def test_a_walk_back_to_a_taken_leaf_makes_the_round_smaller() -> None:
    """Priors 0.9, 0.1 (mixed: 0.8, 0.2); child 1 visited once with value 1 (q = 1).

    1. √1: child 1 1 + 2·0.8·1/2 = 1.8, child 2 0 + 2·0.2·1 = 0.4 → 1; pending visit
    2. √2: child 1 1 + 2·0.8·1.414/3 = 1.75, child 2 0.57 → 1 again: not retried
    """
    tree, kids = _root_with((0.9, 0.1))
    tree.root.visits, kids[0].visits, kids[0].value = 1.0, 1.0, 1.0
    paths = select_leaves(tree, RainConfig.paper(), 2, VirtualLoss(tree, RainConfig.paper()))
    assert [p[-1] for p in paths] == [kids[0]]


def test_a_walk_to_a_leaf_that_needs_no_model_takes_no_place() -> None:
    """Priors 0.5, 0.3, 0.2 as above; child 1 is *free* (a terminal leaf judged before).

    Walk 1 reaches child 1: free, a spare walk; walks 2 and 3 reach children 2 and 3,
    the two places of k = 2. Without ``free`` the round is walks 1 and 2. All free,
    the round stops at 2k walks."""
    tree, kids = _root_with((0.5, 0.3, 0.2))
    cfg = RainConfig.paper()
    walks = select_walks(tree, cfg, 2, VirtualLoss(tree, cfg), lambda p: p[-1] is kids[0])
    assert [w[-1] for w in walks] == kids
    tree, kids = _root_with((0.5, 0.3, 0.2))
    assert [w[-1] for w in select_walks(tree, cfg, 2, VirtualLoss(tree, cfg))] == kids[:2]
    tree, kids = _root_with((0.5, 0.3, 0.2))
    assert len(select_walks(tree, cfg, 2, VirtualLoss(tree, cfg), lambda p: True)) == 4
    tree, kids = _root_with((0.5, 0.3, 0.2))
    assert len(select_walks(tree, cfg, 2, VirtualLoss(tree, cfg), lambda p: True, most=3)) == 3


def test_walks_that_reach_one_ripe_leaf_go_on_into_its_new_children() -> None:
    """After one iteration the root's likely child ("g", judged +1) draws both walks of
    a round of two; it is expanded once and the walks step into its two new children
    ("a", "b"), one each, instead of the second walk adding nothing."""
    from shared_core.search import run_round
    from tests.scripted import make_context

    # A character-level model: "g" (0.9) or "b" (0.1) first, then "a" or "b" after "g".
    lm = _CountingLM(choice_table({"ga.": 0.5, "gb.": 0.4, "b.": 0.1}))
    cfg = RainConfig.paper(
        num_candidates=2, token_set_lengths=(1,), similarity_update=False, dynamic_addition=False
    )
    judge = ScriptedEvaluator(lambda t: 1.0 if t.startswith("g") else -1.0)
    ctx = make_context(lm, judge, cfg)
    tree = Tree()
    run_round(ctx, tree, 1)
    good = tree.root.children[0]
    assert lm.decode(good.token_ids) == "g" and good.visits == 1.0 and good.is_leaf
    pending = VirtualLoss(tree, cfg)
    assert [w[-1] for w in select_walks(tree, cfg, 2, pending)] == [good, good]
    pending.undo()
    lm.log.clear()
    assert len(run_round(ctx, tree, 2)) == 2
    assert [lm.decode(c.token_ids) for c in good.children] == ["a", "b"]
    assert [c.visits for c in good.children] == [1.0, 1.0] and good.visits == 3.0
    assert lm.log[0] == ("top_tokens", 1)  # "g" expanded once for both walks


# --- a round shares its model calls ---------------------------------------------------------


class _CountingLM(ScriptedLM):
    """Records how many requests each protocol call carried."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.log: list[tuple[str, int]] = []

    def top_tokens(self, requests, *, cancel=None):  # type: ignore[no-untyped-def]
        self.log.append(("top_tokens", len(requests)))
        return super().top_tokens(requests, cancel=cancel)

    def sample(self, requests, *, cancel=None):  # type: ignore[no-untyped-def]
        self.log.append(("sample", len(requests)))
        return super().sample(requests, cancel=cancel)

    def label_logprobs(self, prompts, label_ids, *, reuse=True, cancel=None):  # type: ignore[no-untyped-def]
        self.log.append(("label_logprobs", len(prompts)))
        return super().label_logprobs(prompts, label_ids, reuse=reuse, cancel=cancel)


def test_a_round_of_three_makes_one_call_per_step_for_all_three() -> None:
    from shared_core.evaluation import SelfEvaluator
    from shared_core.search import run_round
    from tests.scripted import make_context

    # Three first words of similar weight, so a round of three reaches all of them.
    lm = _CountingLM(choice_table({"a day.": 0.4, "by night.": 0.35, "calm.": 0.25}))
    cfg = RainConfig.paper(num_candidates=3, token_set_lengths=(1, 4), similarity_update=False)
    # The model judges itself, so the judge's model calls are counted too.
    ctx = make_context(lm, SelfEvaluator(lm), cfg)
    tree = Tree()
    # The bare root is the one leaf all three walks reach: it is expanded once, and the
    # walks go on into three of its new children, one each.
    first = run_round(ctx, tree, 3)
    assert len(first) == 3 and ctx.stats.iterations == 3
    assert [c.visits for c in tree.root.children] == [1.0, 1.0, 1.0]
    # One call per step for all three: expansion, rollouts, judgements (two orders each).
    assert lm.log == [("top_tokens", 1), ("sample", 3), ("label_logprobs", 6)]
    lm.log.clear()
    judged_before = len(ctx.state.judgements)
    judgements = run_round(ctx, tree, 3)
    new_responses = len(ctx.state.judgements) - judged_before  # a repeat is not re-judged
    leaves = len(judgements)
    assert leaves == 3  # each walk to another child, each expanded
    # The three expansions in one call; then the rollouts that are due in one call (a
    # set that ends its clause needs none), and the responses not judged before in one.
    assert lm.log[0] == ("sample", 3)
    rollouts = [n for c, n in lm.log[1:] if c == "sample"]
    assert len(rollouts) <= 1 and all(n <= leaves for n in rollouts)
    labels = [n for c, n in lm.log if c == "label_logprobs"]
    assert labels == ([2 * new_responses] if new_responses else [])
    assert tree.root.visits == 6 and ctx.stats.iterations == 6
    assert [c.visits for c in tree.root.children] == [2.0, 2.0, 2.0]


@pytest.mark.parametrize("k", [2, 4])
def test_several_leaves_still_rewind_to_the_good_answer(k: int) -> None:
    lm = ScriptedLM(choice_table({"bad.": 0.7, "good.": 0.3}))

    def judge(text: str) -> float:
        return -1.0 if "bad" in text else 1.0 if "good" in text else 0.0

    engine = RainEngine(backend=lm, evaluator=ScriptedEvaluator(judge), embedder=ScriptedEmbedder())
    cfg = RainConfig.paper(
        num_candidates=3, T=8, min_new_iterations=4, T_m=3, max_new_tokens=8, leaves_per_round=k
    )
    result = engine.generate("say something", config=cfg)
    assert result.text == "good."
    assert result.stats.overrides >= 1


def test_a_round_never_passes_the_iteration_budget() -> None:
    engine, _ = _scripted_engine()
    cfg = _config(SCENARIOS["no-mechanisms"], leaves_per_round=4, max_iterations=6)
    result = engine.generate("tell me about your day", config=cfg)
    assert result.stats.iterations == 6
    assert result.stats.budget_exhausted == "max_iterations"


def test_leaves_per_round_is_validated() -> None:
    from shared_core.errors import RainConfigError

    with pytest.raises(RainConfigError, match="leaves_per_round"):
        RainConfig(leaves_per_round=0)


def test_several_leaves_share_forward_passes_on_a_real_backend(tiny_engine) -> None:
    work = tiny_engine.backend.work
    per_iteration = {}
    for k in (1, 4):
        before = (work.forward_calls, work.extra.get("merged_passes", 0))
        cfg = _config(TINY_SCENARIO, leaves_per_round=k, T=8, min_new_iterations=8)
        result = tiny_engine.generate("Describe a rainy day.", rubric="positive", config=cfg)
        passes = work.forward_calls - before[0]
        per_iteration[k] = passes / result.stats.iterations
        if k > 1:
            assert work.extra.get("merged_passes", 0) > before[1]
    # Four leaves per round: their expansions, rollouts and judgements share passes.
    assert per_iteration[4] < 0.8 * per_iteration[1]  # measured: 0.61
