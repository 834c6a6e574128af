"""RAIN's search: select → expand → simulate → evaluate → back up → commit.

Each step is a small function over the plain tree (``tree.py``); the model is
reached only through the protocol of :class:`~shared_core.models.protocol.LanguageModel`
(top tokens, sampled continuations) and the judge only through
:class:`~shared_core.evaluation.EvalSession`.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shared_core.config import RainConfig
from shared_core.embeddings import Embedder
from shared_core.errors import RainCancelled
from shared_core.evaluation import EvalSession, Judgement
from shared_core.models.protocol import Grammar, LanguageModel, SampleRequest, TopTokensRequest
from shared_core.tree import Node, Tree, path_tokens

__all__ = [
    "Commit",
    "RainCancelled",
    "SearchContext",
    "SearchStats",
    "backup",
    "choose_commit",
    "dynamic_addition",
    "expand",
    "puct_score",
    "run_search",
    "select",
    "select_child",
    "should_commit",
    "similarity_update",
    "simulate",
]

EventHandler = Callable[[str, dict[str, Any]], None]


@dataclass
class SearchStats:
    """What the search did for one call (reported in response metadata)."""

    iterations: int = 0
    commits: int = 0
    rewinds: int = 0
    """Iterations that left the previously explored branch to try another."""
    overrides: int = 0
    """Commits that differ from what greedy decoding would have chosen."""
    similarity_updates: int = 0
    dynamic_additions: int = 0
    nodes: int = 1
    final_score: float | None = None
    """Self-evaluation score of the final answer, in [-1, 1]."""
    budget_exhausted: str | None = None
    """Which budget ran out (max_time_s, max_iterations, max_nodes), if any."""
    breakdown_s: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(
            ("expansion", "simulation", "evaluation", "embeddings", "commit"), 0.0
        )
    )

    def to_dict(self) -> dict[str, Any]:
        return {
            "iterations": self.iterations,
            "commits": self.commits,
            "rewinds": self.rewinds,
            "overrides": self.overrides,
            "similarity_updates": self.similarity_updates,
            "dynamic_additions": self.dynamic_additions,
            "nodes": self.nodes,
            "final_score": self.final_score,
            "budget_exhausted": self.budget_exhausted,
            "breakdown_s": {k: round(v, 4) for k, v in self.breakdown_s.items()},
        }


@dataclass
class Commit:
    """One committed token set, as the stream yields it."""

    index: int
    token_ids: list[int]
    text: str
    """Text this commit adds to the answer (held back near a possible stop string)."""
    iterations: int
    """Search iterations spent on the root this set was chosen from."""
    visits: float
    value: float
    greedy_agrees: bool
    """Whether greedy decoding would have chosen the same set."""
    candidates: list[dict[str, Any]]
    """The root's children when the commit was decided: text, p, n, v, greedy."""
    forced: str | None = None
    """Why the commit skipped the normal rule (a budget), if it did."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "text": self.text,
            "token_ids": self.token_ids,
            "iterations": self.iterations,
            "visits": round(self.visits, 4),
            "value": round(self.value, 4),
            "greedy_agrees": self.greedy_agrees,
            "differs_from_greedy": not self.greedy_agrees,
            "candidates": self.candidates,
            "forced": self.forced,
        }


@dataclass
class SearchContext:
    """Everything one request's search needs; nothing in it is shared state."""

    backend: LanguageModel
    session: EvalSession
    config: RainConfig
    prompt_ids: list[int]
    embedder: Embedder | None = None
    on_event: EventHandler | None = None
    cancel: threading.Event | None = None
    grammar: Grammar | None = None
    """Restricts every token the search picks (e.g. to JSON of a schema)."""
    committed: list[int] = field(default_factory=list)
    stats: SearchStats = field(default_factory=SearchStats)
    rng: np.random.Generator = field(init=False)
    started: float = field(default_factory=time.perf_counter)
    finish_reason: str | None = None
    judgements: dict[tuple[int, ...], Judgement] = field(default_factory=dict)
    """Scores by response, so an identical rollout is not judged twice (reference code)."""
    _last_path: list[Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.config.seed)

    @property
    def reuse(self) -> bool:
        return self.config.reuse_cache

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise RainCancelled("the RAIN search was cancelled by its caller")

    def seed(self) -> int:
        """A fresh seed for one model call, from the search's own generator."""
        return int(self.rng.integers(0, 2**63 - 1))

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        if self.on_event is not None:
            self.on_event(kind, data)

    def timed(self, key: str) -> _Timer:
        return _Timer(self.stats.breakdown_s, key)

    def room(self, path: list[Node]) -> int:
        """Tokens the answer may still take after ``path``."""
        return self.config.max_new_tokens - len(self.committed) - len(path_tokens(path))


