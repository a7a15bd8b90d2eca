"""What a sensor's claimed times and a brute force's volume can do to the store: bounded.

A real controller over mTLS, real SQLite and PostgreSQL stores.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from controller.events import pipeline
from controller.events.store import EventQuery
from controller.server import Controller
from honeyfleet.events import TIMESTAMP_FORMAT, Event, parse_timestamp
from tests.conftest import ControllerFactory, FleetPki, until
from tests.integration.test_events_ingest import (
    DB_TIMEOUT,
    batches,
    bulk_events,
    counts,
    stream_all,
)

pytest_plugins = ["tests.postgres"]


def dated(events: list[Event], days_ago: float) -> list[Event]:
    """The events, moved ``days_ago`` into the past."""
    moment = datetime.now(UTC) - timedelta(days=days_ago)
    for event in events:
        event["timestamp"] = moment.strftime(TIMESTAMP_FORMAT)
    return events


async def postgres_partitions(dsn: str) -> dict[str, int]:
    """Partition name -> rows, of the events table."""
    import psycopg

    async with asyncio.timeout(DB_TIMEOUT), await psycopg.AsyncConnection.connect(dsn) as conn:
        cursor = await conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'events'::regclass"
        )
        names = [name for (name,) in await cursor.fetchall()]
        out = {}
        for name in names:
            cursor = await conn.execute(f'SELECT count(*) FROM "{name}"')  # noqa: S608
            row = await cursor.fetchone()
            out[name] = row[0] if row else 0
    return out


def metric(controller: Controller, name: str) -> float:
    """One of the controller's event metrics, as scraped."""
    return controller.events.metrics_registry.get_sample_value(name) or 0.0


@pytest.mark.postgres
async def test_old_event_times_share_one_partition_and_are_kept_as_sent(
    postgres_dsn: str, start_controller: ControllerFactory, fleet_pki: FleetPki
) -> None:
    controller, address = await start_controller(store="postgres", postgres_dsn=postgres_dsn)
    old = [dated(bulk_events(1, "edge1"), days)[0] for days in (100, 200, 300, 400)]
    recent = dated(bulk_events(2, "edge1"), 3)
    ack = (await stream_all(fleet_pki, address, "edge1", batches([*old, *recent])))[0]
    assert (ack.stored, ack.duplicates) == (6, 0)
    partitions = await postgres_partitions(postgres_dsn)
    # A lying clock made no partition per claimed day; a recent backlog day has its own.
    assert partitions["events_old"] == 4
    for event in old:
        assert f"events_p{parse_timestamp(event['timestamp']):%Y%m%d}" not in partitions
    assert partitions[f"events_p{parse_timestamp(recent[0]['timestamp']):%Y%m%d}"] == 2
    listed = await controller.events.store.list_events(EventQuery(limit=10))
    sent = {e["hf_event_id"]: parse_timestamp(e["timestamp"]) for e in [*old, *recent]}
    assert {e.hf_event_id: e.time_us for e in listed} == {
        u: int(t.timestamp() * 1_000_000) for u, t in sent.items()
    }
    # Resent (a sensor that missed the ack): stored once, even in the shared partition.
    again = (await stream_all(fleet_pki, address, "edge1", batches([*old, *recent])))[0]
    assert (again.stored, again.duplicates) == (0, 6)
    assert await counts(controller, {"store": "postgres", "postgres_dsn": postgres_dsn}) == (6, 6)


async def test_the_store_budget_deletes_the_oldest_events_first(
    start_controller: ControllerFactory, fleet_pki: FleetPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline, "BUDGET_INTERVAL", 0.2)
    monkeypatch.setattr("controller.events.sqlite_sql.RETENTION_CHUNK", 200)
    controller, address = await start_controller()
    old = dated(bulk_events(3000, "edge1"), 20)
    new = bulk_events(300, "edge1")
    await stream_all(fleet_pki, address, "edge1", batches(old + new))
    await until(lambda: metric(controller, "honeyfleet_store_bytes") > 0)
    await until(lambda: metric(controller, "honeyfleet_store_bytes") > 500_000)
    full = metric(controller, "honeyfleet_store_bytes")
    assert metric(controller, "honeyfleet_store_budget_deleted_total") == 0  # no budget set
    await controller.stop(grace=0)

    # The same store under a budget of half its size.
    budget = int(full // 2)
    controller, _ = await start_controller(store_max_bytes=budget)
    await until(lambda: 0 < metric(controller, "honeyfleet_store_bytes") <= budget)
    deleted = metric(controller, "honeyfleet_store_budget_deleted_total")
    assert 0 < deleted < len(old)
    left = await controller.events.store.list_events(EventQuery(limit=10_000))
    assert len(left) == len(old) + len(new) - deleted
    # Oldest first: every new event is still there.
    assert {e["hf_event_id"] for e in new} <= {e.hf_event_id for e in left}


@pytest.mark.postgres
async def test_the_postgres_budget_drops_whole_past_days_oldest_first(
    postgres_dsn: str,
    start_controller: ControllerFactory,
    fleet_pki: FleetPki,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pipeline, "BUDGET_INTERVAL", 0.2)
    store: dict[str, Any] = {"store": "postgres", "postgres_dsn": postgres_dsn}
    # A budget nothing fits in: everything but today's (and later) partitions goes.
    controller, address = await start_controller(**store, store_max_bytes=1)
    ancient = dated(bulk_events(5, "edge1"), 90)
    older, old = dated(bulk_events(5, "edge1"), 3), dated(bulk_events(5, "edge1"), 2)
    today = bulk_events(5, "edge1")
    await stream_all(fleet_pki, address, "edge1", batches(ancient + older + old + today))
    async with asyncio.timeout(DB_TIMEOUT):
        while await counts(controller, store) != (5, 5):
            await asyncio.sleep(0.1)
    assert metric(controller, "honeyfleet_store_budget_deleted_total") >= 3
    left = await controller.events.store.list_events(EventQuery(limit=100))
    assert {e.hf_event_id for e in left} == {e["hf_event_id"] for e in today}
    partitions = await postgres_partitions(postgres_dsn)
    assert partitions["events_old"] == 0
    for events in (older, old):
        day = f"events_p{parse_timestamp(events[0]['timestamp']):%Y%m%d}"
        assert day not in partitions


@pytest.mark.postgres
async def test_a_longer_partition_window_never_wedges_on_days_already_in_events_old(
    postgres_dsn: str,
) -> None:
    from controller.events.postgres_store import PostgresEventStore
    from controller.events.validate import to_row
    from honeyfleet.events import to_proto

    def rows(events: list[Event]) -> list[Any]:
        return [to_row(to_proto(e), "edge1")[0] for e in events]

    first, second = dated(bulk_events(2, "edge1"), 40), dated(bulk_events(2, "edge1"), 40)
    narrow = PostgresEventStore(postgres_dsn, partition_days=30)
    await narrow.open()
    try:
        assert len(await narrow.write_batch(rows(first))) == 2  # into events_old
    finally:
        await narrow.close()
    # The operator widens the window: that day now qualifies for a partition of its own,
    # which PostgreSQL refuses to create while events_old holds rows of it.
    wide = PostgresEventStore(postgres_dsn, partition_days=60)
    await wide.open()
    try:
        async with asyncio.timeout(DB_TIMEOUT):
            assert len(await wide.write_batch(rows(second))) == 2
            assert len(await wide.write_batch(rows(first))) == 0  # and still deduplicated
    finally:
        await wide.close()
    partitions = await postgres_partitions(postgres_dsn)
    assert partitions["events_old"] == 4
