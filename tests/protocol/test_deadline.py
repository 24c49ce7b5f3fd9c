"""protocol/deadline.py: asyncio.timeout's contract, checked case by case against it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest

from protocol.deadline import Deadline

LIMITS: list[Callable[[float | None], AbstractAsyncContextManager[Any]]] = [Deadline, asyncio.timeout]


@pytest.mark.parametrize("limit", LIMITS)
async def test_a_block_that_outlasts_its_limit_raises_timeout_error(limit: Any) -> None:
    with pytest.raises(TimeoutError):
        async with limit(0.01):
            await asyncio.sleep(1)
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]  # our cancel was taken back


@pytest.mark.parametrize("limit", LIMITS)
async def test_a_block_within_its_limit_returns_and_leaves_no_timer(limit: Any) -> None:
    async with limit(0.05):
        await asyncio.sleep(0)
    await asyncio.sleep(0.1)  # a timer left armed would cancel this sleep


@pytest.mark.parametrize("limit", LIMITS)
async def test_no_limit_never_fires(limit: Any) -> None:
    async with limit(None):
        await asyncio.sleep(0.01)


async def test_a_limit_already_past_fires_at_the_first_wait() -> None:
    with pytest.raises(TimeoutError):
        async with Deadline(-1):
            await asyncio.sleep(1)


async def test_expired_says_whether_it_fired() -> None:
    d = Deadline(0.01)
    with pytest.raises(TimeoutError):
        async with d:
            await asyncio.sleep(1)
    assert d.expired
    quick = Deadline(1)
    async with quick:
        pass
    assert not quick.expired


@pytest.mark.parametrize("limit", LIMITS)
async def test_a_cancel_from_outside_stays_a_cancel(limit: Any) -> None:
    entered = asyncio.Event()

    async def work() -> None:
        async with limit(10):
            entered.set()
            await asyncio.sleep(10)

    task = asyncio.create_task(work())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize("limit", LIMITS)
async def test_an_error_inside_passes_through_untouched(limit: Any) -> None:
    with pytest.raises(KeyError):
        async with limit(1):
            raise KeyError("x")