class _Timer:
    def __init__(self, sink: dict[str, float], key: str) -> None:
        self.sink, self.key = sink, key

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.sink[self.key] = self.sink.get(self.key, 0.0) + time.perf_counter() - self.t0


# --- 1. select ----------------------------------------------------------------------------


def puct_score(tree: Tree, parent: Node, child: Node, config: RainConfig, is_root: bool) -> float:
    """v(child) + c · p(child) · sqrt(n(parent)) / (1 + n(child)) (paper Eq. 1).

    Values are min-max normalised to [0, 1]; an unvisited child counts
    ``unvisited_value``; at the root the prior is mixed with a uniform.
    """
    q = tree.normalise(child.value) if child.visits > 0 else config.unvisited_value
    prior = child.prior
    if is_root:
        w = config.root_prior_mix
        prior = (1.0 - w) * prior + w / len(parent.children)
    return q + config.c * prior * math.sqrt(parent.visits) / (1.0 + child.visits)


def select_child(tree: Tree, node: Node, config: RainConfig) -> Node:
    """The child of ``node`` with the highest PUCT score (first on ties: likelier set)."""
    scores = [puct_score(tree, node, ch, config, node is tree.root) for ch in node.children]
    return node.children[int(np.argmax(scores))]


def select(tree: Tree, config: RainConfig) -> list[Node]:
    """Walk from the root by PUCT to a leaf (or a terminal node); returns the path."""
    path = [tree.root]
    node = tree.root
    while node.children and not node.terminal:
        node = select_child(tree, node, config)
        path.append(node)
    return path


# --- 2. expand ----------------------------------------------------------------------------


def _make_node(ctx: SearchContext, path: list[Node], tokens: list[int], logp: float) -> Node:
    stop_ids = ctx.backend.stop_token_ids
    node = Node(tuple(tokens), raw_prob=math.exp(logp))
    ends = bool(tokens) and tokens[-1] in stop_ids
    full = len(ctx.committed) + len(path_tokens(path)) + len(tokens) >= ctx.config.max_new_tokens
    node.terminal = ends or full or _hits_stop_string(ctx, path_tokens(path) + tokens)
    return node


def _hits_stop_string(ctx: SearchContext, uncommitted: list[int]) -> bool:
    if not ctx.config.stop:
        return False
    text = ctx.backend.decode(ctx.committed + uncommitted)
    return any(s in text for s in ctx.config.stop)


def _candidate_sets(
    ctx: SearchContext, path: list[Node], length: int, n: int, greedy: bool, exclude: set
) -> list[tuple[list[int], float, bool]]:
    """Distinct token sets after ``path``: (tokens, log-prob, is_greedy)."""
    ctx.check_cancel()  # before every model call: after a cancel no new one starts
    prefix = tuple(ctx.prompt_ids + ctx.committed + path_tokens(path))
    start = len(ctx.prompt_ids)
    if length == 1:
        # One-token sets: the top-k tokens of the next-token distribution.
        request = TopTokensRequest(
            prefix, n + len(exclude), grammar=ctx.grammar, response_start=start, reuse=ctx.reuse
        )
        (top,) = ctx.backend.top_tokens([request], cancel=ctx.cancel)
        out = []
        for rank, (tok, logp) in enumerate(zip(top.token_ids, top.logprobs, strict=True)):
            if (tok,) in exclude:
                continue
            out.append(([tok], logp, greedy and rank == 0))
            if len(out) == n:
                break
        return out
    # Longer sets: one greedy run plus samples from the top-k distribution.
    cfg = ctx.config
    sample = SampleRequest(
        prefix,
        n,
        length,
        temperature=cfg.expansion_temperature,
        top_k=cfg.expansion_top_k,
        seed=ctx.seed(),
        greedy_rows=1 if greedy else 0,
        grammar=ctx.grammar,
        response_start=start,
        reuse=ctx.reuse,
    )
    (conts,) = ctx.backend.sample([sample], cancel=ctx.cancel)
    out, seen = [], set(exclude)
    for row, cont in enumerate(conts):
        tokens = tuple(cont.token_ids)
        if not tokens or tokens in seen:
            continue
        seen.add(tokens)
        out.append((list(tokens), float(sum(cont.logprobs)), greedy and row == 0))
    return out


