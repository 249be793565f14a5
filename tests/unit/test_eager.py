"""start_eagerly: a coroutine runs up to its first wait at once, the rest as a task would run it."""

from __future__ import annotations

import asyncio
import contextvars
import time

import pytest

from datamesh.core.eager import start_eagerly
from datamesh.query.engine import within

SEEN: contextvars.ContextVar[str] = contextvars.ContextVar("seen", default="caller")


async def test_a_coroutine_that_never_waits_is_done_when_started_and_its_errors_are_kept() -> None:
    ran: list[str] = []

    async def search() -> list[str]:
        ran.append("searched")
        return ["row"]

    async def broken() -> None:
        raise ValueError("no such collection")

    started = start_eagerly(search())
    assert ran == ["searched"] and started.done() and started.result() == ["row"]
    failed = start_eagerly(broken())
    assert failed.done()
    with pytest.raises(ValueError, match="no such collection"):
        await failed


async def test_a_coroutine_that_waits_goes_on_in_a_task_in_its_own_context() -> None:
    answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    steps: list[str] = []

    async def remote() -> int:
        SEEN.set("search")
        steps.append("sent")
        value = await answer
        await asyncio.sleep(0)  # a bare yield is a wait too
        steps.append(SEEN.get())
        return value * 2

    started = start_eagerly(remote())
    assert steps == ["sent"] and not started.done()
    assert SEEN.get() == "caller", "the coroutine's context is its own, as a task's"
    answer.set_result(21)
    assert await started == 42 and steps == ["sent", "search"]


async def test_an_error_of_what_the_coroutine_awaits_reaches_the_coroutine() -> None:
    failing: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def careful() -> str:
        try:
            await failing
        except ConnectionError as exc:
            return f"handled: {exc}"
        return "unreachable"

    started = start_eagerly(careful())
    failing.set_exception(ConnectionError("refused"))
    assert await started == "handled: refused"


async def test_cancelling_the_rest_cancels_what_it_waits_on_and_the_coroutine_sees_it() -> None:
    pending: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    cleaned = asyncio.Event()

    async def hanging() -> None:
        try:
            await pending
        finally:
            cleaned.set()

    started = start_eagerly(hanging())
    await asyncio.sleep(0)
    started.cancel()
    with pytest.raises(asyncio.CancelledError):
        await started
    assert cleaned.is_set() and pending.cancelled()


async def test_a_cancel_after_the_awaited_future_finished_still_reaches_the_coroutine() -> None:
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    outcome: list[str] = []

    async def worker() -> None:
        try:
            outcome.append(await ready)
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise

    started = start_eagerly(worker())
    ready.set_result("done")  # finished, but the task has not run since
    started.cancel()
    with pytest.raises(asyncio.CancelledError):
        await started
    # As with a task: the cancel arrives at the coroutine's next step, whether or not it read the result.
    assert outcome[-1] == "cancelled" and not ready.cancelled()


async def test_a_search_that_holds_the_thread_past_its_timeout_still_counts() -> None:
    """The embedded store's search never waits: it cannot be interrupted, and its rows are not thrown away."""

    async def slow_inline_search() -> list[str]:
        time.sleep(0.05)  # the engine holding the thread
        return ["row"]

    assert await within(slow_inline_search(), 0.01) == ["row"]


async def test_a_waiting_search_past_its_timeout_is_cancelled() -> None:
    cancelled = asyncio.Event()

    async def hanging_search() -> list[str]:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return []

    assert await within(hanging_search(), 0.01) is None
    assert cancelled.is_set()
