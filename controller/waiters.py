"""Acquires waiting for a guest: a bounded queue, woken one per freed guest, oldest first.

When capacity appears on a node (a guest finished booting, a node came back or was
resumed), only as many waiters as there are new free guests are woken, and only those
whose labels the node offers: no herd re-plans from the same counts. A woken waiter
that still finds nothing (a newcomer took the guest first) queues again at the front.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from honeyfleet.errors import ResourceExhausted


@dataclass(eq=False)
class _Waiter:
    labels: Mapping[str, str]
    woken: asyncio.Event = field(default_factory=asyncio.Event)
    # The labels of the node whose guest woke it.
    offered: Mapping[str, str] = field(default_factory=dict)


class CapacityWaiters:
    """The queue of acquires waiting for a free guest."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._queue: collections.deque[_Waiter] = collections.deque()

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def full(self) -> bool:
        """Whether one more waiter would exceed the bound."""
        return len(self._queue) >= self._limit

    async def wait(self, labels: Mapping[str, str], within: float, *, again: bool) -> bool:
        """Wait until woken (True) or ``within`` seconds passed (False).

        ``again`` puts a waiter that was woken in vain back at the front. Raises
        ResourceExhausted when the queue is full (a newcomer is shed, not queued).
        """
        if within <= 0:
            return False
        if not again and self.full:
            raise ResourceExhausted("too many lease requests already wait for a guest")
        waiter = _Waiter(labels)
        if again:
            self._queue.appendleft(waiter)
        else:
            self._queue.append(waiter)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within):
                    await waiter.woken.wait()
        except asyncio.CancelledError:
            if waiter.woken.is_set():
                # Woken, then cancelled (its caller left): the guest goes to the next.
                self.offer(waiter.offered, 1)
            raise
        finally:
            if not waiter.woken.is_set():
                self._queue.remove(waiter)
        return waiter.woken.is_set()

    def offer(self, labels: Mapping[str, str], free: int | None) -> None:
        """Wake up to ``free`` waiters (None: all) whose labels ``labels`` satisfies."""
        if not self._queue or free == 0:
            return
        keep: collections.deque[_Waiter] = collections.deque()
        while self._queue and (free is None or free > 0):
            waiter = self._queue.popleft()
            if all(labels.get(k) == v for k, v in waiter.labels.items()):
                waiter.offered = labels
                waiter.woken.set()
                if free is not None:
                    free -= 1
            else:
                keep.append(waiter)
        keep.extend(self._queue)
        self._queue = keep
