"""The single writer between sensor streams and the store.

Streams hand their batches to :meth:`BatchWriter.write` and wait for the result; the
writer takes whatever batches are queued (up to ``max_commit_events``) and writes them
in one transaction (group commit), so many streams cost few transactions. Under a fleet's
steady trickle (a thousand sensors, each sending an event or two at a time) the queue
is rarely more than one batch deep when the writer looks, so it lets others join the
oldest queued batch until ``commit_window`` after that batch arrived: a commit (and its
fsync) then serves many sensors instead of one, for up to the window more on each
acknowledgement (the default 50 ms puts about a hundred events in a commit at a fleet's
2,000 a second; a commit's cost per event falls with its size, and so does the event
loop's work per commit). The window counts from the oldest batch's arrival, not from when the
writer got to it, so a batch that already waited behind the previous commit (a slow
disk, a busy event loop) waits no longer than the window in all.

After a commit the batches are acknowledged, then the new events go to the sinks and
live watchers while the next group gathers and commits: one fan-out at a time, in
commit order, so a slow sink still holds the writer back (it cannot fall behind without
bound) but a fast one adds nothing to the next acknowledgement.

Overload: the queue of batches is bounded. When the store is slow, streams wait to
enqueue (they stop reading requests, and gRPC flow control slows the sensors down), but
for at most ``shed_after`` seconds: then the batch is refused with RESOURCE_EXHAUSTED
and a retry hint (:class:`~controller.events.quota.Overloaded`), so a sensor hears
"later" well before its acknowledgement timeout instead of waiting on without bound.

Store outages: a transaction that fails with Unavailable is retried with capped
exponential backoff until it succeeds; meanwhile nothing is acknowledged, and the
state callback reports the store down (health, metrics). Batches whose stream went away
are left out of the next attempt (the sensor will resend them).

Poison: if the store refuses a transaction's data (StoreDataError), the rows are split
in halves until the offending rows are alone; those are rejected, the rest stored.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from controller.events.metrics import EventMetrics
from controller.events.quota import Overloaded
from controller.events.rows import EventRow, first_new
from controller.events.store import EventStore, StoreDataError
from honeyfleet.errors import Unavailable

log = logging.getLogger(__name__)

BACKOFF_START = 0.1
BACKOFF_MAX = 5.0


@dataclass(frozen=True)
class Ack:
    """How a batch was stored."""

    stored: int
    duplicates: int


@dataclass
class _Pending:
    """A batch waiting for the store, and the future its stream waits on."""

    rows: Sequence[EventRow]
    done: asyncio.Future[Ack]
    queued: float
    """When it was queued (time.monotonic)."""


@dataclass
class _Outcome:
    """What happened to a group's rows so far, kept across retries."""

    stored: set[str] = field(default_factory=set)
    settled: set[str] = field(default_factory=set)
    rejected: set[str] = field(default_factory=set)


