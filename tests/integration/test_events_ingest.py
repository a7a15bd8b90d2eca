"""Event ingest into a real controller over mTLS: exactly-once storage in SQLite and PostgreSQL.

Also the helpers the other event tests share: event factories, a sensor's event stream,
and row counts read straight from each store.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from controller.events.store import EventQuery
from controller.server import Controller
from honeyfleet.events import TIMESTAMP_FORMAT, Event, make_event, new_session_id, to_proto
from honeyfleet.pki.identity import Role
from honeyfleet.tls import secure_channel
from honeyfleet.v1 import ingest_pb2, ingest_pb2_grpc
from tests.conftest import ControllerFactory, FleetPki

pytest_plugins = ["tests.postgres"]
BATCH = 500
ACK_TIMEOUT = 120
RPC_TIMEOUT = 30  # a unary query RPC, or closing a stream
DB_TIMEOUT = 60  # a direct query of the PostgreSQL store


def session_events(
    sensor: str = "edge1",
    src_ip: str = "198.51.100.7",
    *,
    username: str = "root",
    password: str = "123456",  # noqa: S107  (what the attacker tried)
    pool_node: str = "n1",
) -> list[Event]:
    """One realistic SSH session, Cowrie event ids and fields, in order."""
    session = new_session_id()
    context = {"pool_node": pool_node, "guest": "g1", "lease": "L-" + session[:6]}
    common: dict[str, Any] = {
        "session": session,
        "src_ip": src_ip,
        "sensor": sensor,
        "sensor_uuid": "edge-uuid",
        "protocol": "ssh",
    }

    def ev(eventid: str, message: str, ctx: bool = True, **fields: Any) -> Event:
        return make_event(eventid, message, context=context if ctx else None, **common, **fields)

    return [
        ev(
            "cowrie.session.connect",
            f"New connection: {src_ip}:40000 (10.0.0.1:22) [session: {session}]",
            ctx=False,
            src_port=40000,
            dst_ip="10.0.0.1",
            dst_port=22,
        ),
        ev("cowrie.client.version", "Remote SSH version: SSH-2.0-Go", False, version="SSH-2.0-Go"),
        ev(
            "cowrie.login.failed",
            f"login attempt [admin/{password}x] failed",
            False,
            username="admin",
            password=password + "x",
        ),
        ev(
            "cowrie.login.success",
            f"login attempt [{username}/{password}] succeeded",
            username=username,
            password=password,
        ),
        ev("cowrie.client.size", "Terminal Size: 80 24", width=80, height=24),
        ev("cowrie.command.input", "CMD: uname -a", input="uname -a"),
        ev(
            "cowrie.session.file_upload",
            "Uploaded file",
            filename="x.sh",
            outfile="var/lib/x",
            shasum="ab" * 32,
        ),
        ev(
            "cowrie.log.closed",
            "Closing TTY Log",
            ttylog=f"var/lib/tty/{session}.cast",
            size=1234,
            duration=3.5,
        ),
        ev("cowrie.session.closed", "Connection lost after 4.0 seconds", duration=4.0),
    ]


def bulk_events(count: int, sensor: str) -> list[Event]:
    """``count`` command events spread over sessions of 100 events."""
    out: list[Event] = []
    session = ""
    for i in range(count):
        if i % 100 == 0:
            session = new_session_id()
        out.append(
            make_event(
                "cowrie.command.input",
                f"CMD: echo {i}",
                session=session,
                src_ip=f"203.0.113.{i % 200 + 1}",
                sensor=sensor,
                sensor_uuid="edge-uuid",
                protocol="ssh",
                input=f"echo {i}",
            )
        )
    return out


def batches(events: Sequence[Event], size: int = BATCH) -> list[ingest_pb2.StreamEventsRequest]:
    """Wire batches with ids 1, 2, ..."""
    return [
        ingest_pb2.StreamEventsRequest(
            batch_id=n + 1, events=[to_proto(e) for e in events[i : i + size]]
        )
        for n, i in enumerate(range(0, len(events), size))
    ]


class SensorStream:
    """A sensor's StreamEvents call over a real mTLS channel: one batch in flight."""

    def __init__(
        self, fleet_pki: FleetPki, name: str, address: str, role: Role = Role.SENSOR
    ) -> None:
        self.channel = secure_channel(address, fleet_pki.files(role, name))
        self.call = ingest_pb2_grpc.EventIngestServiceStub(self.channel).StreamEvents()

    async def send(
        self, request: ingest_pb2.StreamEventsRequest
    ) -> ingest_pb2.StreamEventsResponse:
        """Send one batch and wait for its acknowledgement."""
        # Bounded, so a wedged store fails the test with a clear error, not the global timeout.
        async with asyncio.timeout(ACK_TIMEOUT):
            await self.call.write(request)
            ack = await self.call.read()
        assert ack is not grpc.aio.EOF
        assert ack.batch_id == request.batch_id
        return ack

    async def send_all(
        self, requests: Sequence[ingest_pb2.StreamEventsRequest]
    ) -> list[ingest_pb2.StreamEventsResponse]:
        """Send batches one after the other."""
        return [await self.send(request) for request in requests]

    async def close(self) -> None:
        """End the stream and the channel."""
        try:
            async with asyncio.timeout(RPC_TIMEOUT):
                await self.call.done_writing()
        finally:
            await self.channel.close()


