"""Refusing at the door over real loopback sockets, including clients already gone."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from honeyfleet.spool import Spool
from sensor.events import EventLog
from sensor.metrics import SensorMetrics
from sensor.session.refusals import RefusalReporter
from tests.conftest import until


class _Held(asyncio.Protocol):
    """Hands over each accepted connection's transport, reading paused (as admission
    sees a connection: before any byte is read)."""

    def __init__(self, accepted: asyncio.Queue[asyncio.Transport]) -> None:
        self._accepted = accepted

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()
        self._accepted.put_nowait(transport)


@pytest.fixture
async def reporter(tmp_path: Path) -> AsyncIterator[RefusalReporter]:
    """A Telnet-like reporter (no refusal text) writing to a real spool."""
    spool = Spool(tmp_path / "spool.sqlite3", max_bytes=100_000_000, near_full=0.9)
    events = EventLog(spool, SensorMetrics(), sensor_uuid="test-uuid")
    yield RefusalReporter(events, sensor="edge1", protocol="telnet", interval=60.0, text=b"")
    spool.close()


def _reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), as a scanner that gives up at once does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def test_a_client_that_reset_before_the_refusal_is_let_go_and_uncounted(
    reporter: RefusalReporter,
) -> None:
    accepted: asyncio.Queue[asyncio.Transport] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Held(accepted), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        for _ in range(3):
            client = socket.create_connection(("127.0.0.1", port), timeout=10)
            transport = await asyncio.wait_for(accepted.get(), 10)
            _reset(client)
            sock = transport.get_extra_info("socket")
            # The RST has arrived once the socket reports its error.
            await until(lambda s=sock: s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0)
            reporter.refuse(transport, "127.0.0.1", "max_startups")
            # Gone at once, and no longer counted as lingering.
            await until(transport.is_closing)
        await until(lambda: reporter.lingering == 0)
    finally:
        server.close()
        await server.wait_closed()
