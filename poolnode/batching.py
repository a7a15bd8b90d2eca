"""The TCP connection under a warm login: what asyncssh writes in one turn of the event
loop goes to the guest's socket as one write, and what the guest sends reaches asyncssh
a packet's worth at a time.

asyncssh writes every packet on its own, and an empty MSG_IGNORE packet before each
data packet: a 256 KiB frame of a sensor's input became 16 writes of 32 KiB and of
84 bytes, each a ``send()`` and a wake-up of the guest's sshd. And it copies what it has
not parsed yet each time it takes a packet off the front of its input: a 256 KiB read
of sshd's 32 KiB packets cost it about 2.5 MiB of copying.

asyncssh runs a connection on any transport a ``tunnel`` object's ``create_connection``
returns (its way of carrying SSH over something else); :class:`BatchingTunnel` opens
the guest's TCP connection with :class:`BatchingTransport` between it and asyncssh.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

# What asyncssh's ``tunnel`` hands over: its connection, made once the socket is.
SessionFactory = Callable[[], Any]
# The guest's bytes are handed to asyncssh in pieces of at most this (about a packet).
FEED_BYTES = 32 * 1024


class BatchingTransport(asyncio.Transport):
    """asyncssh's transport: writes are gathered and passed on once the turn of the
    event loop that made them is over (the order of bytes is kept; a close or EOF
    passes on what is gathered first)."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Gather ``data``; the first write of a turn schedules the flush."""
        if self._pending is None:
            self._pending = []
            self._loop.call_soon(self._flush)
        self._pending.append(bytes(data))

    def _flush(self) -> None:
        """Pass what was gathered on, as one write."""
        pending, self._pending = self._pending, None
        if pending and not self._transport.is_closing():
            self._transport.writelines(pending)

    def write_eof(self) -> None:
        """Half-close after what is gathered."""
        self._flush()
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        """As the socket's transport."""
        return self._transport.can_write_eof()

    def close(self) -> None:
        """Close after what is gathered."""
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        """asyncssh aborts after its disconnect message: that goes first."""
        self._flush()
        self._transport.abort()

    def is_closing(self) -> bool:
        """As the socket's transport."""
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """The socket's (asyncssh reads its addresses and sets its options)."""
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        """Stop reading the guest."""
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        """Read the guest again."""
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        """As the socket's transport."""
        return self._transport.is_reading()

    def get_write_buffer_size(self) -> int:
        """Bytes gathered or queued for the socket."""
        pending = sum(map(len, self._pending)) if self._pending else 0
        return pending + self._transport.get_write_buffer_size()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """As the socket's transport."""
        self._transport.set_write_buffer_limits(high, low)


class _Link(asyncio.Protocol):
    """The socket's protocol: hands asyncssh's connection the batching transport and
    passes the socket's events on to it."""

    def __init__(self, session_factory: SessionFactory) -> None:
        self.ssh: asyncio.Protocol = session_factory()
        self.transport: BatchingTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """The socket is connected: asyncssh's connection starts on the batching one."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = BatchingTransport(transport, asyncio.get_running_loop())
        self.ssh.connection_made(self.transport)

    def data_received(self, data: bytes) -> None:
        """The guest's bytes, to asyncssh, FEED_BYTES at most at a time."""
        if len(data) <= FEED_BYTES:
            self.ssh.data_received(data)
            return
        for start in range(0, len(data), FEED_BYTES):
            self.ssh.data_received(data[start : start + FEED_BYTES])

    def eof_received(self) -> bool | None:
        """The guest half-closed."""
        return self.ssh.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        """The socket is gone."""
        self.ssh.connection_lost(exc)

    def pause_writing(self) -> None:
        """The socket's buffer is full (asyncssh ignores this, as it would from asyncio)."""
        self.ssh.pause_writing()

    def resume_writing(self) -> None:
        """The socket's buffer drained."""
        self.ssh.resume_writing()


class BatchingTunnel:
    """asyncssh's ``tunnel`` for a guest's login: a plain TCP connection to the guest,
    written through :class:`BatchingTransport`."""

    async def create_connection(
        self, session_factory: SessionFactory, remote_host: str, remote_port: int
    ) -> tuple[BatchingTransport, Any]:
        """Connect to the guest; asyncssh's connection runs on the batching transport."""
        loop = asyncio.get_running_loop()
        _, link = await loop.create_connection(
            lambda: _Link(session_factory), remote_host, remote_port
        )
        assert link.transport is not None
        return link.transport, link.ssh

    def close(self) -> None:
        """Nothing to close: each connection closes its own socket."""

    async def wait_closed(self) -> None:
        """Nothing to wait for."""
