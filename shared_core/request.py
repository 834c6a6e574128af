"""One call's answer: its committed tokens, the rules that end it, its text, its cache pins.

Every ``generate`` / ``stream`` / ``vanilla`` / ``self_evaluate`` call builds one
:class:`RainRequest`. RAIN's search, vanilla decoding and streaming all end an
answer by the same rules, here and nowhere else (:meth:`RainRequest.end_reason`),
checked in this order:

1. ``stop_string`` -- the answer's text contains one of ``config.stop``; the text
   is cut before it. Checked first because it is what cuts the visible answer,
   even when a stop token follows in the same token set.
2. ``stop`` -- a stop token: end of text, or a turn token (the model starting a
   new turn, e.g. a new user message); the token itself is not part of the answer.
3. ``length`` -- ``max_new_tokens`` tokens (clipped to the room the prompt leaves
   in the context window).

A fourth reason, ``budget``, is given by the caller when a search budget ran out
and the greedy finish reached a sentence end before any rule above.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from types import TracebackType

from shared_core.config import RainConfig
from shared_core.errors import RainCancelled
from shared_core.evaluation import EvalSession
from shared_core.models.protocol import LanguageModel

__all__ = ["FINISH_REASONS", "RainRequest", "TextEmitter", "until_stop"]

FINISH_REASONS = ("stop_string", "stop", "length", "budget")
"""Every ``finish_reason``, the rules' in the order they are checked."""


def until_stop(tokens: Sequence[int], stop_token_ids: frozenset[int]) -> list[int]:
    """``tokens`` up to (not including) the first stop token."""
    out: list[int] = []
    for t in tokens:
        if t in stop_token_ids:
            break
        out.append(t)
    return out


class TextEmitter:
    """Turns growing token ids into text deltas that never need taking back."""

    def __init__(self, model: LanguageModel, stops: tuple[str, ...]) -> None:
        self.model = model
        self.stops = stops
        self.emitted = ""

    def cut(self, text: str) -> tuple[str, bool]:
        """``text`` before its first stop string, and whether one was found."""
        at = min((text.find(s) for s in self.stops if s in text), default=-1)
        return (text[:at], True) if at >= 0 else (text, False)

    def text_of(self, ids: Sequence[int]) -> str:
        return self.cut(self.model.decode(ids))[0]

    def push(self, ids: Sequence[int], final: bool) -> str:
        text, stopped = self.cut(self.model.decode(ids))
        if not final and not stopped:
            # Hold back what a stop string spanning commits could still remove,
            # and a trailing half-decoded character.
            hold = max((len(s) - 1 for s in self.stops), default=0)
            visible = text[: len(text) - hold] if hold else text
            visible = visible.rstrip("\ufffd")
        else:
            visible = text
        if len(visible) <= len(self.emitted):
            return ""
        delta = visible[len(self.emitted) :]
        self.emitted = visible
        return delta


class RainRequest:
    """The state of one call's answer. Use it as a context manager: leaving it releases
    the cache pins it holds and closes its judge session, however the call ended."""

    def __init__(
        self,
        model: LanguageModel,
        prompt_ids: Sequence[int],
        config: RainConfig,
        *,
        cancel: threading.Event | None = None,
    ) -> None:
        self.model = model
        self.prompt_ids = list(prompt_ids)
        room = model.context_window - len(self.prompt_ids)
        # The answer never runs past the context window: the length rule comes first.
        self.config = (
            config if config.max_new_tokens <= room else config.merged(max_new_tokens=room)
        )
        self.cancel = cancel
        self.session: EvalSession | None = None
        self.committed: list[int] = []
        self.finish_reason: str | None = None
        self._emitter = TextEmitter(model, self.config.stop)
        self._pinned: list[int] = []  # what we pinned (pin() returned): unpin only that

    # --- the end-of-answer rules ---------------------------------------------------------
    @property
    def max_new_tokens(self) -> int:
        return self.config.max_new_tokens

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def room(self, uncommitted: int = 0) -> int:
        """Tokens the answer may still take after ``uncommitted`` more tokens."""
        return self.max_new_tokens - len(self.committed) - uncommitted

    def answer(self, uncommitted: Sequence[int] = ()) -> list[int]:
        """The answer's tokens if ``uncommitted`` followed the committed ones (stop cut off)."""
        return until_stop([*self.committed, *uncommitted], self.model.stop_token_ids)

    def end_reason(self, uncommitted: Sequence[int] = ()) -> str | None:
        """Why the answer would end if ``uncommitted`` followed; ``None``: it goes on."""
        tokens = [*self.committed, *uncommitted]
        answer = until_stop(tokens, self.model.stop_token_ids)
        if self.config.stop and self._emitter.cut(self.model.decode(answer))[1]:
            return "stop_string"
        if len(answer) < len(tokens):
            return "stop"
        if len(tokens) >= self.max_new_tokens:
            return "length"
        return None

    def text(self) -> str:
        """The answer's text (cut before a stop string)."""
        return self._emitter.text_of(self.answer())

    # --- committing ----------------------------------------------------------------------
    def commit(self, token_ids: Sequence[int], *, otherwise: str | None = None) -> str:
        """Append ``token_ids`` to the answer; returns the text this adds to the stream.

        Sets :attr:`finish_reason` when a rule ends the answer (``otherwise`` when none
        does but the caller ends it anyway); while it goes on, the cached prefixes move
        forward to the new committed text.
        """
        self.committed.extend(int(t) for t in token_ids)
        self.finish_reason = self.end_reason() or otherwise
        delta = self._emitter.push(self.answer(), final=self.finished)
        if not self.finished:
            self._advance_pins()
        return delta

    # --- cancellation and cache pins ----------------------------------------------------
    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise RainCancelled("the RAIN search was cancelled by its caller")

    def start(self, session: EvalSession | None = None, *, pin_prompt: bool = True) -> None:
        """Take the judge session (closed with the request) and pin the prompt."""
        self.session = session
        if pin_prompt and self.config.reuse_cache:
            self.check_cancel()
            self.model.pin(self.prompt_ids)
            self._pinned = list(self.prompt_ids)

    def _advance_pins(self) -> None:
        if not self._pinned:
            return
        self.check_cancel()  # every pin is model work: none after a cancel
        new = self.prompt_ids + self.committed
        self.model.pin(new)  # built from the previous pin: only the new tokens run
        self.model.unpin(self._pinned)
        self._pinned = new
        if self.session is not None:
            self.check_cancel()
            self.session.committed(self.committed)

    def close(self) -> None:
        """Release the pins and the judge session (idempotent)."""
        pinned, self._pinned = self._pinned, []
        if pinned:
            self.model.unpin(pinned)
        session, self.session = self.session, None
        if session is not None:
            session.close()

    def __enter__(self) -> RainRequest:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
