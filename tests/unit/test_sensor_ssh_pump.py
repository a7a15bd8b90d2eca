"""The SSH pump between an attacker's socket and asyncssh: what passes, in which pieces
and in which order (real loopback sockets; asyncssh's connection reduced to what the
pump calls on it)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from sensor.ssh.cleartext import CleartextParser
from sensor.ssh.pump import FEED_BYTES, AttackerSide, InnerSide

VERSION = b"SSH-2.0-OpenSSH_9.2\r\n"
# Cleartext KEXINIT (its lists left out) and NEWKEYS packets: what follows them is
# encrypted, so the cleartext parser is done.
NEWKEYS = (
    (28).to_bytes(4, "big") + bytes([10, 20]) + bytes(16 + 10)
    + (12).to_bytes(4, "big") + bytes([10, 21]) + bytes(10)
)  # fmt: skip


class Owner:
    """The SSH connection a pump works for, reduced to what the pump calls."""

    write_buffer_high = 1 << 20

    def __init__(self) -> None:
        self.parser = CleartextParser(  # type: ignore[arg-type]
            self, max_packet=35000, mismatch=b"", invalid=b""
        )

    def attacker_bytes(self, count: int) -> str | None:
        return None

    def attacker_backlog(self, high: bool) -> None:
        pass

    def pump_closed(self, reason: str) -> None:
        pass

    def client_version(self, version: str) -> None:
        pass


class Ssh(asyncio.Protocol):
    """asyncssh's connection, reduced to what the pump calls on it: what it is handed."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []

    def data_received(self, data: bytes) -> None:
        self.pieces.append(data)

    @property
    def received(self) -> bytes:
        return b"".join(self.pieces)


@dataclass
class Pump:
    client: socket.socket
    inner: InnerSide
    ssh: Ssh


@pytest.fixture
async def pump() -> AsyncIterator[Pump]:
    """A client connected to a pump with asyncssh's end attached."""
    loop = asyncio.get_running_loop()
    sides: list[AttackerSide] = []

    def accept(side: AttackerSide, transport: asyncio.Transport) -> Owner:
        sides.append(side)
        return Owner()

    server = await loop.create_server(lambda: AttackerSide(accept), "127.0.0.1", 0)
    client = socket.socket()
    client.setblocking(False)
    await loop.sock_connect(client, ("127.0.0.1", server.sockets[0].getsockname()[1]))
    async with asyncio.timeout(10):
        while not sides:
            await asyncio.sleep(0.01)
    (side,) = sides
    inner = side.inner = InnerSide(side)
    ssh = Ssh()
    inner.attach(ssh)
    try:
        yield Pump(client, inner, ssh)
    finally:
        client.close()
        server.close()


async def read_until_eof(client: socket.socket) -> bytes:
    """Everything the client gets until the pump half-closes or closes."""
    loop = asyncio.get_running_loop()
    got = b""
    async with asyncio.timeout(10):
        while chunk := await loop.sock_recv(client, 65536):
            got += chunk
    return got


async def test_a_large_read_reaches_asyncssh_whole_in_pieces_of_at_most_feed_bytes(
    pump: Pump,
) -> None:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(pump.client, VERSION + NEWKEYS)
    payload = bytes(range(256)) * (5 * FEED_BYTES // 256) + b"tail"
    await loop.sock_sendall(pump.client, payload)
    async with asyncio.timeout(10):
        while len(pump.ssh.received) < len(VERSION + NEWKEYS + payload):
            await asyncio.sleep(0.01)
    assert pump.ssh.received == VERSION + NEWKEYS + payload
    assert max(map(len, pump.ssh.pieces)) <= FEED_BYTES


async def test_what_asyncssh_writes_reaches_the_client_in_order_before_its_eof(
    pump: Pump,
) -> None:
    # The banner goes at once; later writes are passed on after the loop's turn, and an
    # EOF written in the same turn still follows them.
    pump.inner.write(b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n")
    packets = [bytes([n]) * (n * 100 + 1) for n in range(20)]
    for packet in packets:
        pump.inner.write(packet)
    assert pump.inner.get_write_buffer_size() >= sum(map(len, packets))
    pump.inner.write_eof()
    got = await read_until_eof(pump.client)
    assert got == b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n" + b"".join(packets)


async def test_asyncssh_s_last_writes_go_out_before_the_close(pump: Pump) -> None:
    pump.inner.write(b"SSH-2.0-OpenSSH_9.2p1\r\n")
    await asyncio.sleep(0)
    pump.inner.write(b"disconnect message")
    pump.inner.close()
    got = await read_until_eof(pump.client)
    assert got == b"SSH-2.0-OpenSSH_9.2p1\r\ndisconnect message"
