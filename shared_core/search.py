"""RAIN's search: select → expand → simulate → evaluate → back up → commit.

Each step is a small function over the plain tree (``tree.py``); the model is
reached only through the protocol of :class:`~shared_core.models.protocol.LanguageModel`
(top tokens, sampled continuations) and the judge only through
:class:`~shared_core.evaluation.EvalSession`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shared_core.config import RainConfig
from shared_core.embeddings import Embedder
from shared_core.errors import RainCancelled
from shared_core.evaluation import EvalSession, Judgement
from shared_core.models.protocol import (
    Continuation,
    Grammar,
    LanguageModel,
    SampleRequest,
    TopTokens,
    TopTokensRequest,
)
from shared_core.request import RainRequest, until_stop
from shared_core.tree import Node, Tree, path_tokens

__all__ = [
    "Commit",
    "RainCancelled",
    "SearchContext",
    "SearchInputs",
    "SearchState",
    "SearchStats",
    "VirtualLoss",
    "backup",
    "choose_commit",
    "commit",
    "dynamic_addition",
    "evaluate",
    "evaluate_many",
    "expand",
    "expand_many",
    "finish_greedily",
    "iterate",
    "judge_answer",
    "puct_score",
    "run_round",
    "run_search",
    "search_root",
    "select",
    "select_child",
    "select_leaves",
    "select_walks",
    "should_commit",
    "similarity_update",
    "simulate",
    "simulate_many",
]

EventHandler = Callable[[str, dict[str, Any]], None]

_SENTENCE_END = (".", "!", "?", "\n")
"""Where the greedy finish after a spent budget stops: a clean end of sentence."""


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
    greedy_score: float | None = None
    """With ``final_check``: the self-evaluation of the greedy answer."""
    kept_greedy: bool = False
    """With ``final_check``: the greedy answer scored higher and was returned instead."""
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
            "greedy_score": self.greedy_score,
            "kept_greedy": self.kept_greedy,
            "budget_exhausted": self.budget_exhausted,
            "breakdown_s": {k: round(v, 4) for k, v in self.breakdown_s.items()},
        }


@dataclass(frozen=True)
class Commit:
    """One committed token set, as the stream yields it (built by :func:`_record` only)."""

    index: int
    token_ids: tuple[int, ...]
    text: str
    """Text this commit adds to the answer (held back near a possible stop string)."""
    iterations: int
    """Search iterations spent on the root this set was chosen from."""
    visits: float
    value: float
    greedy_agrees: bool
    """Whether greedy decoding would have chosen the same set."""
    candidates: tuple[dict[str, Any], ...]
    """The root's children when the commit was decided: text, p, n, v, greedy."""
    forced: str | None = None
    """Why the commit skipped the normal rule (a budget), if it did."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "text": self.text,
            "token_ids": list(self.token_ids),
            "iterations": self.iterations,
            "visits": round(self.visits, 4),
            "value": round(self.value, 4),
            "greedy_agrees": self.greedy_agrees,
            "differs_from_greedy": not self.greedy_agrees,
            "candidates": [dict(c) for c in self.candidates],
            "forced": self.forced,
        }


@dataclass(frozen=True)
class SearchInputs:
    """What one search is given; the search never changes it."""

    model: LanguageModel
    session: EvalSession
    """The judge, for this request and rubric."""
    config: RainConfig
    embedder: Embedder | None = None
    """Sentence embeddings, for similarity updates and dynamic addition."""
    grammar: Grammar | None = None
    """Restricts every token the search picks (e.g. to JSON of a schema)."""
    on_event: EventHandler | None = None


@dataclass
class SearchState:
    """What the search changes as it runs; one per request, never shared."""

    rng: np.random.Generator
    """Draws one seed per model call: a fixed config seed gives a fixed search."""
    stats: SearchStats = field(default_factory=SearchStats)
    started: float = field(default_factory=time.perf_counter)
    judgements: dict[tuple[int, ...], Judgement] = field(default_factory=dict)
    """Scores by response, so an identical rollout is not judged twice (reference code)."""
    last_path: list[Node] = field(default_factory=list)
    commits: list[Commit] = field(default_factory=list)
    """Every commit so far (their dicts are the trace)."""


class SearchContext:
    """One request's search: its inputs, its request (the committed answer, the rules that
    end it, cancellation), and its mutable state."""

    def __init__(self, inputs: SearchInputs, request: RainRequest) -> None:
        self.inputs = inputs
        self.request = request
        self.state = SearchState(rng=np.random.default_rng(inputs.config.seed))

    # Short names for what every step reads.
    @property
    def model(self) -> LanguageModel:
        return self.inputs.model

    @property
    def config(self) -> RainConfig:
        return self.inputs.config

    @property
    def stats(self) -> SearchStats:
        return self.state.stats

    @property
    def reuse(self) -> bool:
        return self.config.reuse_cache

    def check_cancel(self) -> None:
        self.request.check_cancel()

    def seed(self) -> int:
        """A fresh seed for one model call, from the search's own generator."""
        return int(self.state.rng.integers(0, 2**63 - 1))

    def prefix(self, path: list[Node], extra: list[int] | None = None) -> tuple[int, ...]:
        """The model's input at the end of ``path``: prompt + committed + path (+ extra)."""
        req = self.request
        return (*req.prompt_ids, *req.committed, *path_tokens(path), *(extra or ()))

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        if self.inputs.on_event is not None:
            self.inputs.on_event(kind, data)

    def timed(self, key: str) -> _Timer:
        return _Timer(self.stats.breakdown_s, key)

    def room(self, path: list[Node]) -> int:
        """Tokens the answer may still take after ``path``."""
        return self.request.room(len(path_tokens(path)))


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
    # Length-normalised: the geometric mean of the token probabilities, so a set of 8
    # or 10 tokens is not ~99 % greedy by construction (issue 13).
    per = logp / max(len(tokens), 1) if ctx.config.prior_length_norm else logp
    node = Node(tuple(tokens), raw_prob=math.exp(per))
    # Terminal: the answer's own end rules (stop token, stop string, length) end it here.
    node.terminal = ctx.request.end_reason(path_tokens(path) + tokens) is not None
    return node


