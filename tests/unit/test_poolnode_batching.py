"""The warm login's transport: asyncssh's writes of one turn of the event loop reach the
guest together, in order, and before an EOF, a close or an abort (a real loopback
server; asyncssh's connection reduced to what the transport's user does)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from poolnode.batching import FEED_BYTES, BatchingTransport, BatchingTunnel


class Guest(asyncio.Protocol):
    """The guest's end: every byte it got, and whether the connection ended."""

    def __init__(self) -> None:
        self.received = b""
        self.ended = asyncio.Event()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received += data

    def eof_received(self) -> bool:
        self.ended.set()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended.set()


class Ssh(asyncio.Protocol):
    """asyncssh's connection, reduced: its transport, what it was handed, whether it was
    lost."""

    def __init__(self) -> None:
        self.transport: asyncio.BaseTransport | None = None
        self.pieces: list[bytes] = []
        self.lost = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.pieces.append(data)

    @property
    def received(self) -> bytes:
        return b"".join(self.pieces)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()


@dataclass
class Link:
    guest: Guest
    ssh: Ssh
    transport: BatchingTransport


@pytest.fixture
async def link() -> AsyncIterator[Link]:
    """A connection made through the tunnel to a loopback 'guest'."""
    guest = Guest()
    server = await asyncio.get_running_loop().create_server(lambda: guest, "127.0.0.1", 0)
    transport, ssh = await BatchingTunnel().create_connection(
        Ssh, "127.0.0.1", server.sockets[0].getsockname()[1]
    )
    assert isinstance(ssh, Ssh) and ssh.transport is transport
    try:
        yield Link(guest, ssh, transport)
    finally:
        transport.abort()
        server.close()


async def test_writes_of_one_turn_reach_the_guest_in_order_before_the_eof(link: Link) -> None:
    packets = [bytes([n]) * (n * 1000 + 1) for n in range(40)]
    for packet in packets:
        link.transport.write(packet)
    assert link.transport.get_write_buffer_size() >= sum(map(len, packets))
    link.transport.write_eof()
    async with asyncio.timeout(10):
        await link.guest.ended.wait()
    assert link.guest.received == b"".join(packets)


async def test_a_disconnect_message_goes_out_before_the_abort(link: Link) -> None:
    # asyncssh writes its disconnect message, then aborts its transport.
    link.transport.write(b"disconnect")
    link.transport.abort()
    async with asyncio.timeout(10):
        await link.guest.ended.wait()
        await link.ssh.lost.wait()
    assert link.guest.received == b"disconnect"


async def test_the_guest_s_bytes_and_its_close_reach_asyncssh(link: Link) -> None:
    assert link.guest.transport is not None
    link.guest.transport.write(b"SSH-2.0-OpenSSH_9.2\r\n")
    link.guest.transport.close()
    async with asyncio.timeout(10):
        await link.ssh.lost.wait()
    assert link.ssh.received == b"SSH-2.0-OpenSSH_9.2\r\n"
    assert link.transport.is_closing()


async def test_a_large_read_reaches_asyncssh_whole_in_pieces_of_at_most_feed_bytes(
    link: Link,
) -> None:
    assert link.guest.transport is not None
    payload = bytes(range(256)) * (5 * FEED_BYTES // 256) + b"tail"
    link.guest.transport.write(payload)
    async with asyncio.timeout(10):
        while len(link.ssh.received) < len(payload):
            await asyncio.sleep(0.01)
    assert link.ssh.received == payload
    assert max(map(len, link.ssh.pieces)) <= FEED_BYTES
