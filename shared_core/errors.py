"""Errors a user can act on. Each message names what was wrong and how to fix it."""

from __future__ import annotations

__all__ = [
    "RainCancelled",
    "RainConfigError",
    "RainError",
    "RainInputError",
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
