"""Ingest under overload and against a greedy sensor: refusals with a retry hint, never a hang.

A real controller over mTLS; the store is held busy by the test itself (an exclusive
SQLite write lock, or a PostgreSQL table lock), so batches really wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from controller.server import Controller
from honeyfleet.errors import RETRY_AFTER_TRAILER
from honeyfleet.pki.identity import Role
from honeyfleet.spool import Spool
from honeyfleet.uploader import Uploader
from tests.conftest import ControllerFactory, FleetPki, until
from tests.integration.test_events_ingest import (
    ACK_TIMEOUT,
    DB_TIMEOUT,
    SensorStream,
    batches,
    bulk_events,
    counts,
)

pytest_plugins = ["tests.postgres"]


@contextlib.asynccontextmanager
async def store_held(controller: Controller, overrides: dict[str, Any]) -> AsyncIterator[None]:
    """Keep the controller's store from committing while the context lasts."""
    if overrides["store"] == "postgres":
        import psycopg

        async with (
            asyncio.timeout(DB_TIMEOUT),
            await psycopg.AsyncConnection.connect(overrides["postgres_dsn"]) as conn,
        ):
            await conn.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
            yield
            await conn.rollback()
        return
    db = sqlite3.connect(controller.config.state_dir / "events.sqlite3", isolation_level=None)
    try:
        db.execute("BEGIN EXCLUSIVE")
        yield
        db.execute("ROLLBACK")
    finally:
        db.close()


async def until_writer_waits(controller: Controller, overrides: dict[str, Any]) -> None:
    """Wait until the writer holds a batch it cannot commit (the store is held)."""
    if overrides["store"] == "sqlite":
        # SQLite gives up after its busy timeout; the writer then retries.
        await until(lambda: controller.events.writer.retrying, timeout=ACK_TIMEOUT)
        return
    import psycopg

    async with asyncio.timeout(DB_TIMEOUT):
        conn = await psycopg.AsyncConnection.connect(overrides["postgres_dsn"], autocommit=True)
        async with conn:
            while True:
                cursor = await conn.execute("SELECT count(*) FROM pg_locks WHERE NOT granted")
                row = await cursor.fetchone()
                if row and row[0]:
                    return
                await asyncio.sleep(0.05)


def gauge(controller: Controller, name: str) -> float:
    """A gauge of the controller's event metrics, as scraped."""
    return controller.events.metrics_registry.get_sample_value(name) or 0.0


def shed(controller: Controller, reason: str) -> float:
    """honeyfleet_ingest_shed_total for a reason, as scraped."""
    value = controller.events.metrics_registry.get_sample_value(
        "honeyfleet_ingest_shed_total", {"reason": reason}
    )
    return value or 0.0


@dataclass(frozen=True)
class Refusal:
    """How a stream was refused."""

    details: str
    retry_after_ms: int


async def refused(stream: SensorStream, request: Any) -> Refusal:
    """Send a batch that must be refused with RESOURCE_EXHAUSTED and a retry hint."""
    # The refusal may end the call before the batch is even written.
    with pytest.raises((grpc.aio.AioRpcError, asyncio.InvalidStateError)):
        await stream.send(request)
    call = stream.call
    assert await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, await call.details()
    trailers = await call.trailing_metadata() or ()
    hints = [int(v) for k, v in trailers if k == RETRY_AFTER_TRAILER]
    assert hints, f"no {RETRY_AFTER_TRAILER} trailer: {trailers}"
    return Refusal(await call.details() or "", hints[0])


async def test_a_sensor_gets_a_bounded_number_of_event_streams(
    start_controller: ControllerFactory, fleet_pki: FleetPki
) -> None:
    controller, address = await start_controller(ingest_streams_per_sensor=2)
    events = bulk_events(4, "edge1")
    streams: list[SensorStream] = []
    other = SensorStream(fleet_pki, "edge2", address)
    try:
        for n in range(3):
            # One at a time: a call starts (and counts) when it is made.
            streams.append(SensorStream(fleet_pki, "edge1", address))
            if n < 2:
                await streams[n].send(batches(events[n : n + 1])[0])
        error = await refused(streams[2], batches(events[2:3])[0])
        assert "already has 2 event streams open" in (error.details)
        assert error.retry_after_ms == 2000
        assert shed(controller, "sensor_streams") == 1
        # Another sensor is not affected; and a closed stream frees its place.
        await other.send(batches(bulk_events(1, "edge2"))[0])
        await streams[0].close()
        await until(lambda: gauge(controller, "honeyfleet_ingest_streams") == 2)
        again = SensorStream(fleet_pki, "edge1", address)
        streams.append(again)
        assert (await again.send(batches(events[3:4])[0])).stored == 1
    finally:
        for stream in [*streams, other]:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await stream.close()


async def test_a_sensor_cannot_hold_more_unacknowledged_bytes_than_its_quota(
    store_overrides: dict[str, Any], start_controller: ControllerFactory, fleet_pki: FleetPki
) -> None:
    controller, address = await start_controller(**store_overrides, ingest_bytes_per_sensor=20_000)
    first, second = (
        SensorStream(fleet_pki, "edge1", address),
        SensorStream(fleet_pki, "edge1", address),
    )
    events = bulk_events(100, "edge1")  # ~30 KB: two batches of 50 are over the quota
    held = batches(events[:50], 50)[0]
    try:
        async with store_held(controller, store_overrides):
            pending = asyncio.create_task(first.send(held))
            await until_writer_waits(controller, store_overrides)
            error = await refused(second, batches(events[50:], 50)[0])
            assert "bytes of events unacknowledged (limit 20000)" in (error.details)
            assert shed(controller, "sensor_bytes") == 1
        # The held batch is stored once the store is free; the sensor resends the other.
        assert (await asyncio.wait_for(pending, ACK_TIMEOUT)).stored == 50
        retry = SensorStream(fleet_pki, "edge1", address)
        assert (await retry.send(batches(events[50:], 50)[0])).stored == 50
        await retry.close()
        assert await counts(controller, store_overrides) == (100, 100)
    finally:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await first.close()