_SetAsk = tuple[list[Node], int, int, bool, set]
"""What one expansion asks for: (path, set length, how many sets, greedy row, excluded sets)."""


def _set_request(ctx: SearchContext, ask: _SetAsk) -> TopTokensRequest | SampleRequest:
    """The model request of one expansion (a multi-token one draws its seed here)."""
    path, length, n, greedy, exclude = ask
    prefix = ctx.prefix(path)
    start = len(ctx.request.prompt_ids)
    grammar = ctx.inputs.grammar
    if length == 1:
        # One-token sets: the top-k tokens of the next-token distribution.
        return TopTokensRequest(
            prefix, n + len(exclude), grammar=grammar, response_start=start, reuse=ctx.reuse
        )
    # Longer sets: one greedy run plus samples from the top-k distribution.
    cfg = ctx.config
    return SampleRequest(
        prefix,
        n,
        length,
        temperature=cfg.expansion_temperature,
        top_k=cfg.expansion_top_k,
        seed=ctx.seed(),
        greedy_rows=1 if greedy else 0,
        grammar=grammar,
        response_start=start,
        reuse=ctx.reuse,
    )


def _read_top(top: TopTokens, ask: _SetAsk) -> list[tuple[list[int], float, bool]]:
    _, _, n, greedy, exclude = ask
    out = []
    for rank, (tok, logp) in enumerate(zip(top.token_ids, top.logprobs, strict=True)):
        if (tok,) in exclude:
            continue
        out.append(([tok], logp, greedy and rank == 0))
        if len(out) == n:
            break
    return out


def _read_samples(conts: list[Continuation], ask: _SetAsk) -> list[tuple[list[int], float, bool]]:
    _, _, _, greedy, exclude = ask
    out, seen = [], set(exclude)
    for row, cont in enumerate(conts):
        tokens = tuple(cont.token_ids)
        if not tokens or tokens in seen:
            continue
        seen.add(tokens)
        out.append((list(tokens), float(sum(cont.logprobs)), greedy and row == 0))
    return out


