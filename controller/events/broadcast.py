"""Live fan-out of newly stored events to WatchEvents callers.

Each watcher has a bounded queue. Publishing never waits: a watcher whose queue is
full is dropped (it gets RESOURCE_EXHAUSTED and can catch up with ListEvents), so one
slow client can neither stall ingest nor make the controller buffer without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from controller.events.metrics import EventMetrics
from controller.events.rows import EventRow
from honeyfleet.errors import ResourceExhausted

WATCH_QUEUE_EVENTS = 4096
MAX_WATCHERS = 256


@dataclass(frozen=True)
class WatchFilter:
    """Which events a watcher wants; empty fields match everything."""

    eventid: str = ""
    sensor: str = ""
    src_ip: str = ""
    session: str = ""

    def matches(self, row: EventRow) -> bool:
        """Whether ``row`` passes every set field."""
        return (
            (not self.eventid or row.eventid == self.eventid)
            and (not self.sensor or row.sensor == self.sensor)
            and (not self.src_ip or row.src_ip == self.src_ip)
            and (not self.session or row.session == self.session)
        )


class Watcher:
    """One watcher's queue; ``None`` in it means the watcher was dropped."""

    def __init__(self, wanted: WatchFilter, limit: int) -> None:
        self.wanted = wanted
        self.queue: asyncio.Queue[EventRow | None] = asyncio.Queue(maxsize=limit)
        self._limit = limit

    async def next(self) -> EventRow:
        """The next event; ResourceExhausted once the watcher has been dropped."""
        row = await self.queue.get()
        if row is None:
            raise ResourceExhausted(
                f"watch fell more than {self._limit} events behind and was ended; "
                "reconnect, and catch up with ListEvents if needed"
            )
        return row

    def offer(self, row: EventRow) -> bool:
        """Queue ``row``; False (and the queue ends with the drop mark) if it was full."""
        try:
            self.queue.put_nowait(row)
        except asyncio.QueueFull:
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(None)
            return False
        return True


class Broadcaster:
    """Delivers published rows to every matching watcher."""

    def __init__(
        self,
        metrics: EventMetrics,
        *,
        queue_events: int = WATCH_QUEUE_EVENTS,
        max_watchers: int = MAX_WATCHERS,
    ) -> None:
        self._metrics = metrics
        self._queue_events = queue_events
        self._max_watchers = max_watchers
        self._watchers: set[Watcher] = set()

    @contextlib.contextmanager
    def subscribe(self, wanted: WatchFilter) -> Iterator[Watcher]:
        """A watcher that receives rows published while the context is open."""
        if len(self._watchers) >= self._max_watchers:
            raise ResourceExhausted(f"already {self._max_watchers} watchers; try again later")
        watcher = Watcher(wanted, self._queue_events)
        self._watchers.add(watcher)
        self._metrics.watchers.set(len(self._watchers))
        try:
            yield watcher
        finally:
            self._watchers.discard(watcher)
            self._metrics.watchers.set(len(self._watchers))

    def publish(self, rows: Sequence[EventRow]) -> None:
        """Offer rows to watchers; drop the ones that cannot keep up."""
        for watcher in list(self._watchers):
            for row in rows:
                if watcher.wanted.matches(row) and not watcher.offer(row):
                    self._watchers.discard(watcher)
                    self._metrics.watchers.set(len(self._watchers))
                    self._metrics.watchers_dropped.inc()
                    break