def expand(ctx: SearchContext, path: list[Node]) -> list[Node]:
    """Add candidate token sets under the leaf; set length grows with depth."""
    leaf = path[-1]
    length = min(ctx.config.token_set_length(leaf.depth), max(ctx.room(path), 1))
    with ctx.timed("expansion"):
        sets = _candidate_sets(ctx, path, length, ctx.config.num_candidates, True, set())
    sets.sort(key=lambda s: -s[1])  # by prior, so PUCT ties favour the likelier set
    children = []
    for tokens, logp, is_greedy in sets:
        child = _make_node(ctx, path, tokens, logp)
        child.is_greedy = is_greedy
        children.append(child)
    leaf.add_children(children)
    ctx.stats.nodes += len(children)
    return children


# --- 3. simulate + evaluate ------------------------------------------------------------


def simulate(ctx: SearchContext, path: list[Node]) -> list[int]:
    """Extend the end of ``path`` with sampled tokens to the end of the current clause."""
    cfg = ctx.config
    leaf = path[-1]
    tokens = ctx.committed + path_tokens(path)
    budget = min(cfg.simulation_max_tokens, ctx.room(path))
    if not cfg.simulate or leaf.terminal or budget <= 0:
        return []
    if tokens and _ends_clause(ctx, list(leaf.token_ids) or tokens[-1:]):
        # The clause under way ended inside this token set (or just before it):
        # the judge already sees a complete clause.
        return []
    ctx.check_cancel()
    with ctx.timed("simulation"):
        request = SampleRequest(
            tuple(ctx.prompt_ids + tokens),
            1,
            budget,
            temperature=cfg.simulation_temperature,
            top_k=cfg.simulation_top_k,
            seed=ctx.seed(),
            stop_after=cfg.clause_delimiters,
            grammar=ctx.grammar,
            response_start=len(ctx.prompt_ids),
            reuse=ctx.reuse,
        )
        ((cont,),) = ctx.backend.sample([request], cancel=ctx.cancel)
    return cont.token_ids


def _ends_clause(ctx: SearchContext, tokens: list[int]) -> bool:
    """Whether one of ``tokens``, read alone, contains a clause delimiter."""
    delimiters = ctx.config.clause_delimiters
    return any(d in ctx.backend.decode([t]) for t in tokens for d in delimiters)


def _response(ctx: SearchContext, tokens: list[int]) -> list[int]:
    stop = ctx.backend.stop_token_ids
    out = []
    for t in tokens:
        if t in stop:
            break
        out.append(t)
    return out


def evaluate(ctx: SearchContext, path: list[Node], rollout: list[int]) -> Judgement:
    """Self-evaluate committed + path + rollout by the rubric."""
    response = _response(ctx, ctx.committed + path_tokens(path) + rollout)
    key = tuple(response)
    found = ctx.judgements.get(key)
    if found is None:
        ctx.check_cancel()
        with ctx.timed("evaluation"):
            found = ctx.session.score(response, ctx.backend.decode(response))
        ctx.judgements[key] = found
    return found


# --- 4. back up ---------------------------------------------------------------------------


def backup(tree: Tree, path: list[Node], score: float) -> None:
    """Every node on the path: n += 1 and v moves to the score as a running mean (γ = 1)."""
    for node in path:
        node.value = (node.value * node.visits + score) / (node.visits + 1.0)
        node.visits += 1.0
        tree.observe(node.value)


# --- 5. similarity update -----------------------------------------------------------------


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else 0.0