def _candidate_sets_many(
    ctx: SearchContext, asks: list[_SetAsk]
) -> list[list[tuple[list[int], float, bool]]]:
    """Distinct token sets for several expansions: one ``top_tokens`` call for the
    one-token ones and one ``sample`` call for the rest, each carrying all of them."""
    ctx.check_cancel()  # before every model call: after a cancel no new one starts
    requests = [_set_request(ctx, ask) for ask in asks]
    cancel = ctx.request.cancel
    tops = [(i, r) for i, r in enumerate(requests) if isinstance(r, TopTokensRequest)]
    samples = [(i, r) for i, r in enumerate(requests) if isinstance(r, SampleRequest)]
    out: list[list[tuple[list[int], float, bool]]] = [[] for _ in asks]
    if tops:
        found = ctx.model.top_tokens([r for _, r in tops], cancel=cancel)
        for (i, _), top in zip(tops, found, strict=True):
            out[i] = _read_top(top, asks[i])
    if samples:
        if tops:
            ctx.check_cancel()
        rows = ctx.model.sample([r for _, r in samples], cancel=cancel)
        for (i, _), conts in zip(samples, rows, strict=True):
            out[i] = _read_samples(conts, asks[i])
    return out


def _candidate_sets(
    ctx: SearchContext, path: list[Node], length: int, n: int, greedy: bool, exclude: set
) -> list[tuple[list[int], float, bool]]:
    """Distinct token sets after ``path``: (tokens, log-prob, is_greedy)."""
    return _candidate_sets_many(ctx, [(path, length, n, greedy, exclude)])[0]


def expand(ctx: SearchContext, path: list[Node]) -> list[Node]:
    """Add candidate token sets under the leaf; set length grows with depth."""
    return expand_many(ctx, [path])[0]


def expand_many(ctx: SearchContext, paths: list[list[Node]]) -> list[list[Node]]:
    """:func:`expand` for several leaves, their model calls shared."""
    asks: list[_SetAsk] = []
    for path in paths:
        length = min(ctx.config.token_set_length(path[-1].depth), max(ctx.room(path), 1))
        asks.append((path, length, ctx.config.num_candidates, True, set()))
    with ctx.timed("expansion"):
        found = _candidate_sets_many(ctx, asks)
    out = []
    for path, sets in zip(paths, found, strict=True):
        sets.sort(key=lambda s: -s[1])  # by prior, so PUCT ties favour the likelier set
        children = []
        for tokens, logp, is_greedy in sets:
            child = _make_node(ctx, path, tokens, logp)
            child.is_greedy = is_greedy
            children.append(child)
        path[-1].add_children(children)
        ctx.stats.nodes += len(children)
        out.append(children)
    return out


# --- 3. simulate + evaluate ------------------------------------------------------------


def simulate(ctx: SearchContext, path: list[Node]) -> list[int]:
    """Extend the end of ``path`` with sampled tokens to the end of the current clause."""
    return simulate_many(ctx, [path])[0]


def _rollout_request(ctx: SearchContext, path: list[Node]) -> SampleRequest | None:
    """The rollout after ``path``, or ``None`` when it needs none (a seed is drawn here)."""
    cfg = ctx.config
    leaf = path[-1]
    budget = min(cfg.simulation_max_tokens, ctx.room(path))
    if not cfg.simulate or leaf.terminal or budget <= 0:
        return None
    last = list(leaf.token_ids) or ctx.request.committed[-1:]
    if last and _ends_clause(ctx, last):
        # The clause under way ended inside this token set (or just before it):
        # the judge already sees a complete clause.
        return None
    return SampleRequest(
        ctx.prefix(path),
        1,
        budget,
        temperature=cfg.simulation_temperature,
        top_k=cfg.simulation_top_k,
        seed=ctx.seed(),
        stop_after=cfg.clause_delimiters,
        grammar=ctx.inputs.grammar,
        response_start=len(ctx.request.prompt_ids),
        reuse=ctx.reuse,
    )