async def stream_all(
    fleet_pki: FleetPki,
    address: str,
    sensor: str,
    requests: Sequence[ingest_pb2.StreamEventsRequest],
) -> list[ingest_pb2.StreamEventsResponse]:
    """Deliver batches on one stream of sensor ``sensor``."""
    stream = SensorStream(fleet_pki, sensor, address)
    try:
        return await stream.send_all(requests)
    finally:
        await stream.close()


def sqlite_counts(state_dir: Path) -> tuple[int, int]:
    """(rows, distinct uuids) in a controller's SQLite event store."""
    with sqlite3.connect(state_dir / "events.sqlite3") as db:
        rows, distinct = db.execute(
            "SELECT count(*), count(DISTINCT hf_event_id) FROM events"
        ).fetchone()
    return rows, distinct


async def postgres_counts(dsn: str) -> tuple[int, int]:
    """(rows, distinct uuids) in a PostgreSQL event store."""
    import psycopg

    async with (
        asyncio.timeout(DB_TIMEOUT),
        await psycopg.AsyncConnection.connect(dsn) as conn,
    ):
        cursor = await conn.execute("SELECT count(*), count(DISTINCT hf_event_id) FROM events")
        row = await cursor.fetchone()
    assert row is not None
    return row[0], row[1]


async def counts(controller: Controller, overrides: dict[str, Any]) -> tuple[int, int]:
    """(rows, distinct uuids) in the controller's store."""
    if overrides["store"] == "postgres":
        return await postgres_counts(overrides["postgres_dsn"])
    return sqlite_counts(controller.config.state_dir)


async def test_100k_events_from_10_streams_are_stored_exactly_once(
    store_overrides: dict[str, Any], start_controller: ControllerFactory, fleet_pki: FleetPki
) -> None:
    controller, address = await start_controller(**store_overrides)
    per_stream = {f"edge{i}": batches(bulk_events(10_000, f"edge{i}")) for i in range(10)}
    acks = await asyncio.gather(
        *(stream_all(fleet_pki, address, name, reqs) for name, reqs in per_stream.items())
    )
    assert sum(a.stored for stream in acks for a in stream) == 100_000
    assert all(a.duplicates == 0 for stream in acks for a in stream)
    assert await counts(controller, store_overrides) == (100_000, 100_000)

    # Resending a batch (a sensor that missed the ack) stores nothing new.
    again = await stream_all(fleet_pki, address, "edge3", [per_stream["edge3"][7]])
    assert (again[0].stored, again[0].duplicates) == (0, BATCH)
    assert await counts(controller, store_overrides) == (100_000, 100_000)
    metrics = controller.events.metrics
    assert metrics.ingested._value.get() == 100_000
    assert metrics.duplicates._value.get() == BATCH


