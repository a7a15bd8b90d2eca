"""A pool node's liveness is read off its heartbeat stream as messages arrive."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from honeyfleet.v1 import registry_pb2
from tests.conftest import until
from tests.unit.bookkeeping import heartbeat_service


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