def simulate_many(ctx: SearchContext, paths: list[list[Node]]) -> list[list[int]]:
    """:func:`simulate` for several paths: every rollout in one ``sample`` call."""
    asks = [_rollout_request(ctx, path) for path in paths]
    wanted = [(i, a) for i, a in enumerate(asks) if a is not None]
    out: list[list[int]] = [[] for _ in paths]
    if not wanted:
        return out
    ctx.check_cancel()
    with ctx.timed("simulation"):
        rows = ctx.model.sample([a for _, a in wanted], cancel=ctx.request.cancel)
    for (i, _), (cont,) in zip(wanted, rows, strict=True):
        out[i] = cont.token_ids
    return out


def _ends_clause(ctx: SearchContext, tokens: list[int]) -> bool:
    """Whether one of ``tokens``, read alone, contains a clause delimiter."""
    delimiters = ctx.config.clause_delimiters
    return any(d in ctx.model.decode([t]) for t in tokens for d in delimiters)


def evaluate(ctx: SearchContext, path: list[Node], rollout: list[int]) -> Judgement:
    """Self-evaluate committed + path + rollout by the rubric."""
    return evaluate_many(ctx, [path], [rollout])[0]


def evaluate_many(
    ctx: SearchContext, paths: list[list[Node]], rollouts: list[list[int]]
) -> list[Judgement]:
    """:func:`evaluate` for several paths: the responses not judged before, in one batch."""
    keys = [
        tuple(ctx.request.answer(path_tokens(p) + r)) for p, r in zip(paths, rollouts, strict=True)
    ]
    known = ctx.state.judgements
    new = list(dict.fromkeys(k for k in keys if k not in known))  # distinct, in order
    if new:
        ctx.check_cancel()
        with ctx.timed("evaluation"):
            found = ctx.inputs.session.score_many([(k, ctx.model.decode(k)) for k in new])
        known.update(zip(new, found, strict=True))
    return [known[k] for k in keys]


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
    embedder = ctx.inputs.embedder
    if not nodes or embedder is None:
        return 0
    tail = list(rollout)
    stops = ctx.model.stop_token_ids
    texts = []
    for i in range(len(nodes)):
        ids = [t for n in nodes[i:] for t in n.token_ids] + tail
        texts.append(ctx.model.decode(until_stop(ids, stops)))
    with ctx.timed("embeddings"):
        vectors = embedder.encode(texts)
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


# --- one round: k leaves ------------------------------------------------------------------


class VirtualLoss:
    """Pending visits of a round: a selected path's nodes count one more visit at once,
    before its score is known, so the round's next walk looks elsewhere; :meth:`undo`
    puts every node back exactly before the real scores are backed up.

    A pending visit counts with the value selection already credits the node with
    (its mean, or ``unvisited_value`` when it has no visit yet): it shrinks the
    node's exploration bonus and nothing else. Counting it as a loss (score -1), the
    textbook choice for big trees, sent every second leaf of a round to a child the
    judge had already scored -1 when the root had two likely children, and handed
    that child the most visits, which is what the commit rule takes.
    """

    def __init__(self, tree: Tree, config: RainConfig) -> None:
        self.tree = tree
        self.config = config
        self._saved: dict[Node, tuple[float, float]] = {}

    def add(self, path: list[Node]) -> None:
        tree = self.tree
        unvisited = tree.min_value + self.config.unvisited_value * (tree.max_value - tree.min_value)
        for node in path:
            self._saved.setdefault(node, (node.visits, node.value))
            if node.visits <= 0:
                node.value = unvisited  # normalises to unvisited_value: q unchanged
            node.visits += 1.0

    def visits(self, node: Node) -> float:
        """The node's visit count without the pending ones."""
        return self._saved.get(node, (node.visits, 0.0))[0]

    def undo(self) -> None:
        for node, (visits, value) in self._saved.items():
            node.visits, node.value = visits, value
        self._saved.clear()


def select_walks(
    tree: Tree,
    config: RainConfig,
    k: int,
    pending: VirtualLoss,
    free: Callable[[list[Node]], bool] | None = None,
    most: int | None = None,
) -> list[list[Node]]:
    """``k`` walks from the root, each leaving a pending visit on its path for the
    walks after it; returns every walk's path, in order (several may end at one leaf).

    With ``free``: a walk to a leaf that needs no model call (``free(path)``: a
    terminal leaf whose answer was judged before) does not take one of the ``k``
    places; up to ``k`` such walks join the round on top (at most ``most`` walks in
    all). They cost no forward pass, so they need not crowd out a leaf that does.
    """
    most = 2 * k if most is None else min(most, 2 * k)
    walks: list[list[Node]] = []
    work = spare = 0
    while work < k and len(walks) < most:
        path = select(tree, config)
        walks.append(path)
        if free is not None and free(path) and spare < k:
            spare += 1
        else:
            work += 1
        if work < k:
            pending.add(path)
    return walks


