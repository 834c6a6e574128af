"""The search tree: nodes are token sets (RAIN §3). Plain data, no model."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Node", "Tree", "path_tokens"]


@dataclass(eq=False)
class Node:
    """One token set X, its context being the path from the root."""

    token_ids: tuple[int, ...]
    """The tokens this node adds after its parent's."""
    prior: float = 1.0
    """p(X): model probability of the set, normalised over siblings."""
    raw_prob: float = 1.0
    """Un-normalised probability (product of token probabilities), for renormalising."""
    parent: Node | None = None
    children: list[Node] = field(default_factory=list)
    visits: float = 0.0
    """n(X): visit count; similarity updates add fractions."""
    value: float = 0.0
    """v(X): running mean of the evaluation scores of the subtree, in [-1, 1]."""
    embedding: np.ndarray | None = None
    """e(X) [dim]: running mean of rollout-text embeddings from this node."""
    embedding_count: int = 0
    depth: int = 0
    """Depth below the answer's first root (the reference code's ``step``); kept when the
    root moves, so token sets grow 1, 2, 4, 10 from the start of the answer."""
    is_greedy: bool = False
    """The candidate greedy decoding would have produced from the parent."""
    terminal: bool = False
    """Ends the answer (stop token, stop string or length limit): never expanded."""

    @property
    def is_leaf(self) -> bool:
        return not self.children

    def add_children(self, children: list[Node]) -> None:
        for child in children:
            child.parent = self
            child.depth = self.depth + 1
        self.children.extend(children)
        total = sum(c.raw_prob for c in self.children)
        for child in self.children:
            # Priors are renormalised over all siblings, including added ones.
            child.prior = child.raw_prob / total if total > 0 else 1.0 / len(self.children)

    def update_embedding(self, e: np.ndarray) -> None:
        self.embedding_count += 1
        if self.embedding is None:
            self.embedding = e.astype(np.float32).copy()
        else:
            self.embedding += (e - self.embedding) / self.embedding_count

    def iter_subtree(self) -> Iterator[Node]:
        stack = [self]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children)


@dataclass
class Tree:
    """The search state of one request: the current root and the value bounds."""

    root: Node = field(default_factory=lambda: Node(()))
    min_value: float = -1.0
    """Smallest value seen (reference code: starts at -1), for min-max normalisation."""
    max_value: float = 1.0
    """Largest value seen (reference code: starts at +1)."""

    def normalise(self, value: float) -> float:
        span = self.max_value - self.min_value
        return (value - self.min_value) / span if span > 0 else 0.5

    def observe(self, value: float) -> None:
        self.min_value = min(self.min_value, value)
        self.max_value = max(self.max_value, value)


def path_tokens(path: list[Node]) -> list[int]:
    """Tokens of a path from the root (the root's own tokens are committed already)."""
    out: list[int] = []
    for node in path[1:]:
        out.extend(node.token_ids)
    return out
