"""The event spool and its uploader against a real gRPC ingest server with real certificates.

The ingest side is a small recording subclass of the generated servicer: it stores each
event uuid once, acknowledges each batch after recording it, and can be stopped and
started again on the same port to play a controller outage. (The same outage against
the real controller is in test_sensor_outage.py.)
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from honeyfleet.errors import RETRY_AFTER_TRAILER
from honeyfleet.events import Event, from_proto, make_event, to_json, to_proto
from honeyfleet.pki.identity import Role
from honeyfleet.spool import Spool
from honeyfleet.tls import server_credentials
from honeyfleet.uploader import Uploader
from honeyfleet.v1 import ingest_pb2, ingest_pb2_grpc
from tests.conftest import FleetPki, until
from tests.tinydisk import TinyDisks, fill


class RecordingIngest(ingest_pb2_grpc.EventIngestServiceServicer):
    """Records every event it receives (uuid -> times seen) and acks each batch."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    async def StreamEvents(
        self, request_iterator: AsyncIterator[ingest_pb2.StreamEventsRequest], context: Any
    ) -> AsyncIterator[ingest_pb2.StreamEventsResponse]:
        """Store, then acknowledge."""
        async for batch in request_iterator:
            stored = duplicates = 0
            for event in batch.events:
                if event.hf_event_id in self.seen:
                    duplicates += 1
                else:
                    stored += 1
                self.seen[event.hf_event_id] = self.seen.get(event.hf_event_id, 0) + 1
            yield ingest_pb2.StreamEventsResponse(
                batch_id=batch.batch_id, stored=stored, duplicates=duplicates
            )