def _distinct(walks: list[list[Node]]) -> list[list[Node]]:
    """The first walk to each leaf."""
    seen: set[int] = set()
    out = []
    for path in walks:
        if id(path[-1]) not in seen:
            seen.add(id(path[-1]))
            out.append(path)
    return out


def select_leaves(tree: Tree, config: RainConfig, k: int, pending: VirtualLoss) -> list[list[Node]]:
    """The distinct leaves ``k`` walks reach (:func:`select_walks`), first walk first.

    A walk that reaches a leaf already taken is not retried: it only adds its pending
    visit. So a round is as wide as the tree is uncertain: forcing ``k`` distinct
    leaves out of a tree with two likely branches spent the spare walks on the branch
    the judge had rejected (and gave it the visits the commit rule counts).
    """
    return _distinct(select_walks(tree, config, k, pending))


def grow_leaves(
    ctx: SearchContext, tree: Tree, walks: list[list[Node]], pending: VirtualLoss
) -> list[list[Node]]:
    """Expand the ripe leaves the walks reached (one batch) and step the walks into their
    new children; returns the round's distinct paths, in walk order.

    Several walks that reached one ripe leaf go on into its new children, one each, by
    PUCT with a pending visit on every child already taken (:func:`select_child`, as
    the iterations after the expansion would walk on); a walk that would step into a
    child already taken ends there and adds nothing, like a walk back to a leaf
    already taken (:func:`select_leaves`). One walk per leaf (k = 1) is the plain step.
    """
    cfg = ctx.config

    def ripe(leaf: Node) -> bool:
        # The root always grows children: the next commit is chosen among them.
        return leaf is tree.root or pending.visits(leaf) >= cfg.expand_after_visits

    growing = [p for p in _distinct(walks) if p[-1].is_leaf and not p[-1].terminal and ripe(p[-1])]
    grown: dict[int, list[Node]] = {}
    for path, children in zip(growing, expand_many(ctx, growing), strict=True):
        if children:
            grown[id(path[-1])] = children
    taken: dict[int, list[Node]] = {}  # leaf -> the children the walks stepped into
    paths: list[list[Node]] = []
    for path in walks:
        leaf = path[-1]
        if id(leaf) not in grown:
            if all(leaf is not p[-1] for p in paths):
                paths.append(path)
            continue
        # Selection takes one more step, into the new children (classic MCTS:
        # simulate from a new node), so this evaluation already scores a
        # candidate: with greedy_early_commit a good greedy set is committed
        # after one iteration instead of two.
        stepped = taken.setdefault(id(leaf), [])
        if stepped:
            pending.add(stepped[-1:])
        child = select_child(tree, leaf, cfg)
        if any(child is c for c in stepped):
            continue
        stepped.append(child)
        paths.append([*path, child])
    return paths


def learn(
    ctx: SearchContext, tree: Tree, path: list[Node], rollout: list[int], score: float
) -> None:
    """One leaf's score enters the tree: back-up, similarity update, dynamic addition."""
    backup(tree, path, score)
    if ctx.config.similarity_update:
        ctx.stats.similarity_updates += similarity_update(ctx, tree, path, rollout, score)
    if ctx.config.dynamic_addition:
        ctx.stats.dynamic_additions += dynamic_addition(ctx, path)
    ctx.stats.iterations += 1
    ctx.emit(
        "iteration", {"iteration": ctx.stats.iterations, "depth": len(path) - 1, "score": score}
    )


def _needs_no_model(ctx: SearchContext, path: list[Node]) -> bool:
    """A terminal leaf whose answer was judged before: its iteration is a lookup."""
    leaf = path[-1]
    if not leaf.terminal:
        return False
    return tuple(ctx.request.answer(path_tokens(path))) in ctx.state.judgements