async def test_a_full_queue_answers_resource_exhausted_in_time_and_loses_nothing(
    store_overrides: dict[str, Any], start_controller: ControllerFactory, fleet_pki: FleetPki
) -> None:
    controller, address = await start_controller(
        **store_overrides,
        ingest_queue_batches=1,
        ingest_shed_after=0.5,
        ingest_retry_after=3.0,
        # edge2's batch must wait in the queue, not join edge1's in the writer's window.
        store_commit_window=0.0,
    )
    names = ["edge1", "edge2", "edge3"]
    work = {name: batches(bulk_events(20, name)) for name in names}
    streams = {name: SensorStream(fleet_pki, name, address) for name in names}
    try:
        async with store_held(controller, store_overrides):
            # edge1's batch is in the writer's hands, edge2's fills the queue ...
            writing = asyncio.create_task(streams["edge1"].send(work["edge1"][0]))
            await until_writer_waits(controller, store_overrides)
            queued = asyncio.create_task(streams["edge2"].send(work["edge2"][0]))
            await until(lambda: gauge(controller, "honeyfleet_ingest_queue_batches") == 1)
            # ... so edge3 hears "later" after ingest_shed_after, not after the store.
            error = await refused(streams["edge3"], work["edge3"][0])
            assert error.retry_after_ms == 3000
            assert "the event store is behind" in (error.details)
            assert shed(controller, "queue") == 1
        acks = await asyncio.wait_for(asyncio.gather(writing, queued), ACK_TIMEOUT)
        assert [a.stored for a in acks] == [20, 20]
        # edge3 comes back with the batch it was not acknowledged, on a new stream.
        again = SensorStream(fleet_pki, "edge3", address)
        assert (await again.send(work["edge3"][0])).stored == 20
        await again.close()
        assert await counts(controller, store_overrides) == (60, 60)
    finally:
        for name in ("edge1", "edge2"):
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await streams[name].close()


async def test_a_sensor_refused_a_stream_waits_for_the_hint_then_delivers_once(
    start_controller: ControllerFactory,
    fleet_pki: FleetPki,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    controller, address = await start_controller(
        ingest_streams_per_sensor=1, ingest_retry_after=1.5
    )
    # Someone holding edge1's key already has its one event stream open.
    holder = SensorStream(fleet_pki, "edge1", address)
    await holder.send(batches(bulk_events(1, "edge1"))[0])
    spool = Spool(tmp_path / "spool.sqlite3", max_bytes=10_000_000, near_full=0.9)
    sent = bulk_events(3, "edge1")
    for event in sent:
        assert spool.append(event)
    await spool.flush()
    tls = fleet_pki.files(Role.SENSOR, "edge1")
    task = asyncio.create_task(Uploader(spool, address, tls, batch=10).run())
    try:
        await until(lambda: shed(controller, "sensor_streams") >= 1)
        await holder.close()
        await until(lambda: spool.count == 0)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        spool.close()
    waits = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert waits and all("RESOURCE_EXHAUSTED" in w for w in waits), waits
    assert all(float(w.rpartition("retrying in ")[2].rstrip("s")) >= 1.5 for w in waits)
    assert await counts(controller, {"store": "sqlite"}) == (4, 4)


async def test_a_fleet_shed_by_a_full_queue_backs_off_with_jitter_and_loses_nothing(
    start_controller: ControllerFactory,
    fleet_pki: FleetPki,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Many real uploaders against a queue with room for one batch: refusals are counted,
    each carries the hint, sensors wait at least that long (not all alike), and every
    event ends up stored exactly once, none resent after its acknowledgement."""
    controller, address = await start_controller(
        ingest_queue_batches=1,
        ingest_shed_after=0.2,
        ingest_retry_after=1.0,
        store_commit_window=0.0,
    )
    names = [f"edge{n}" for n in range(12)]
    spools = []
    for name in names:
        spool = Spool(tmp_path / f"{name}.sqlite3", max_bytes=10_000_000, near_full=0.9)
        for event in bulk_events(40, name):
            assert spool.append(event)
        await spool.flush()
        spools.append(spool)
    uploaders = [
        asyncio.create_task(
            Uploader(spool, address, fleet_pki.files(Role.SENSOR, name), batch=5).run()
        )
        for name, spool in zip(names, spools, strict=True)
    ]
    try:
        # The held store fills the queue; every other sensor's batch is refused.
        async with store_held(controller, {"store": "sqlite"}):
            await until(lambda: shed(controller, "queue") >= 3)
        await until(lambda: all(spool.count == 0 for spool in spools), timeout=60)
    finally:
        for task in uploaders:
            task.cancel()
        for task in uploaders:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for spool in spools:
            spool.close()
    waits = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert waits and all("RESOURCE_EXHAUSTED" in w for w in waits), waits
    delays = [float(w.rpartition("retrying in ")[2].rstrip("s")) for w in waits]
    assert min(delays) >= 1.0
    assert len(set(delays)) > 1, "refused sensors must not all come back at once"
    assert await counts(controller, {"store": "sqlite"}) == (480, 480)
    assert controller.events.metrics.duplicates._value.get() == 0