async def serve_ingest(
    fleet_pki: FleetPki, ingest: RecordingIngest, port: int = 0
) -> tuple[grpc.aio.Server, int]:
    """A TLS ingest server on 127.0.0.1."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    ingest_pb2_grpc.add_EventIngestServiceServicer_to_server(ingest, server)
    bound = server.add_secure_port(
        f"127.0.0.1:{port}", server_credentials(fleet_pki.files(Role.CONTROLLER, "ctl"))
    )
    await server.start()
    return server, bound


def event(n: int) -> Event:
    """A small event."""
    return make_event(
        "cowrie.command.input", f"CMD: {n}", session="s", src_ip="192.0.2.1", sensor="t",
        sensor_uuid="t-uuid", protocol="ssh", input=str(n),
    )  # fmt: skip


def stored_uuids(path: Path) -> list[str]:
    """The uuids in a spool file, in order, read through a connection of our own."""
    with sqlite3.connect(path) as db:
        return [row[0] for row in db.execute("SELECT hf_event_id FROM events ORDER BY seq")]


async def stop_task(task: asyncio.Task[Any]) -> None:
    """Cancel a task and wait (bounded) until it has really ended."""
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=10)
    assert done and task.cancelled(), "the task ignored its cancellation"


async def test_outage_and_restart_lose_nothing_and_deliver_each_event_once(
    fleet_pki: FleetPki, tmp_path: Path
) -> None:
    ingest = RecordingIngest()
    server, port = await serve_ingest(fleet_pki, ingest)
    spool = Spool(tmp_path / "spool.sqlite3", max_bytes=10_000_000, near_full=0.9)
    tls = fleet_pki.files(Role.SENSOR, "sensor-1")
    uploader = Uploader(spool, f"127.0.0.1:{port}", tls, batch=7)
    task = asyncio.create_task(uploader.run())
    sent = [event(n) for n in range(200)]
    try:
        for e in sent[:50]:
            assert spool.append(e)
        await until(lambda: len(ingest.seen) == 50)
        await server.stop(grace=0)  # the controller goes away while sessions go on
        for e in sent[50:150]:
            assert spool.append(e)
        await spool.flush()
        await until(lambda: not uploader.connected.is_set())
        assert spool.count >= 100
        # The sensor restarts too: a new spool object and uploader on the same file.
        await stop_task(task)
        spool.close()
        spool = Spool(tmp_path / "spool.sqlite3", max_bytes=10_000_000, near_full=0.9)
        assert spool.count >= 100
        for e in sent[150:]:
            spool.append(e)
        server, _ = await serve_ingest(fleet_pki, ingest, port)
        uploader = Uploader(spool, f"127.0.0.1:{port}", tls, batch=7)
        task = asyncio.create_task(uploader.run())
        await until(lambda: spool.count == 0)
    finally:
        await stop_task(task)
        spool.close()
        await server.stop(grace=0)
    assert set(ingest.seen) == {e["hf_event_id"] for e in sent}
    assert all(times == 1 for times in ingest.seen.values())


async def test_appends_are_durable_before_they_are_mirrored_and_survive_a_reopen(
    tmp_path: Path,
) -> None:
    path = tmp_path / "spool.sqlite3"
    mirrored: list[str] = []
    committed_first: list[bool] = []

    def mirror(events: list[Event]) -> None:
        # Runs on the spool's thread after the commit: another connection sees them.
        on_disk = set(stored_uuids(path))
        committed_first.extend(e["hf_event_id"] in on_disk for e in events)
        mirrored.extend(e["hf_event_id"] for e in events)

    spool = Spool(path, max_bytes=10_000_000, near_full=0.9, mirror=mirror)
    sent = [event(n) for n in range(300)]
    for e in sent:
        assert spool.append(e)
    await spool.flush()
    uuids = [e["hf_event_id"] for e in sent]
    assert stored_uuids(path) == uuids
    assert mirrored == uuids and all(committed_first)
    oldest = await spool.oldest(limit=10, max_bytes=1 << 20)
    assert [item.event["hf_event_id"] for item in oldest] == uuids[:10]
    await spool.delete(oldest)
    spool.close()
    reopened = Spool(path, max_bytes=10_000_000, near_full=0.9)
    try:
        assert reopened.count == 290
        assert [item.event for item in await reopened.oldest(limit=1, max_bytes=1)] == [sent[10]]
    finally:
        reopened.close()


async def test_spool_refuses_sessions_near_full_and_drops_only_past_the_bound(
    tmp_path: Path,
) -> None:
    one = len(repr(event(0)))
    spool = Spool(tmp_path / "s.sqlite3", max_bytes=one * 10, near_full=0.5)
    try:
        for _ in range(100):  # bounded: the spool must fill well before this
            if spool.near_full:
                break
            assert spool.append(event(0))
        assert spool.near_full
        kept = spool.count
        for _ in range(100):
            if not spool.append(event(1)):
                break
        assert spool.count > kept and spool.dropped == 1
        assert spool.bytes <= spool.max_bytes
        await spool.flush()
        assert len(stored_uuids(tmp_path / "s.sqlite3")) == spool.count
    finally:
        spool.close()


async def test_uploader_stops_when_cancelled_just_as_the_spool_changes(
    fleet_pki: FleetPki, tmp_path: Path
) -> None:
    """Cancelling the idle uploader right as new events wake it must still stop it.

    Python 3.11's ``asyncio.wait_for`` drops a cancellation that arrives in the loop
    iterations between the awaited thing completing and the waiter resuming; an uploader
    built on it outlived ``Sensor.stop()`` and hung the test run. The cancellation is
    tried at each of the first few iterations after the wake-up.
    """
    ingest = RecordingIngest()
    server, port = await serve_ingest(fleet_pki, ingest)
    spool = Spool(tmp_path / "spool.sqlite3", max_bytes=10_000_000, near_full=0.9)
    tls = fleet_pki.files(Role.SENSOR, "sensor-1")
    try:
        for delay in range(6):
            uploader = Uploader(spool, f"127.0.0.1:{port}", tls, batch=7)
            task = asyncio.create_task(uploader.run())
            async with asyncio.timeout(10):
                await uploader.connected.wait()
            await asyncio.sleep(0.3)  # into its idle wait for new events
            spool.changed.set()
            for _ in range(delay):
                await asyncio.sleep(0)
            await stop_task(task)
    finally:
        spool.close()
        await server.stop(grace=0)


class SheddingIngest(RecordingIngest):
    """Acknowledges the first batch of its first stream, then refuses the second with
    RESOURCE_EXHAUSTED and a retry hint; later streams are served normally."""

    def __init__(self, retry_after_ms: int) -> None:
        super().__init__()
        self.retry_after_ms = retry_after_ms
        self.calls: list[list[list[str]]] = []  # per stream, the uuids of each batch

    async def StreamEvents(
        self, request_iterator: AsyncIterator[ingest_pb2.StreamEventsRequest], context: Any
    ) -> AsyncIterator[ingest_pb2.StreamEventsResponse]:
        """Record each batch; shed on the first stream's second batch."""
        received: list[list[str]] = []
        self.calls.append(received)
        first = len(self.calls) == 1
        async for batch in request_iterator:
            received.append([e.hf_event_id for e in batch.events])
            if first and len(received) == 2:
                context.set_trailing_metadata(((RETRY_AFTER_TRAILER, str(self.retry_after_ms)),))
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy")
            for event in batch.events:
                self.seen[event.hf_event_id] = self.seen.get(event.hf_event_id, 0) + 1
            yield ingest_pb2.StreamEventsResponse(batch_id=batch.batch_id, stored=len(batch.events))


