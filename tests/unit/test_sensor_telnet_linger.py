"""Closing a connection whose client never reads: its last bytes get a while, then it goes.

:func:`sensor.linger.close_with_linger` is shared by the Telnet session and the SSH pump;
these use real loopback sockets whose client never reads, so the kernel's buffers fill
and what is left stays in the transport.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from sensor import linger
from sensor.linger import close_with_linger
from sensor.ssh.cleartext import CleartextParser
from sensor.ssh.pump import AttackerSide, InnerSide

CHUNK = b"x" * 65536


class Server(asyncio.Protocol):
    """The server end of one connection: when it was made and when it was lost."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.made: asyncio.Future[asyncio.Transport] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.made.set_result(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(None)


async def silent_client(port: int) -> socket.socket:
    """A client that connects and never reads (with a small receive buffer)."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.setblocking(False)
    await asyncio.get_running_loop().sock_connect(client, ("127.0.0.1", port))
    return client


def fill(transport: asyncio.WriteTransport) -> None:
    """Write until the kernel takes no more and bytes wait in the transport."""
    for _ in range(1024):
        transport.write(CHUNK)
        if transport.get_write_buffer_size():
            return
    pytest.fail("the client's buffers never filled")


@pytest.fixture(autouse=True)
def short_linger(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linger, "CLOSE_LINGER", 0.05)


@pytest.fixture
async def clients() -> AsyncIterator[list[socket.socket]]:
    """Clients to close after the test."""
    made: list[socket.socket] = []
    yield made
    for client in made:
        client.close()


async def test_a_client_that_never_reads_is_aborted_after_the_linger(
    clients: list[socket.socket],
) -> None:
    protocol = Server()
    server = await asyncio.get_running_loop().create_server(lambda: protocol, "127.0.0.1", 0)
    clients.append(await silent_client(server.sockets[0].getsockname()[1]))
    transport = await protocol.made
    fill(transport)
    close_with_linger(transport)
    async with asyncio.timeout(10):
        await protocol.lost
    assert transport.get_write_buffer_size() == 0
    server.close()


async def test_an_already_closing_transport_is_aborted_too(clients: list[socket.socket]) -> None:
    # telnetlib3 closes the transport itself (on DO LOGOUT, on EOF) before the session does.
    protocol = Server()
    server = await asyncio.get_running_loop().create_server(lambda: protocol, "127.0.0.1", 0)
    clients.append(await silent_client(server.sockets[0].getsockname()[1]))
    transport = await protocol.made
    fill(transport)
    transport.close()
    close_with_linger(transport)
    async with asyncio.timeout(10):
        await protocol.lost
    server.close()


class Owner:
    """The SSH connection a pump works for, reduced to what the pump calls."""

    write_buffer_high = 65536

    def __init__(self) -> None:
        self.parser = CleartextParser(  # type: ignore[arg-type]
            self, max_packet=35000, mismatch=b"", invalid=b""
        )
        self.closed = asyncio.Event()

    def attacker_bytes(self, count: int) -> str | None:
        return None

    def attacker_backlog(self, high: bool) -> None:
        pass

    def pump_closed(self, reason: str) -> None:
        self.closed.set()

    def client_version(self, version: str) -> None:
        self.version = version


class Ssh(asyncio.Protocol):
    """asyncssh's connection, reduced to what the pump calls on it."""

    def __init__(self) -> None:
        self.transport: asyncio.BaseTransport | None = None
        self.received = b""
        self.lost = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()


async def test_the_pump_aborts_a_client_that_never_reads_when_asyncssh_goes(
    clients: list[socket.socket],
) -> None:
    loop = asyncio.get_running_loop()
    owner = Owner()
    sides: list[AttackerSide] = []

    def accept(side: AttackerSide, transport: asyncio.Transport) -> Owner:
        sides.append(side)
        return owner

    server = await loop.create_server(lambda: AttackerSide(accept), "127.0.0.1", 0)
    client = await silent_client(server.sockets[0].getsockname()[1])
    clients.append(client)
    async with asyncio.timeout(10):
        while not sides:
            await asyncio.sleep(0.01)
    (side,) = sides
    inner = InnerSide(side)
    side.inner = inner
    ssh = Ssh()
    inner.attach(ssh)
    assert ssh.transport is inner and side.transport is not None
    # The attacker's bytes reach asyncssh once it is attached.
    await loop.sock_sendall(client, b"SSH-2.0-OpenSSH_9.2\r\n")
    async with asyncio.timeout(10):
        while not ssh.received:
            await asyncio.sleep(0.01)
    assert ssh.received == b"SSH-2.0-OpenSSH_9.2\r\n" and owner.version == "SSH-2.0-OpenSSH_9.2"
    fill(side.transport)  # asyncssh's output, which the client never reads
    # asyncssh's connection ends: it hears so, and the client is aborted after the linger.
    inner.abort()
    assert inner.is_closing()
    async with asyncio.timeout(10):
        await ssh.lost.wait()
        while not side.transport.is_closing() or side.transport.get_write_buffer_size():
            await asyncio.sleep(0.01)
        await owner.closed.wait()
    server.close()
