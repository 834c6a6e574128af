"""Errors a user can act on. Each message names what was wrong and how to fix it."""

from __future__ import annotations

__all__ = [
    "RainCancelled",
    "RainConfigError",
    "RainError",
    "RainInputError",
    "RainServerError",
    "RubricError",
]


class RainError(Exception):
    """Base class of every error raised on purpose by the RAIN engine."""


class RainInputError(RainError, ValueError):
    """The messages or prompt cannot be used (empty, too long, unsupported role, ...)."""


class RainConfigError(RainError, ValueError):
    """A RainConfig value is invalid."""


class RubricError(RainError, ValueError):
    """A rubric is unknown, malformed, or cannot be scored with this tokenizer."""


class RainCancelled(RainError):
    """The caller cancelled the search (asyncio cancel, KeyboardInterrupt, cancel event)."""


class RainServerError(RainError):
    """A served model failed: unreachable, timed out, an HTTP error, a missing feature.

    The message names the URL, what failed and the fix; ``transient`` says whether a
    retry may succeed (a refused connection, 502/503/504, a timeout).
    """

    def __init__(
        self, message: str, *, url: str = "", status: int | None = None, transient: bool = False
    ) -> None:
        super().__init__(message)
        self.url = url
        self.status = status
        self.transient = transient
