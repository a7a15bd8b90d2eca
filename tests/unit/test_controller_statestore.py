"""The controller's state store: writes that belong together share one transaction."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controller.models import LeaseRecord, LeaseState
from controller.registry import Registry
from controller.statestore import StateStore
from controller.waiters import CapacityWaiters
from honeyfleet.v1 import common_pb2, registry_pb2


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[StateStore]:
    """A real state store in a temporary directory."""
    opened = StateStore(tmp_path / "controller.sqlite3")
    await opened.open()
    yield opened
    await opened.close()


async def traced(store: StateStore) -> list[str]:
    """Every SQL statement the store runs from now on, in order."""
    statements: list[str] = []
    await store._run(lambda: store._conn().set_trace_callback(statements.append))
    return statements


def transactions(statements: list[str]) -> list[list[str]]:
    """Statements grouped by transaction (each one outside BEGIN...COMMIT is its own)."""
    groups: list[list[str]] = []
    current: list[str] | None = None
    for statement in statements:
        word = statement.split()[0].upper()
        if word == "BEGIN":
            current = []
        elif word == "COMMIT":
            assert current is not None
            groups.append(current)
            current = None
        elif current is not None:
            current.append(statement)
        else:
            groups.append([statement])
    assert current is None, "a transaction was left open"
    return groups


async def test_heartbeat_times_of_all_nodes_are_saved_in_one_transaction(
    store: StateStore, tmp_path: Path
) -> None:
    registry = Registry(
        store, CapacityWaiters(10), dead_after=60.0, heartbeat_interval=20.0, max_node_guests=8
    )
    for name in ("n1", "n2", "n3"):
        await registry.register_node(
            name,
            registry_pb2.RegisterPoolNodeRequest(address=f"{name}:7400", capacity=2),
        )
        registry.heartbeat(name, registry_pb2.HeartbeatRequest(), time.monotonic())
    registry.seen("s1")
    statements = await traced(store)
    await registry.persist()
    assert [len(t) for t in transactions(statements)] == [4]

    reopened = StateStore(tmp_path / "controller.sqlite3")
    await store.close()
    await reopened.open()
    try:
        saved = {n.name: n.last_heartbeat_time for n in await reopened.load_nodes()}
    finally:
        await reopened.close()
    assert saved == {n.name: n.last_heartbeat_time for n in registry.nodes.values()}
    assert all(saved.values())


async def test_an_issued_lease_and_its_count_are_one_transaction(store: StateStore) -> None:
    now = time.time()
    lease = LeaseRecord(
        id="L1",
        pool_node="n1",
        pool_node_address="n1:7400",
        guest="g1",
        sensor="sensor/s1",
        src_ip="192.0.2.1",
        protocol=common_pb2.PROTOCOL_SSH,
        session="s",
        shared=False,
        create_time=now,
        expire_time=now + 120,
    )
    statements = await traced(store)
    await store.save_lease(lease, counter="leases_issued")
    assert [len(t) for t in transactions(statements)] == [2]
    assert await store.counters() == {"leases_issued": 1}
    assert await store.get_lease("L1") == lease

    # Without a counter (renewals, endings) it is the lease alone.
    lease.end(LeaseState.RELEASED, "session closed", now + 1)
    await store.save_lease(lease)
    assert await store.counters() == {"leases_issued": 1}
    assert await store.get_lease("L1") == lease


async def test_lease_writes_queued_together_share_one_transaction(store: StateStore) -> None:
    now = time.time()
    leases = [
        LeaseRecord(
            id=f"L{i}",
            pool_node="n1",
            pool_node_address="n1:7400",
            guest=f"g{i}",
            sensor="sensor/s1",
            src_ip="192.0.2.1",
            protocol=common_pb2.PROTOCOL_SSH,
            session=f"s{i}",
            shared=False,
            create_time=now,
            expire_time=now + 120,
        )
        for i in range(20)
    ]
    statements = await traced(store)
    # Queued in one turn of the event loop: one transaction (one fsync) for all twenty.
    first = store.save_lease(leases[0], counter="leases_issued")
    rest = [store.save_lease(lease, counter="leases_issued") for lease in leases[1:]]
    await first
    for future in rest:
        await future
    assert [len(t) for t in transactions(statements)] == [40]
    assert await store.counters() == {"leases_issued": 20}
