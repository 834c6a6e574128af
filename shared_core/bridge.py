"""The one way async callers reach the search: a worker thread, items streamed to the loop.

The search is blocking Python (model forward passes), so an ``async`` endpoint runs
it in a worker thread and awaits what it produces. Both adapters (ChatRain's
``_astream``, RainLLM's async endpoints) go through :func:`stream_in_thread`:

- the producer runs in its own thread, inside a copy of the caller's context
  (context variables such as the active rubric are seen there);
- each item it yields, and each item it hands to ``emit`` (search events), is put
  on the event loop in order; an exception it raises is raised in the awaiting task;
- when the awaiting task is cancelled, or stops iterating early, ``cancel`` is set:
  the search stops within one model forward pass, and the producer is closed in
  its own thread (so it releases its cached prefixes there).
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

__all__ = ["Emit", "run_in_thread", "stream_in_thread"]

T = TypeVar("T")
R = TypeVar("R")

Emit = Callable[[Any], None]
"""Hands one extra item (e.g. a search event) to the awaiting task, in order with the rest."""

_END = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


async def stream_in_thread(
    produce: Callable[[Emit], Iterator[T]], cancel: threading.Event
) -> AsyncIterator[Any]:
    """Iterate ``produce(emit)`` in a worker thread; yield its items (and emitted ones).

    ``cancel`` is the search's cancel event: it is set when the consumer is cancelled
    or closes this iterator before the end.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop closed: nobody is listening any more
            cancel.set()

    def work() -> None:
        items: Iterator[T] | None = None
        try:
            items = produce(put)
            for item in items:
                if cancel.is_set():
                    break
                put(item)
        except BaseException as exc:  # handed to the awaiting task, raised there
            put(_Failure(exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # a generator releases what it holds now, in this thread
            put(_END)

    context = contextvars.copy_context()
    worker = threading.Thread(target=context.run, args=(work,), name="rain-search", daemon=True)
    worker.start()
    finished = False
    try:
        while True:
            item = await queue.get()
            if item is _END:
                finished = True
                return
            if isinstance(item, _Failure):
                finished = True  # the worker is ending on its own
                raise item.exc
            yield item
    finally:
        if not finished:
            cancel.set()  # cancelled or abandoned: stop the search, don't finish unheard


async def run_in_thread(fn: Callable[[], R], cancel: threading.Event) -> R:
    """``fn()`` in a worker thread (through :func:`stream_in_thread`); cancellable."""

    def produce(emit: Emit) -> Iterator[R]:
        yield fn()

    results: list[R] = []
    async for item in stream_in_thread(produce, cancel):
        results.append(item)
    return results[0]