def run_round(ctx: SearchContext, tree: Tree, k: int) -> list[Judgement]:
    """One search round: ``k`` walks by PUCT with a virtual loss (walks to a leaf that
    needs no model call join on top), the ripe leaves among them expanded and the walks
    stepped into distinct new children, every distinct path rolled out and judged in
    shared model calls, then all backed up in walk order. Each distinct path counts as
    one iteration; ``k = 1`` is one RAIN iteration."""
    ctx.check_cancel()
    pending = VirtualLoss(tree, ctx.config)
    free = (lambda path: _needs_no_model(ctx, path)) if k > 1 else None
    walks = select_walks(tree, ctx.config, k, pending, free, _iterations_left(ctx))
    paths = grow_leaves(ctx, tree, walks, pending)
    for i, path in enumerate(paths):
        _count_rewind(ctx, path, ctx.stats.iterations + 1 + i)
    rollouts = simulate_many(ctx, paths)
    judgements = evaluate_many(ctx, paths, rollouts)
    pending.undo()  # the pending visits become real ones now
    for path, rollout, judgement in zip(paths, rollouts, judgements, strict=True):
        learn(ctx, tree, path, rollout, judgement.score)
    return judgements


def iterate(ctx: SearchContext, tree: Tree) -> Judgement:
    """One inner-loop iteration of RAIN (a round of one leaf)."""
    return run_round(ctx, tree, 1)[0]


def _count_rewind(ctx: SearchContext, path: list[Node], iteration: int) -> None:
    last = ctx.state.last_path
    # A rewind: this iteration does not continue down the branch explored last.
    diverged = any(a is not b for a, b in zip(last[1:], path[1:], strict=False))
    if diverged:
        ctx.stats.rewinds += 1
        ctx.emit("rewind", {"iteration": iteration, "depth": len(path) - 1})
    ctx.state.last_path = path


# --- the commit rule -------------------------------------------------------------------------


def choose_commit(root: Node, config: RainConfig | None = None) -> Node:
    """The most visited child; ties go to the higher value, then the higher prior.

    With ``commit_rule="value"``: the visited child with the highest value (ties: more
    visits, then the prior) -- with few iterations per commit, visit counts say little.
    """
    if config is not None and config.commit_rule == "value":
        visited = [c for c in root.children if c.visits > 0] or root.children
        return max(visited, key=lambda c: (c.value, c.visits, c.prior))
    return max(root.children, key=lambda c: (c.visits, c.value, c.prior))


def should_commit(root: Node, new_iterations: int, config: RainConfig) -> bool:
    """T visits with at least min_new_iterations, or T_m iterations and best value ≥ V."""
    if not root.children:
        return False
    if root.visits >= config.T and new_iterations >= min(config.min_new_iterations, config.T):
        return True
    best = choose_commit(root, config)
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
    if cfg.max_time_s is not None and time.perf_counter() - ctx.state.started >= cfg.max_time_s:
        return "max_time_s"
    if cfg.max_iterations is not None and ctx.stats.iterations >= cfg.max_iterations:
        return "max_iterations"
    if cfg.max_nodes is not None and ctx.stats.nodes >= cfg.max_nodes:
        return "max_nodes"
    return None


def _describe(ctx: SearchContext, root: Node) -> tuple[dict[str, Any], ...]:
    return tuple(
        {
            "text": ctx.model.decode(c.token_ids),
            "token_ids": list(c.token_ids),
            "p": round(c.prior, 4),
            "n": round(c.visits, 3),
            "v": round(c.value, 4),
            "greedy": c.is_greedy,
        }
        for c in root.children
    )


# --- the outer loop ----------------------------------------------------------------------------


def search_root(ctx: SearchContext, tree: Tree) -> tuple[Node | None, int, str | None]:
    """Iterate on the current root until the commit rule (or a budget) says stop.

    Returns the child to commit (``None``: a budget ran out before the root had
    children), the iterations spent, and the budget that ran out, if one did.
    """
    iterations = 0
    while True:
        forced = _budget_left(ctx)
        if forced is not None:
            ctx.stats.budget_exhausted = forced
            chosen = choose_commit(tree.root, ctx.config) if tree.root.children else None
            return chosen, iterations, forced
        iterations += len(run_round(ctx, tree, _round_size(ctx)))
        early = _greedy_ready(tree.root, ctx.config)
        if early is not None:
            return early, iterations, None
        if should_commit(tree.root, iterations, ctx.config):
            return choose_commit(tree.root, ctx.config), iterations, None


