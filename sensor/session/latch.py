"""A one-way event for per-session signals that are rarely waited for.

An ``asyncio.Event`` holds a deque of waiters from the start: about 0.75 KB, kept by
every held session for an end that only shutdown and tests wait on. A :class:`Latch`
makes its future only when someone waits.
"""

from __future__ import annotations

import asyncio


class Latch:
    """Set once, never cleared; ``wait`` returns once it is set."""

    __slots__ = ("_is_set", "_waiter")

    def __init__(self) -> None:
        self._is_set = False
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        """Set it and wake every waiter (idempotent)."""
        self._is_set = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def is_set(self) -> bool:
        """Whether it has been set."""
        return self._is_set

    async def wait(self) -> None:
        """Return once it is set (at once if it is)."""
        if self._is_set:
            return
        if self._waiter is None:
            self._waiter = asyncio.get_running_loop().create_future()
        # Shielded: a cancelled waiter must not cancel the future the others wait on.
        await asyncio.shield(self._waiter)
