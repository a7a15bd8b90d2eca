"""sensor.session.latch: a one-way event that costs nothing until someone waits."""

from __future__ import annotations

import asyncio

from sensor.session.latch import Latch


async def test_wait_returns_at_once_when_set() -> None:
    latch = Latch()
    latch.set()
    latch.set()
    assert latch.is_set()
    async with asyncio.timeout(1):
        await latch.wait()


async def test_set_wakes_every_waiter_and_a_cancelled_one_does_not_cancel_the_rest() -> None:
    latch = Latch()
    waiters = [asyncio.create_task(latch.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    waiters[0].cancel()
    await asyncio.sleep(0)
    assert not latch.is_set() and not any(w.done() for w in waiters[1:])
    latch.set()
    async with asyncio.timeout(1):
        await asyncio.gather(*waiters[1:])
    assert waiters[0].cancelled()