def _iterations_left(ctx: SearchContext) -> int | None:
    """Iterations the ``max_iterations`` budget still allows (``None``: no budget)."""
    cap = ctx.config.max_iterations
    return None if cap is None else max(cap - ctx.stats.iterations, 1)


def _round_size(ctx: SearchContext) -> int:
    """``leaves_per_round``, but never past the iteration budget."""
    k = ctx.config.leaves_per_round
    left = _iterations_left(ctx)
    return k if left is None else min(k, left)


def _record(
    ctx: SearchContext,
    token_ids: Sequence[int],
    text: str,
    iterations: int,
    node: Node | None,
    candidates: tuple[dict[str, Any], ...],
    forced: str | None,
) -> Commit:
    """The one place a :class:`Commit` is built (``node``: the committed child, if any)."""
    return Commit(
        index=len(ctx.state.commits),
        token_ids=tuple(token_ids),
        text=text,
        iterations=iterations,
        visits=node.visits if node is not None else 0.0,
        value=node.value if node is not None else 0.0,
        greedy_agrees=node.is_greedy if node is not None else True,
        candidates=candidates,
        forced=forced,
    )


def commit(
    ctx: SearchContext, tree: Tree, chosen: Node, iterations: int, forced: str | None
) -> Commit:
    """Commit ``chosen``: the answer grows by its tokens and it becomes the new root."""
    with ctx.timed("commit"):
        candidates = _describe(ctx, tree.root)
        chosen.parent = None
        tree.root = chosen  # its subtree is kept for the next commit
        text = ctx.request.commit(chosen.token_ids)
    ctx.stats.commits += 1
    if not chosen.is_greedy:
        ctx.stats.overrides += 1
    ctx.state.last_path = []
    record = _record(ctx, chosen.token_ids, text, iterations, chosen, candidates, forced)
    ctx.state.commits.append(record)
    return record


def finish_greedily(ctx: SearchContext) -> Commit:
    """A budget ran out: decode greedily to the end of the sentence and commit that."""
    ctx.check_cancel()
    request = ctx.request
    tail: list[int] = []
    if request.room() > 0:
        ask = SampleRequest(
            ctx.prefix([]),
            1,
            request.room(),
            temperature=0.0,
            stop_after=_SENTENCE_END,
            grammar=ctx.inputs.grammar,
            response_start=len(request.prompt_ids),
            reuse=ctx.reuse,
        )
        ((cont,),) = ctx.model.sample([ask], cancel=request.cancel)
        tail = cont.token_ids
    text = request.commit(tail, otherwise="budget")
    forced = f"{ctx.stats.budget_exhausted}: greedy to a clean stop"
    record = _record(ctx, tail, text, 0, None, (), forced)
    ctx.state.commits.append(record)
    return record


def judge_answer(ctx: SearchContext) -> None:
    """Score the finished answer by the rubric (``stats.final_score``)."""
    answer = ctx.request.answer()
    if answer:
        ctx.check_cancel()
        with ctx.timed("evaluation"):
            text = ctx.request.text()
            ctx.stats.final_score = ctx.inputs.session.score(answer, text).score


def run_search(ctx: SearchContext) -> Iterator[Commit]:
    """Search and commit token sets until the answer ends; yields each commit.

    The request owns the answer: each commit is appended to it, and it decides
    when the answer ends (stop token, stop string, length). When a budget runs
    out the answer is finished greedily to a clean stop. Last, the finished
    answer is judged once more for ``stats.final_score``.
    """
    tree = Tree()
    while not ctx.request.finished:
        chosen, iterations, forced = search_root(ctx, tree)
        if chosen is None:
            break  # nothing searched on this root: finish greedily
        yield commit(ctx, tree, chosen, iterations, forced)
        if forced is not None:
            break
    if not ctx.request.finished:
        yield finish_greedily(ctx)
    judge_answer(ctx)
