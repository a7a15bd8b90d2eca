"""Ingest validation and the SQLite event store on their own (a real database file)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from controller.events import postgres_sql, query, sqlite_sql
from controller.events.query import Statement
from controller.events.rows import EventRow
from controller.events.sqlite_store import SqliteEventStore
from controller.events.store import EventQuery, SessionQuery
from controller.events.validate import MAX_FUTURE, to_row
from honeyfleet.errors import InvalidArgument
from honeyfleet.events import (
    TIMESTAMP_FORMAT,
    Event,
    make_event,
    new_session_id,
    to_json,
    to_proto,
)


def commands(count: int, *, at: datetime | None = None) -> list[Event]:
    """``count`` command events of one session, all at ``at`` (default: now)."""
    session = new_session_id()
    events = [
        make_event(
            "cowrie.command.input",
            f"CMD: echo {i}",
            session=session,
            src_ip="198.51.100.3",
            sensor="edge1",
            sensor_uuid="9d1c2a52-0000-4000-8000-000000000001",
            protocol="ssh",
            input=f"echo {i}",
        )
        for i in range(count)
    ]
    if at is not None:
        for event in events:
            event["timestamp"] = at.strftime(TIMESTAMP_FORMAT)
    return events


def rows(events: list[Event]) -> list[EventRow]:
    """Validated rows of events sent by edge1."""
    return [to_row(to_proto(event), "edge1")[0] for event in events]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteEventStore]:
    """A SQLite event store keeping three days of events."""
    opened = SqliteEventStore(tmp_path / "events.sqlite3", retention_days=3)
    await opened.open()
    yield opened
    await opened.close()


def test_events_from_further_ahead_than_clock_skew_are_refused_naming_the_field() -> None:
    now = datetime(2025, 3, 1, 12, tzinfo=UTC)
    skewed = to_proto(commands(1, at=now + MAX_FUTURE)[0])
    assert to_row(skewed, "edge1", now=now)[0].time == now + MAX_FUTURE
    ahead = to_proto(commands(1, at=now + MAX_FUTURE + timedelta(milliseconds=1))[0])
    with pytest.raises(InvalidArgument) as e:
        to_row(ahead, "edge1", now=now)
    assert "timestamp 2025-03-02T12:00:00.001000Z is more than 1 day ahead" in str(e.value)
    # Old events are stored (a sensor's spool may hold days of them after an outage).
    old = to_proto(commands(1, at=now - timedelta(days=400))[0])
    assert to_row(old, "edge1", now=now)[0].time == now - timedelta(days=400)


async def test_retention_lets_new_batches_in_between_its_chunks(
    store: SqliteEventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_sql, "RETENTION_CHUNK", 3)
    old = rows(commands(10, at=datetime.now(UTC) - timedelta(days=10)))
    await store.write_batch(old)
    statements: list[str] = []
    await store._write(lambda: store._w().set_trace_callback(statements.append))

    purge = asyncio.ensure_future(store.maintain(datetime.now(UTC)))
    await asyncio.sleep(0)  # the purge has queued its first chunk on the writer thread
    new = rows(commands(5))
    async with asyncio.timeout(30):
        assert await store.write_batch(new) == {r.hf_event_id for r in new}
        await purge

    deletes = [i for i, s in enumerate(statements) if s.startswith("DELETE FROM events")]
    inserted = next(i for i, s in enumerate(statements) if s.startswith("INSERT INTO events"))
    # The batch went in after the first chunk, not behind the whole purge.
    assert deletes[0] < inserted < deletes[-1]
    assert len(deletes) == 4  # 3 + 3 + 3 + 1 of 10
    listed = await store.list_events(EventQuery(limit=100))
    assert [e.hf_event_id for e in listed] == [r.hf_event_id for r in new]
    assert [s.session for s in await store.list_sessions(SessionQuery(limit=10))] == [
        new[0].session
    ]


async def test_login_and_file_filters_match_the_partial_index(store: SqliteEventStore) -> None:
    # A partial index serves a query only if the query spells its condition the same.
    for sql in (sqlite_sql, postgres_sql):
        assert f"WHERE {query.LOGINS}" in " ".join(sql.MIGRATIONS[0].split())
    assert query.FILES.startswith("eventid IN ('cowrie.session.file_upload'")
    username = sqlite_sql.DIALECT.json_field("username")
    (plan,) = await store._fetch_all(
        [
            Statement(
                f"EXPLAIN QUERY PLAN SELECT session FROM events "  # noqa: S608
                f"WHERE {query.LOGINS} AND {username} = ?",
                ("root",),
            )
        ]
    )
    assert "events_username" in " ".join(str(row[-1]) for row in plan)


async def test_a_store_made_before_hf_event_id_keeps_its_events_unique(tmp_path: Path) -> None:
    path = tmp_path / "events.sqlite3"
    [old] = rows(commands(1))
    with sqlite3.connect(path) as db:  # version 1, as shipped: the delivery id was "uuid"
        db.executescript(f"{sqlite_sql.MIGRATIONS[0]}\nPRAGMA user_version=1;")
        db.execute(
            "INSERT INTO events (uuid, time_us, sensor, session, eventid, src_ip, protocol, json)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (old.hf_event_id, old.time_us, old.sensor, old.session, old.eventid, old.src_ip,
             old.protocol, old.json),
        )  # fmt: skip
    db.close()
    store = SqliteEventStore(path, retention_days=3)
    await store.open()
    try:
        [new] = rows(commands(1))
        assert await store.write_batch([old, new]) == {new.hf_event_id}
        listed = await store.list_events(EventQuery(limit=10))
        assert sorted(e.hf_event_id for e in listed) == sorted([old.hf_event_id, new.hf_event_id])
    finally:
        await store.close()


def test_an_event_of_a_sensor_from_before_hf_event_id_is_stored_with_one() -> None:
    event = commands(1)[0]
    event["uuid"] = event.pop("hf_event_id")  # then the delivery id, on the wire too
    row, _ = to_row(to_proto({**event, "hf_event_id": event["uuid"]}, to_json(event)), "edge1")
    assert row.hf_event_id == event["uuid"]
    assert json.loads(row.json) == {**event, "hf_event_id": event["uuid"]}
    # Anything else without one is refused, as before.
    event["uuid"] = "sensor-identity"
    wire = to_proto({**event, "hf_event_id": str(uuid.uuid4())})
    wire.json = to_json(event)
    with pytest.raises(InvalidArgument):
        to_row(wire, "edge1")


async def test_a_session_starts_at_its_earliest_event_whatever_the_arrival_order(
    store: SqliteEventStore,
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    middle, early, late = commands(1, at=now), commands(1, at=now - timedelta(minutes=5)), []
    session = middle[0]["session"]
    for event in early:
        event["session"] = session
    late = commands(1, at=now + timedelta(minutes=5))
    late[0]["session"] = session
    for batch in (middle, early, late):  # an older event arrives after a newer one
        await store.write_batch(rows(batch))
    summary = await store.get_session(session)
    assert summary is not None
    assert summary.start_us == int((now - timedelta(minutes=5)).timestamp() * 1_000_000)
    assert summary.last_us == int((now + timedelta(minutes=5)).timestamp() * 1_000_000)
    assert summary.event_count == 3
    listed = await store.list_sessions(SessionQuery(limit=10, start=now - timedelta(minutes=6)))
    assert [s.session for s in listed] == [session]
