"""The event writer's group commit against a real SQLite store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from controller.events.metrics import EventMetrics
from controller.events.rows import EventRow
from controller.events.sqlite_store import SqliteEventStore
from controller.events.writer import Ack, BatchWriter
from tests.unit.test_events_store import commands, rows

# Far longer than the test's own pause between batches: the second batch joins the first's
# transaction however slow the machine is.
WINDOW = 3.0
ACK_TIMEOUT = 60.0


async def _nothing(_: object) -> None:
    """A callback with nothing to do."""


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteEventStore]:
    """An empty SQLite event store."""
    opened = SqliteEventStore(tmp_path / "events.sqlite3")
    await opened.open()
    yield opened
    await opened.close()


class HeldSink:
    """A sink that holds its writes until the test releases it, and counts their events."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.sunk: list[int] = []

    async def write(self, new: list[EventRow]) -> None:
        """Wait for the release, then record how many events came."""
        await self.release.wait()
        self.sunk.append(len(new))


def _writer(
    store: SqliteEventStore,
    registry: CollectorRegistry,
    window: float,
    on_stored: Callable[[list[EventRow]], Awaitable[None]],
) -> BatchWriter:
    """A writer on ``store`` with room for 8 batches and the given commit window and sink."""
    return BatchWriter(
        store,
        EventMetrics(registry),
        max_pending=8,
        max_commit_events=1000,
        commit_window=window,
        shed_after=10.0,
        retry_after=1.0,
        on_stored=on_stored,
        on_state=_nothing,
    )


async def _commits(store: SqliteEventStore, window: float) -> float:
    """Transactions a writer with ``window`` uses for two one-event batches, the second
    arriving once the writer has taken the first (a fleet's trickle)."""
    registry = CollectorRegistry()
    writer = _writer(store, registry, window, _nothing)
    runner = asyncio.create_task(writer.run())
    try:
        first = asyncio.create_task(writer.write(rows(commands(1))))
        await asyncio.sleep(0.05)  # the writer takes the first batch off the queue
        second = asyncio.create_task(writer.write(rows(commands(1))))
        async with asyncio.timeout(ACK_TIMEOUT):
            acks = await asyncio.gather(first, second)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    assert acks == [Ack(1, 0), Ack(1, 0)]
    commits = registry.get_sample_value("honeyfleet_store_write_seconds_count")
    assert commits is not None
    return commits


async def test_a_batch_that_arrives_within_the_window_shares_the_transaction(
    store: SqliteEventStore,
) -> None:
    assert await _commits(store, WINDOW) == 1


async def test_without_a_window_each_batch_commits_at_once(store: SqliteEventStore) -> None:
    assert await _commits(store, 0.0) == 2


async def test_a_batch_is_acknowledged_before_the_sinks_have_its_events(
    store: SqliteEventStore,
) -> None:
    sink = HeldSink()
    writer = _writer(store, CollectorRegistry(), 0.0, sink.write)
    runner = asyncio.create_task(writer.run())
    try:
        async with asyncio.timeout(ACK_TIMEOUT):
            first = await writer.write(rows(commands(3)))
        assert first == Ack(3, 0)
        assert sink.sunk == []  # durable and acknowledged; the sink is still writing
        second = asyncio.create_task(writer.write(rows(commands(2))))
        sink.release.set()
        async with asyncio.timeout(ACK_TIMEOUT):
            assert await second == Ack(2, 0)
        async with asyncio.timeout(ACK_TIMEOUT):
            while len(sink.sunk) < 2:
                await asyncio.sleep(0.01)
        assert sink.sunk == [3, 2]  # every stored event reached the sink once, in order
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_the_window_counts_from_when_the_batch_was_queued(store: SqliteEventStore) -> None:
    # A batch that already waited a window (here: before the writer ran; in production,
    # behind a slow commit or a busy event loop) is committed as the writer gets to it,
    # not held a further window: a batch arriving soon after goes in a transaction of
    # its own.
    registry = CollectorRegistry()
    writer = _writer(store, registry, WINDOW, _nothing)
    old = asyncio.create_task(writer.write(rows(commands(1))))
    await asyncio.sleep(WINDOW + 0.5)
    runner = asyncio.create_task(writer.run())
    try:
        await asyncio.sleep(WINDOW / 3)
        late = asyncio.create_task(writer.write(rows(commands(1))))
        async with asyncio.timeout(ACK_TIMEOUT):
            assert await asyncio.gather(old, late) == [Ack(1, 0), Ack(1, 0)]
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    assert registry.get_sample_value("honeyfleet_store_write_seconds_count") == 2


async def test_the_next_batch_commits_while_the_sinks_still_write_the_last(
    store: SqliteEventStore,
) -> None:
    sink = HeldSink()
    writer = _writer(store, CollectorRegistry(), 0.0, sink.write)
    runner = asyncio.create_task(writer.run())
    try:
        async with asyncio.timeout(ACK_TIMEOUT):
            assert await writer.write(rows(commands(3))) == Ack(3, 0)
            assert await writer.write(rows(commands(2))) == Ack(2, 0)
        assert sink.sunk == []  # both durable and acknowledged; the sink still has the first
        sink.release.set()
        async with asyncio.timeout(ACK_TIMEOUT):
            while len(sink.sunk) < 2:
                await asyncio.sleep(0.01)
        assert sink.sunk == [3, 2]
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_stopping_the_writer_lets_the_last_fan_out_finish(store: SqliteEventStore) -> None:
    sink = HeldSink()
    writer = _writer(store, CollectorRegistry(), 0.0, sink.write)
    runner = asyncio.create_task(writer.run())
    async with asyncio.timeout(ACK_TIMEOUT):
        assert await writer.write(rows(commands(3))) == Ack(3, 0)
    runner.cancel()
    await asyncio.sleep(0)
    assert not runner.done()  # waiting for the sink, which has the stored events
    sink.release.set()
    await asyncio.gather(runner, return_exceptions=True)
    assert sink.sunk == [3]