def similarity_update(
    ctx: SearchContext, tree: Tree, path: list[Node], rollout: list[int], score: float
) -> int:
    """Siblings similar to a node on the path learn from its score (paper Eq. 3).

    v_X ← (v_X·n_X + γ_s·sim·s) / (n_X + γ_s·sim),  n_X ← n_X + γ_s·sim
    for every sibling X of Y with sim(e_X, e_Y) above the threshold.
    Returns how many siblings were updated.
    """
    cfg = ctx.config
    nodes = path[1:]
    if not nodes or ctx.embedder is None:
        return 0
    tail = list(rollout)
    texts = []
    for i in range(len(nodes)):
        ids = [t for n in nodes[i:] for t in n.token_ids] + tail
        texts.append(ctx.backend.decode(_response(ctx, ids)))
    with ctx.timed("embeddings"):
        vectors = ctx.embedder.encode(texts)
    for node, vec in zip(nodes, vectors, strict=True):
        node.update_embedding(vec)
    updated = 0
    for node in nodes:
        assert node.parent is not None and node.embedding is not None
        for sibling in node.parent.children:
            if sibling is node or sibling.embedding is None:
                continue
            sim = _cosine(sibling.embedding, node.embedding)
            if sim > cfg.similarity_threshold:
                w = cfg.gamma_s * sim
                sibling.value = (sibling.value * sibling.visits + w * score) / (sibling.visits + w)
                sibling.visits += w
                tree.observe(sibling.value)
                updated += 1
    return updated


# --- 6. dynamic node addition ---------------------------------------------------------------


def needs_more_children(node: Node, config: RainConfig) -> bool:
    """Children look alike (small embedding variance) and all score low."""
    kids = node.children
    if not kids or node.terminal or len(kids) >= config.dynamic_max_children:
        return False
    if any(k.embedding is None or k.visits <= 0 for k in kids):
        return False
    if max(k.value for k in kids) >= config.dynamic_value_threshold:
        return False
    vectors = [k.embedding for k in kids if k.embedding is not None]
    spread = float(np.linalg.norm(np.var(np.stack(vectors), axis=0)))
    length = max(len(k.token_ids) for k in kids)
    return spread < config.dynamic_variance_factor * length


def dynamic_addition(ctx: SearchContext, path: list[Node]) -> int:
    """Add candidates to nodes on the path that need them; returns how many were added."""
    added = 0
    for depth, node in enumerate(path):
        if not needs_more_children(node, ctx.config):
            continue
        length = max(len(k.token_ids) for k in node.children)
        exclude = {k.token_ids for k in node.children}
        with ctx.timed("expansion"):
            count = ctx.config.dynamic_addition_count
            # Over-sample multi-token sets: duplicates of existing children are dropped.
            n = count if length == 1 else 2 * count
            sets = _candidate_sets(ctx, path[: depth + 1], length, n, False, exclude)[:count]
        new = [_make_node(ctx, path[: depth + 1], t, lp) for t, lp, _ in sets]
        node.add_children(new)
        ctx.stats.nodes += len(new)
        added += len(new)
    return added


# --- one iteration ---------------------------------------------------------------------------


def iterate(ctx: SearchContext, tree: Tree) -> Judgement:
    """One inner-loop iteration of RAIN."""
    ctx.check_cancel()
    path = select(tree, ctx.config)
    leaf = path[-1]
    # The root always grows children: the next commit is chosen among them.
    ripe = leaf is tree.root or leaf.visits >= ctx.config.expand_after_visits
    if leaf.is_leaf and not leaf.terminal and ripe and expand(ctx, path):
        # Selection takes one more step, into the new children (classic MCTS:
        # simulate from a new node), so this evaluation already scores a
        # candidate: with greedy_early_commit a good greedy set is committed
        # after one iteration instead of two.
        path.append(select_child(tree, leaf, ctx.config))
    _count_rewind(ctx, path)
    rollout = simulate(ctx, path)
    judgement = evaluate(ctx, path, rollout)
    backup(tree, path, judgement.score)
    if ctx.config.similarity_update:
        ctx.stats.similarity_updates += similarity_update(ctx, tree, path, rollout, judgement.score)
    if ctx.config.dynamic_addition:
        ctx.stats.dynamic_additions += dynamic_addition(ctx, path)
    ctx.stats.iterations += 1
    ctx.emit(
        "iteration",
        {"iteration": ctx.stats.iterations, "depth": len(path) - 1, "score": judgement.score},
    )
    return judgement