async def test_bad_events_are_dropped_and_their_batch_acknowledged(
    store_overrides: dict[str, Any], start_controller: ControllerFactory, fleet_pki: FleetPki
) -> None:
    controller, address = await start_controller(**store_overrides)
    good = session_events("edge1")[:3]
    good[1]["sensor"] = "somebody-else"  # a sensor cannot speak for another
    with_nul = session_events("edge1")[5]
    with_nul["input"] = "echo \x00\x01 done"
    wire = [to_proto(e) for e in [*good, with_nul]]
    bad_json = to_proto(session_events()[0])
    bad_json.json = "{not json"
    bad_ip = session_events(src_ip="198.51.100.9")[0]
    bad_ip["src_ip"] = "not-an-address"
    nan = session_events()[0]
    nan_wire = to_proto(nan)
    nan_wire.json = nan_wire.json[:-1] + ',"duration":NaN}'
    surrogate = to_proto(session_events()[0])
    surrogate.json = surrogate.json[:-1] + ',"x":"\\ud800"}'
    long_session = session_events()[0]
    long_session["session"] = "s" * 500
    request = ingest_pb2.StreamEventsRequest(
        batch_id=1,
        events=[
            wire[0],
            bad_json,
            wire[1],
            to_proto(bad_ip),
            nan_wire,
            wire[2],
            surrogate,
            to_proto(long_session),
            wire[3],
        ],
    )
    ack = (await stream_all(fleet_pki, address, "edge1", [request]))[0]
    assert (ack.stored, ack.duplicates) == (4, 0)
    assert await counts(controller, store_overrides) == (4, 4)
    metrics = controller.events.metrics
    assert metrics.rejected.labels("validation")._value.get() == 5
    assert metrics.sensor_rewritten._value.get() == 1

    # Stored as sent, except the sensor, which is the certificate's name.
    admin = fleet_pki.files(Role.ADMIN, "alice")
    from honeyfleet.v1 import events_pb2, events_pb2_grpc

    async with secure_channel(address, admin) as channel:
        stub = events_pb2_grpc.EventQueryServiceStub(channel)
        listed = await stub.ListEvents(events_pb2.ListEventsRequest(), timeout=RPC_TIMEOUT)
    stored = {e.hf_event_id: json.loads(e.json) for e in listed.events}
    for event in [*good, with_nul]:
        assert stored[str(uuid.UUID(event["hf_event_id"]))] == {**event, "sensor": "edge1"}
    assert stored[with_nul["hf_event_id"]]["input"] == "echo \x00\x01 done"


async def test_a_sensor_cannot_call_the_query_api_nor_an_admin_ingest(
    start_controller: ControllerFactory, fleet_pki: FleetPki
) -> None:
    _, address = await start_controller()
    from honeyfleet.v1 import events_pb2, events_pb2_grpc

    async with secure_channel(address, fleet_pki.files(Role.SENSOR, "edge1")) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await events_pb2_grpc.EventQueryServiceStub(channel).ListSessions(
                events_pb2.ListSessionsRequest(), timeout=RPC_TIMEOUT
            )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    stream = SensorStream(fleet_pki, "alice", address)
    stream.channel = secure_channel(address, fleet_pki.files(Role.ADMIN, "alice"))
    stream.call = ingest_pb2_grpc.EventIngestServiceStub(stream.channel).StreamEvents()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stream.send(batches(session_events())[0])
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    await stream.channel.close()


