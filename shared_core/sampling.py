"""Token choice from log-probabilities: small pure functions, seeded numpy RNG."""

from __future__ import annotations

import numpy as np

__all__ = ["pick_top_k", "sample_top_k", "top_k_indices"]


def top_k_indices(logprobs: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries of a [vocab] row, best first (ties: lower id)."""
    k = min(k, logprobs.shape[-1])
    part = np.argpartition(-logprobs, k - 1)[:k]
    # Stable order: by value, then token id, so equal inputs give equal output.
    return part[np.lexsort((part, -logprobs[part]))]


def pick_top_k(logprobs: np.ndarray, k: int, temperature: float, u: float) -> int:
    """The token at uniform draw ``u`` ∈ [0, 1) in the top-k of a [vocab] row at ``temperature``.

    ``k`` ≤ 0 means the whole row. Taking the draw rather than a generator lets a
    caller draw for every row of a batch, finished or not, so the random stream
    does not depend on when rows finish.
    """
    idx = top_k_indices(logprobs, k if k > 0 else logprobs.shape[-1])
    scaled = logprobs[idx].astype(np.float64) / temperature
    scaled -= scaled.max()
    probs = np.exp(scaled)
    probs /= probs.sum()
    pos = int(np.searchsorted(np.cumsum(probs), u, side="right"))
    return int(idx[min(pos, len(idx) - 1)])


def sample_top_k(logprobs: np.ndarray, k: int, temperature: float, rng: np.random.Generator) -> int:
    """Sample one token from the top-k of a [vocab] row at ``temperature``."""
    return pick_top_k(logprobs, k, temperature, float(rng.random()))