async def test_a_refusal_resends_only_the_unacknowledged_batch_after_the_hint(
    fleet_pki: FleetPki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ingest = SheddingIngest(retry_after_ms=1500)
    server, port = await serve_ingest(fleet_pki, ingest)
    spool = Spool(tmp_path / "spool.sqlite3", max_bytes=10_000_000, near_full=0.9)
    tls = fleet_pki.files(Role.SENSOR, "sensor-1")
    sent = [event(n) for n in range(7)]
    for e in sent:
        assert spool.append(e)
    await spool.flush()
    uploader = Uploader(spool, f"127.0.0.1:{port}", tls, batch=3)
    task = asyncio.create_task(uploader.run())
    try:
        await until(lambda: spool.count == 0)
    finally:
        await stop_task(task)
        spool.close()
        await server.stop(grace=0)
    uuids = [e["hf_event_id"] for e in sent]
    # First stream: batch 1 acknowledged (and gone from the spool), batch 2 refused.
    assert ingest.calls[0] == [uuids[0:3], uuids[3:6]]
    # The reconnect resends batch 2, never batch 1, then the rest.
    assert ingest.calls[1] == [uuids[3:6], uuids[6:7]]
    assert ingest.seen == dict.fromkeys(uuids, 1)
    waits = [r.getMessage() for r in caplog.records if "RESOURCE_EXHAUSTED" in r.getMessage()]
    assert len(waits) == 1
    assert float(waits[0].rpartition("retrying in ")[2].rstrip("s")) >= 1.5


async def test_a_full_disk_refuses_sessions_and_loses_no_accepted_event(
    tiny_disks: TinyDisks, tmp_path: Path
) -> None:
    disk = tiny_disks.mount(tmp_path / "disk", 4 * 1024 * 1024)
    path = disk / "spool.sqlite3"
    spool = Spool(path, max_bytes=100_000_000, near_full=0.9, reserve_bytes=1024 * 1024)
    try:
        assert not spool.near_full and not spool.full
        for n in range(10):
            assert spool.append(event(n))
        await spool.flush()
        # Something else fills the disk: the spool's own room is all that is left.
        filler = fill(disk)
        await spool.flush()
        for n in range(10, 20):
            assert spool.append(event(n))
        await spool.flush()
        assert spool.near_full, "a disk with less free space than the reserve is near full"
        # More events than the disk has room for, even with the reserve: each one accepted
        # is committed into the reserve's room or kept until the disk has room again;
        # none is dropped, and a flush does not hang on a disk that stays full. (The WAL
        # the full disk kept must leave room for the reserve once delivered: sized so.)
        for n in range(20, 4520):
            assert spool.append(event(n))
            if n % 200 == 0:
                await spool.flush()  # commit as sessions do, a few events at a time
        await spool.flush()
        assert spool.full and spool.near_full
        assert spool.dropped == 0 and spool.count == 4520
        assert len(stored_uuids(path)) < 4520, "the disk was not filled"
        # The disk has room again: what was kept is committed, then delivered, and the
        # reserve comes back.
        filler.unlink()
        await until(lambda: not spool.stalled, 60)
        await spool.flush()
        assert len(stored_uuids(path)) == 4520
        await spool.delete(await spool.oldest(limit=6000, max_bytes=1 << 30))
        assert not spool.full and not spool.near_full
        assert spool.reserve_path.stat().st_size == 1024 * 1024
    finally:
        await spool.stop()
        spool.close()


async def test_events_spooled_by_an_older_sensor_are_sent_with_their_delivery_id(
    tmp_path: Path,
) -> None:
    path = tmp_path / "spool.sqlite3"
    old = event(1)
    old["uuid"] = old.pop("hf_event_id")  # what sensors wrote before hf_event_id
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, uuid TEXT NOT NULL,"
            " json TEXT NOT NULL)"
        )
        db.execute("INSERT INTO events (uuid, json) VALUES (?, ?)", (old["uuid"], to_json(old)))
    db.close()
    spool = Spool(path, max_bytes=100_000_000, near_full=0.9)
    try:
        [sent] = await spool.oldest(10, 1 << 20)
        assert sent.event["hf_event_id"] == old["uuid"]
        assert from_proto(to_proto(sent.event, sent.text)) == sent.event
        assert spool.append(event(2))
        await spool.flush()
        assert stored_uuids(path)[0] == old["uuid"] and len(stored_uuids(path)) == 2
        await spool.delete(await spool.oldest(10, 1 << 20))
        assert spool.count == 0 and spool.bytes == 0
    finally:
        await spool.stop()
        spool.close()
