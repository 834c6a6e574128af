"""shared_core.bridge: the one worker-thread bridge both adapters' async endpoints use."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from shared_core.bridge import Emit, run_in_thread, stream_in_thread

WHO: contextvars.ContextVar[str] = contextvars.ContextVar("who", default="nobody")


async def test_items_and_emitted_events_arrive_in_order_off_the_loop() -> None:
    loop_thread = threading.get_ident()
    threads: list[int] = []

    def produce(emit: Emit) -> Iterator[Any]:
        threads.append(threading.get_ident())
        for i in range(3):
            emit(("event", i, WHO.get()))
            yield i

    WHO.set("caller")
    got = [item async for item in stream_in_thread(produce, threading.Event())]
    assert got == [("event", 0, "caller"), 0, ("event", 1, "caller"), 1, ("event", 2, "caller"), 2]
    assert threads and threads[0] != loop_thread  # the producer ran in a worker thread


async def test_an_error_in_the_worker_is_raised_in_the_awaiting_task() -> None:
    def produce(emit: Emit) -> Iterator[int]:
        yield 1
        raise ValueError("bad prompt")

    cancel = threading.Event()
    seen = []
    with pytest.raises(ValueError, match="bad prompt"):
        async for item in stream_in_thread(produce, cancel):
            seen.append(item)
    assert seen == [1] and not cancel.is_set()

    def fail() -> int:
        raise ValueError("bad prompt")

    with pytest.raises(ValueError, match="bad prompt"):
        await run_in_thread(fail, cancel)


async def test_cancelling_the_task_sets_cancel_and_closes_the_producer_in_its_thread() -> None:
    cancel = threading.Event()
    closed_in: list[int] = []
    worker: list[int] = []

    def produce(emit: Emit) -> Iterator[int]:
        worker.append(threading.get_ident())
        try:
            i = 0
            while not cancel.is_set():  # a search stops within one step of the event
                time.sleep(0.01)
                i += 1
                yield i
        finally:
            closed_in.append(threading.get_ident())

    async def consume() -> None:
        async for _ in stream_in_thread(produce, cancel):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancel.is_set()
    deadline = time.monotonic() + 5
    while not closed_in and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert closed_in == worker  # released in the worker thread, not on the loop


async def test_stopping_early_cancels_and_a_finished_run_does_not() -> None:
    cancel = threading.Event()

    def produce(emit: Emit) -> Iterator[int]:
        yield from range(1000)

    stream = stream_in_thread(produce, cancel)
    async for item in stream:
        if item == 2:
            break
    await stream.aclose()  # type: ignore[attr-defined]
    assert cancel.is_set()
    done = threading.Event()
    assert await run_in_thread(lambda: 41 + 1, done) == 42
    assert not done.is_set()
