"""Constrained decoding: which tokens may come next (e.g. valid JSON for a schema).

The search asks the constraint before every token it chooses -- candidate token
sets, rollouts and the greedy finish -- with the response tokens of that
branch. Because the question carries the whole branch, a rewind needs no
state to undo: a stateful matcher (xgrammar) rolls back to the common prefix.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

__all__ = ["TokenConstraint"]


class TokenConstraint(ABC):
    """Restricts the next token given the response tokens generated so far."""

    @abstractmethod
    def allowed(self, response_ids: Sequence[int]) -> np.ndarray | None:
        """``[vocab]`` bool mask of allowed next tokens, or ``None`` for no restriction.

        The end-of-text token must be allowed exactly when the response is complete.
        """
