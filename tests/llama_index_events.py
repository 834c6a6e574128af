"""Collects LlamaIndex instrumentation events from the real root dispatcher (test helper)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from pydantic import Field

_H = TypeVar("_H", bound="EventLog")


class EventLog(BaseEventHandler):
    """Every instrumentation event fired while it is attached."""

    events: list[Any] = Field(default_factory=list)

    def handle(self, event: Any, **kwargs: Any) -> None:
        self.events.append(event)

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


@contextmanager
def attached(handler: _H) -> Iterator[_H]:
    """Attach ``handler`` to the root dispatcher for the duration of the block."""
    root = get_dispatcher()
    root.add_event_handler(handler)
    try:
        yield handler
    finally:
        root.event_handlers.remove(handler)