class BatchWriter:
    """Group-commits batches from all sensor streams; one transaction at a time."""

    def __init__(
        self,
        store: EventStore,
        metrics: EventMetrics,
        *,
        max_pending: int,
        max_commit_events: int,
        commit_window: float,
        shed_after: float,
        retry_after: float,
        on_stored: Callable[[list[EventRow]], Coroutine[Any, Any, None]],
        on_state: Callable[[bool], Awaitable[None]],
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=max_pending)
        self._max_commit_events = max_commit_events
        self._commit_window = commit_window
        self._shed_after = shed_after
        self._retry_after = retry_after
        self._on_stored = on_stored
        self._on_state = on_state
        self.up = True
        self.retrying = False
        self._down_since = 0.0
        self._fan_out: asyncio.Task[None] | None = None

    async def write(self, rows: Sequence[EventRow]) -> Ack:
        """Store a batch durably and say how; Overloaded if it cannot even be queued in time.

        Once queued, the batch waits as long as storing it takes (a store outage holds
        acknowledgements; the sensor keeps its events).
        """
        if not rows:
            return Ack(0, 0)
        pending = _Pending(rows, asyncio.get_running_loop().create_future(), time.monotonic())
        try:
            if self._queue.full():
                async with asyncio.timeout(self._shed_after):
                    await self._queue.put(pending)
            else:
                self._queue.put_nowait(pending)  # the usual case: no timer to arm
        except TimeoutError:
            self._metrics.shed.labels("queue").inc()
            raise Overloaded(
                f"the event store is behind ({self._queue.qsize()} batches queued for "
                f"{self._shed_after:.0f}s)",
                reason="queue",
                retry_after=self._retry_after,
            ) from None
        self._metrics.queue.set(self._queue.qsize())
        return await pending.done

    async def run(self) -> None:
        """Write queued batches until cancelled (the last fan-out still completes)."""
        try:
            while True:
                group = await self._gather()
                self._metrics.queue.set(self._queue.qsize())
                try:
                    await self._commit(group)
                except Exception as e:
                    # A bug, not an outage: fail these batches (their sensors resend) and
                    # keep the writer alive for everyone else.
                    log.exception("event writer failed on %d batches", len(group))
                    for pending in group:
                        if not pending.done.done():
                            pending.done.set_exception(Unavailable(f"event write failed: {e}"))
        finally:
            await self._fanned_out()

    async def _gather(self) -> list[_Pending]:
        """The next group to commit: the first batch, and those that join it in the window."""
        group = [await self._queue.get()]
        events = len(group[0].rows)
        deadline = group[0].queued + self._commit_window
        while events < self._max_commit_events:
            if self._queue.empty():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    async with asyncio.timeout(left):
                        pending = await self._queue.get()
                except TimeoutError:
                    break
            else:
                pending = self._queue.get_nowait()
            group.append(pending)
            events += len(pending.rows)
        return group

    async def _commit(self, group: list[_Pending]) -> None:
        """Write a group, retrying while the store is unavailable, then resolve it."""
        outcome = _Outcome()
        backoff = BACKOFF_START
        while True:
            group = [p for p in group if not p.done.cancelled()]
            if not group:
                return
            rows = [row for pending in group for row in pending.rows]
            started = time.perf_counter()
            try:
                await self._write(rows, outcome)
                break
            except Unavailable as e:
                self._metrics.store_errors.labels("write").inc()
                self.retrying = True
                await self.set_up(False, str(e))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
        self.retrying = False
        self._metrics.write_seconds.observe(time.perf_counter() - started)
        await self.set_up(True)
        new = first_new(rows, outcome.stored)
        self._account(new, len(rows) - len(new) - len(outcome.rejected))
        # Acknowledge first: the batches are durable now, and the sinks' file writes (a
        # thread and a loop turn away) would only delay every sensor of the group.
        claimed: set[str] = set()
        for pending in group:
            stored = 0
            for row in pending.rows:
                if row.hf_event_id in outcome.stored and row.hf_event_id not in claimed:
                    claimed.add(row.hf_event_id)
                    stored += 1
            rejected = sum(row.hf_event_id in outcome.rejected for row in pending.rows)
            if not pending.done.done():
                pending.done.set_result(Ack(stored, len(pending.rows) - stored - rejected))
        # One fan-out at a time, in order: a slow sink still slows the writer, so it
        # cannot fall behind without bound; a fast one overlaps the next commit.
        await self._fanned_out()
        if new:
            self._fan_out = asyncio.create_task(self._on_stored(new), name="event-fan-out")

    async def _fanned_out(self) -> None:
        """Wait for the previous group's fan-out to end; log it if it failed."""
        task = self._fan_out
        if task is None:
            return
        # wait() neither raises the task's error nor cancels it if the writer is cancelled.
        await asyncio.wait([task])
        self._fan_out = None
        if not task.cancelled() and (error := task.exception()) is not None:
            # A bug: its events are stored and acknowledged; only sinks or watchers miss them.
            log.error("event fan-out to sinks and watchers failed", exc_info=error)

    async def _write(self, rows: Sequence[EventRow], outcome: _Outcome) -> None:
        """Write rows not settled yet; isolate and reject rows the store refuses."""
        todo = [row for row in rows if row.hf_event_id not in outcome.settled]
        if not todo:
            return
        try:
            outcome.stored |= await self._store.write_batch(todo)
        except StoreDataError as e:
            if len(todo) > 1:
                middle = len(todo) // 2
                await self._write(todo[:middle], outcome)
                await self._write(todo[middle:], outcome)
                return
            row = todo[0]
            log.error(
                "sensor %s: event %s (%s, session %s) refused by the store and dropped: %s",
                row.sensor,
                row.hf_event_id,
                row.eventid,
                row.session,
                e,
            )
            self._metrics.rejected.labels("store").inc()
            outcome.rejected.add(row.hf_event_id)
        outcome.settled.update(row.hf_event_id for row in todo)

    def _account(self, new: list[EventRow], duplicates: int) -> None:
        """Metrics of one committed group."""
        self._metrics.ingested.inc(len(new))
        self._metrics.duplicates.inc(duplicates)
        now = datetime.now(UTC)
        for row in new:
            self._metrics.lag.observe(max((now - row.time).total_seconds(), 0.0))
        self._metrics.sessions_started.inc(
            sum(row.eventid == "cowrie.session.connect" for row in new)
        )

    async def set_up(self, up: bool, reason: str = "") -> None:
        """Record whether the store works; report changes."""
        if up == self.up:
            if not up:
                log.debug("event store still unavailable: %s", reason)
            return
        self.up = up
        self._metrics.store_up.set(int(up))
        if up:
            log.info(
                "event store available again after %.1fs; ingest resumes",
                time.monotonic() - self._down_since,
            )
        else:
            self._down_since = time.monotonic()
            log.warning(
                "event store unavailable, holding acknowledgements (%d batches waiting): %s",
                self._queue.qsize(),
                reason,
            )
        await self._on_state(up)