def _count_rewind(ctx: SearchContext, path: list[Node]) -> None:
    last = ctx._last_path
    # A rewind: this iteration does not continue down the branch explored last.
    diverged = any(a is not b for a, b in zip(last[1:], path[1:], strict=False))
    if diverged:
        ctx.stats.rewinds += 1
        ctx.emit("rewind", {"iteration": ctx.stats.iterations + 1, "depth": len(path) - 1})
    ctx._last_path = path


# --- the commit rule -------------------------------------------------------------------------


def choose_commit(root: Node) -> Node:
    """The most visited child; ties go to the higher value, then the higher prior."""
    return max(root.children, key=lambda c: (c.visits, c.value, c.prior))


def should_commit(root: Node, new_iterations: int, config: RainConfig) -> bool:
    """T visits with at least min_new_iterations, or T_m iterations and best value ≥ V."""
    if not root.children:
        return False
    if root.visits >= config.T and new_iterations >= min(config.min_new_iterations, config.T):
        return True
    best = choose_commit(root)
    return new_iterations >= config.T_m and best.visits > 0 and best.value >= config.V


def _greedy_ready(root: Node, config: RainConfig) -> Node | None:
    if not config.greedy_early_commit:
        return None
    for child in root.children:
        if child.is_greedy and child.visits >= 1 and child.value >= config.V:
            return child
    return None


def _budget_left(ctx: SearchContext) -> str | None:
    cfg = ctx.config
    if cfg.max_time_s is not None and time.perf_counter() - ctx.started >= cfg.max_time_s:
        return "max_time_s"
    if cfg.max_iterations is not None and ctx.stats.iterations >= cfg.max_iterations:
        return "max_iterations"
    if cfg.max_nodes is not None and ctx.stats.nodes >= cfg.max_nodes:
        return "max_nodes"
    return None


def _describe(ctx: SearchContext, root: Node) -> list[dict[str, Any]]:
    return [
        {
            "text": ctx.backend.decode(c.token_ids),
            "token_ids": list(c.token_ids),
            "p": round(c.prior, 4),
            "n": round(c.visits, 3),
            "v": round(c.value, 4),
            "greedy": c.is_greedy,
        }
        for c in root.children
    ]


# --- the outer loop ----------------------------------------------------------------------------


def run_search(ctx: SearchContext) -> Iterator[tuple[Commit, list[int]]]:
    """Search and commit token sets until the answer ends.

    Yields each commit with the token ids of the committed set; the caller
    appends them to ``ctx.committed``, handles stop tokens and stop strings, and
    sets ``ctx.finish_reason`` when the answer ends (the engine does this).
    """
    tree = Tree()
    index = 0
    while ctx.finish_reason is None:
        new_iterations = 0
        forced = None
        chosen: Node | None = None
        while True:
            forced = _budget_left(ctx)
            if forced is not None:
                ctx.stats.budget_exhausted = forced
                break
            iterate(ctx, tree)
            new_iterations += 1
            chosen = _greedy_ready(tree.root, ctx.config)
            if chosen is not None or should_commit(tree.root, new_iterations, ctx.config):
                break
        if forced is not None and not tree.root.children:
            break  # nothing searched on this root: the engine finishes greedily
        if chosen is None:
            chosen = choose_commit(tree.root)
        with ctx.timed("commit"):
            commit = Commit(
                index=index,
                token_ids=list(chosen.token_ids),
                text="",
                iterations=new_iterations,
                visits=chosen.visits,
                value=chosen.value,
                greedy_agrees=chosen.is_greedy,
                candidates=_describe(ctx, tree.root),
                forced=forced,
            )
            chosen.parent = None
            tree.root = chosen  # its subtree is kept for the next commit
        index += 1
        ctx.stats.commits += 1
        if not chosen.is_greedy:
            ctx.stats.overrides += 1
        ctx._last_path = []
        yield commit, list(chosen.token_ids)
        if forced is not None:
            break
