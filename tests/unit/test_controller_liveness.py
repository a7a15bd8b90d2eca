"""A pool node's liveness: read off its heartbeat stream as messages arrive, judged
against the rest of the fleet."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controller.models import NodeState, PoolNodeRecord
from controller.registry import FLEET_QUORUM, MAX_FORGIVEN, Registry
from controller.statestore import StateStore
from honeyfleet.v1 import registry_pb2
from tests.conftest import until
from tests.unit.bookkeeping import bookkeeping, heartbeat_service


async def test_a_node_is_alive_while_its_answers_wait_to_be_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, registry, _, servicer = await heartbeat_service(tmp_path, monkeypatch, dead_after=15.0)
    node = await registry.register_node(
        "n1", registry_pb2.RegisterPoolNodeRequest(address="127.0.0.1:1", capacity=2)
    )
    sent: asyncio.Queue[registry_pb2.HeartbeatRequest] = asyncio.Queue()

    async def heartbeats() -> AsyncIterator[registry_pb2.HeartbeatRequest]:
        while True:
            yield await sent.get()

    stream = servicer.Heartbeat(heartbeats(), None)
    try:
        sent.put_nowait(registry_pb2.HeartbeatRequest(table_version=1))
        await anext(stream)
        # The first answer is not taken: the handler waits to send it (a slow node, a
        # full window). The node's next heartbeat still counts the moment it arrives.
        node.last_seen_monotonic -= 60.0
        stale = node.last_seen_monotonic
        sent.put_nowait(registry_pb2.HeartbeatRequest(table_version=1, table_unchanged=True))
        await until(lambda: node.last_seen_monotonic > stale + 30.0)
        assert registry.find_dead(0.0) == []
    finally:
        await stream.aclose()
        await store.close()


async def fleet(tmp_path: Path, count: int) -> tuple[StateStore, Registry, list[PoolNodeRecord]]:
    """A registry of ``count`` live nodes that allows 15 s of silence (5 s heartbeats)."""
    store = StateStore(tmp_path / "controller.sqlite3")
    await store.open()
    registry, _ = bookkeeping(store, None, dead_after=ALLOWANCE)
    nodes = [
        await registry.register_node(
            f"n{i}", registry_pb2.RegisterPoolNodeRequest(address=f"127.0.0.1:{i + 1}", capacity=2)
        )
        for i in range(count)
    ]
    return store, registry, nodes


def silent_for(node: PoolNodeRecord, seconds: float) -> None:
    node.last_seen_monotonic = time.monotonic() - seconds


ALLOWANCE = 15.0
INTERVAL = ALLOWANCE / 3


async def test_a_fleet_heard_late_together_stays_alive(tmp_path: Path) -> None:
    store, registry, nodes = await fleet(tmp_path, 10)
    try:
        # A controller starved of CPU reads every stream late, some later than others:
        # each node's silence exceeds the allowance, none of them stopped heartbeating.
        for i, node in enumerate(nodes):
            silent_for(node, ALLOWANCE + 5.0 + i)
        assert registry.find_dead(0.0) == []
        assert registry.fleet_lateness > ALLOWANCE
    finally:
        await store.close()


async def test_a_node_silent_among_heartbeating_peers_dies_on_time(tmp_path: Path) -> None:
    store, registry, nodes = await fleet(tmp_path, 10)
    try:
        for node in nodes:
            silent_for(node, INTERVAL / 2)
        silent_for(nodes[3], ALLOWANCE + 1.0)
        assert registry.find_dead(0.0) == [nodes[3]]
        assert registry.fleet_lateness == 0.0
    finally:
        await store.close()


async def test_a_node_silent_longer_than_its_late_peers_dies(tmp_path: Path) -> None:
    store, registry, nodes = await fleet(tmp_path, 10)
    try:
        for node in nodes:
            silent_for(node, INTERVAL + 10.0)
        silent_for(nodes[7], INTERVAL + 10.0 + ALLOWANCE + 1.0)
        assert registry.find_dead(0.0) == [nodes[7]]
    finally:
        await store.close()


async def test_nodes_that_died_together_die_once_the_forgiveness_runs_out(
    tmp_path: Path,
) -> None:
    store, registry, nodes = await fleet(tmp_path, 10)
    try:
        for node in nodes[6:]:
            silent_for(node, INTERVAL / 2)
        # Six of ten go silent at once: the controller cannot tell this from its own
        # trouble and waits...
        for node in nodes[:6]:
            silent_for(node, 2 * ALLOWANCE)
        assert registry.find_dead(0.0) == []
        # ...but not for ever.
        for node in nodes[:6]:
            silent_for(node, (1 + MAX_FORGIVEN) * ALLOWANCE + 1.0)
        assert registry.find_dead(0.0) == nodes[:6]
        assert all(node.state is NodeState.ALIVE for node in nodes[6:])
    finally:
        await store.close()


async def test_a_fleet_too_small_to_compare_is_judged_by_the_clock(tmp_path: Path) -> None:
    store, registry, nodes = await fleet(tmp_path, FLEET_QUORUM - 1)
    try:
        for node in nodes:
            silent_for(node, ALLOWANCE + 1.0)
        assert registry.find_dead(0.0) == nodes
    finally:
        await store.close()