@pytest.mark.postgres
async def test_an_event_the_store_refuses_is_isolated_and_dropped(
    postgres_dsn: str, start_controller: ControllerFactory, fleet_pki: FleetPki
) -> None:
    import psycopg

    controller, address = await start_controller(store="postgres", postgres_dsn=postgres_dsn)
    async with (
        asyncio.timeout(DB_TIMEOUT),
        await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn,
    ):
        # A real refusal from the real server, for one row only.
        await conn.execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.eventid = 'test.refused' THEN "
            "RAISE EXCEPTION 'refused' USING ERRCODE = 'data_exception'; END IF; "
            "RETURN NEW; END $$"
        )
        await conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION refuse()"
        )
    events = session_events("edge1")
    events[4]["eventid"] = "test.refused"
    ack = (await stream_all(fleet_pki, address, "edge1", batches(events)))[0]
    assert (ack.stored, ack.duplicates) == (8, 0)
    assert await postgres_counts(postgres_dsn) == (8, 8)
    assert controller.events.metrics.rejected.labels("store")._value.get() == 1
    summary = await controller.events.store.get_session(events[0]["session"])
    assert summary is not None and summary.event_count == 8


async def test_events_from_the_far_future_are_dropped_and_their_batch_acknowledged(
    store_overrides: dict[str, Any], start_controller: ControllerFactory, fleet_pki: FleetPki
) -> None:
    controller, address = await start_controller(**store_overrides)
    events = session_events("edge1")
    now = datetime.now(UTC)
    skewed, ahead = events[2], events[5]
    skewed["timestamp"] = (now + timedelta(hours=12)).strftime(TIMESTAMP_FORMAT)  # clock skew
    far = now + timedelta(days=30)  # a broken or lying sensor clock
    ahead["timestamp"] = far.strftime(TIMESTAMP_FORMAT)
    ack = (await stream_all(fleet_pki, address, "edge1", batches(events)))[0]
    # Acknowledged, so the sensor drops it from its spool instead of resending forever.
    assert (ack.stored, ack.duplicates) == (len(events) - 1, 0)
    assert await counts(controller, store_overrides) == (len(events) - 1, len(events) - 1)
    assert controller.events.metrics.rejected.labels("validation")._value.get() == 1
    listed = await controller.events.store.list_events(EventQuery(limit=100))
    assert ahead["hf_event_id"] not in {e.hf_event_id for e in listed}
    assert skewed["hf_event_id"] in {e.hf_event_id for e in listed}
    if store_overrides["store"] == "postgres":
        import psycopg

        async with (
            asyncio.timeout(DB_TIMEOUT),
            await psycopg.AsyncConnection.connect(store_overrides["postgres_dsn"]) as conn,
        ):
            cursor = await conn.execute(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = 'events'::regclass"
            )
            partitions = {name for (name,) in await cursor.fetchall()}
        assert f"events_p{far:%Y%m%d}" not in partitions


@pytest.mark.postgres
async def test_a_postgres_store_made_before_hf_event_id_keeps_its_events_unique(
    postgres_dsn: str,
) -> None:
    import psycopg

    from controller.events import postgres_sql
    from controller.events.postgres_store import PostgresEventStore
    from controller.events.validate import to_row

    [old], [new] = (
        [to_row(to_proto(e), "edge1")[0] for e in bulk_events(1, "edge1")] for _ in "ab"
    )
    async with (
        asyncio.timeout(DB_TIMEOUT),
        await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn,
    ):
        # Versions 1 and 2, as shipped: the delivery id was "uuid".
        await conn.execute(postgres_sql.MIGRATIONS_TABLE)
        for version, script in enumerate(postgres_sql.MIGRATIONS[:2], start=1):
            await conn.execute(script)
            await conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
        await conn.execute(
            "INSERT INTO events (uuid, time, sensor, session, eventid, src_ip, protocol, event)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s::jsonb)",
            (old.hf_event_id, old.time, old.sensor, old.session, old.eventid, old.src_ip,
             old.protocol, old.json),
        )  # fmt: skip
    store = PostgresEventStore(postgres_dsn)
    await store.open()
    try:
        async with asyncio.timeout(DB_TIMEOUT):
            assert await store.write_batch([old, new]) == {new.hf_event_id}
    finally:
        await store.close()
