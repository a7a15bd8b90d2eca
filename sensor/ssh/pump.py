"""The byte pump between an attacker's TCP connection and asyncssh.

asyncssh's connection runs on :class:`InnerSide`, a transport of ours: the pump hands it
the attacker's bytes and passes what it writes to the attacker's socket. That gives the
sensor what asyncssh's public API does not: a count of bytes before login, the client's
cleartext version line and KEXINIT (for hassh) with a bound on declared packet lengths,
and the attacker's backlog (a client that stops reading pauses the guest instead of
growing buffers)."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from typing import Any, Protocol

from sensor.linger import close_with_linger
from sensor.ssh.cleartext import BadIdentification, CleartextParser, CleartextViolation


class PumpOwner(Protocol):
    """The connection a pump works for."""

    parser: CleartextParser
    write_buffer_high: int

    def attacker_bytes(self, count: int) -> str | None:
        """Account for received bytes; a reason string if the connection must end."""

    def attacker_backlog(self, high: bool) -> None:
        """The attacker stopped (True) or resumed (False) reading what we send."""

    def pump_closed(self, reason: str) -> None:
        """One side closed; the whole connection ends."""


class AttackerSide(asyncio.Protocol):
    """Protocol on the attacker's TCP connection."""

    __slots__ = ("_accept", "_owner", "_refusal", "inner", "transport")

    def __init__(
        self, accept: Callable[[AttackerSide, asyncio.Transport], PumpOwner | None]
    ) -> None:
        self._accept = accept
        self._owner: PumpOwner | None = None
        self.transport: asyncio.Transport | None = None
        self.inner: InnerSide | None = None
        # A first line refused: OpenSSH's reply waits for our banner, then the end.
        self._refusal: BadIdentification | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Admit or refuse; an admitted connection reads once asyncssh's end is ready.

        A refused connection is the refuser's from then on (``accept`` returns None).
        """
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()
        self._owner = self._accept(self, transport)
        if self._owner is None:
            return
        self.transport = transport
        transport.set_write_buffer_limits(high=self._owner.write_buffer_high)

    def data_received(self, data: bytes) -> None:
        """Check bounds, then pass to asyncssh."""
        if self._owner is None or self._refusal is not None:
            return
        reason = self._owner.attacker_bytes(len(data))
        if reason is None:
            try:
                self._owner.parser.feed(data)
            except BadIdentification as e:
                # asyncssh never sees the line (it would close in silence).
                self._refusal = e
                if self.inner is not None and self.inner.banner_relayed:
                    self.last_words()
                return
            except CleartextViolation as e:
                reason = str(e)
        if reason is not None:
            self._owner.pump_closed(reason)
            return
        if self.inner is not None:
            self.inner.feed(data)

    def last_words(self) -> None:
        """After our banner: OpenSSH's reply to a refused first line, then the end."""
        refusal, self._refusal = self._refusal, None
        if refusal is None or self._owner is None or self.transport is None:
            return
        self.transport.write(refusal.reply)
        self._owner.pump_closed(str(refusal))

    def eof_received(self) -> bool:
        """Half-close towards asyncssh."""
        if self.inner is not None:
            self.inner.feed_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        """The attacker is gone."""
        if self._owner is not None:
            self._owner.pump_closed("client disconnected")

    def pause_writing(self) -> None:
        """The attacker is not reading: the guests' output waits (asyncssh itself ignores
        a transport's pause)."""
        if self._owner is not None:
            self._owner.attacker_backlog(True)

    def resume_writing(self) -> None:
        """The attacker reads again."""
        if self._owner is not None:
            self._owner.attacker_backlog(False)

    @property
    def buffered(self) -> int:
        """Bytes queued for the attacker."""
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def close(self) -> None:
        """Close the attacker's connection: flush what is queued, but not for ever."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        close_with_linger(transport)


# asyncssh copies what it has not parsed yet each time it takes a packet off the front
# of its input, so a read of n bytes of 32 KiB packets costs it about n²/32 KiB of
# copying: 256 KiB (what asyncio reads at once) meant some 2.5 MiB copied. Handed over
# in pieces of about a packet, it copies each byte a few times instead.
FEED_BYTES = 32 * 1024

# The extra-info mapping of every InnerSide (never written: see get_extra_info).
_NO_EXTRA: dict[str, Any] = {}


class InnerSide(asyncio.Transport):
    """The transport asyncssh's connection runs on: the attacker's bytes are handed to it
    directly and what it writes goes straight to the attacker's transport (no socketpair:
    that cost a second send and receive per chunk, and two descriptors per connection).

    asyncssh is called in the context it was attached in (:meth:`attach`), as a transport
    of its own would call it: the connection's inflation bound lives there
    (:mod:`sensor.ssh.compression`).
    """

    __slots__ = ("_attacker", "_closing", "_context", "_pending", "_ssh", "banner_relayed")

    def __init__(self, attacker: AttackerSide) -> None:
        # asyncio would make an empty dict per transport; get_extra_info never reads it.
        super().__init__(_NO_EXTRA)
        self._attacker = attacker
        self._ssh: asyncio.Protocol | None = None
        self._context: contextvars.Context | None = None
        self._closing = False
        # asyncssh's writes in this turn of the event loop, passed on together after it.
        self._pending: list[bytes] | None = None
        self.banner_relayed = False

    def attach(self, ssh: asyncio.Protocol) -> None:
        """Start asyncssh's connection on this transport, then read the attacker."""
        self._ssh = ssh
        self._context = contextvars.copy_context()
        self._context.run(ssh.connection_made, self)
        if self._attacker.transport is not None:
            self._attacker.transport.resume_reading()

    # The attacker's side calls these.

    def feed(self, data: bytes) -> None:
        """The attacker's bytes, to asyncssh, a piece of at most FEED_BYTES at a time."""
        ssh, context = self._ssh, self._context
        if ssh is None or context is None or self._closing:
            return
        if len(data) <= FEED_BYTES:
            context.run(ssh.data_received, data)
            return
        for start in range(0, len(data), FEED_BYTES):
            context.run(ssh.data_received, data[start : start + FEED_BYTES])
            if self._closing:
                return

    def feed_eof(self) -> None:
        """The attacker half-closed (asyncssh then ends the connection)."""
        if self._ssh is not None and self._context is not None and not self._closing:
            self._context.run(self._ssh.eof_received)

    # asyncio.Transport, as asyncssh uses it.

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """asyncssh's output goes to the attacker, once this turn of the loop is over.

        asyncssh writes each packet on its own, with an empty MSG_IGNORE packet before
        every data packet: 256 KiB of a guest's output was 16 ``send()`` calls to the
        attacker's socket, now one.
        """
        attacker = self._attacker.transport
        if self._closing or attacker is None or attacker.is_closing():
            return
        if not self.banner_relayed:
            attacker.write(data)
            if b"\n" in data:
                # asyncssh's KEXINIT follows only the client's version: nothing after it yet.
                self.banner_relayed = True
                self._attacker.last_words()
            return
        if self._pending is None:
            self._pending = []
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(bytes(data))

    def _flush(self) -> None:
        """Pass asyncssh's writes of the last turn on to the attacker, as one."""
        pending, self._pending = self._pending, None
        attacker = self._attacker.transport
        if pending and attacker is not None and not attacker.is_closing():
            attacker.writelines(pending)

    def write_eof(self) -> None:
        """asyncssh is done sending (after what it wrote)."""
        self._flush()
        attacker = self._attacker.transport
        if attacker is not None and not attacker.is_closing() and attacker.can_write_eof():
            attacker.write_eof()
        self.drained()

    def can_write_eof(self) -> bool:
        """Whether :meth:`write_eof` half-closes (as the attacker's transport can)."""
        return True

    def close(self) -> None:
        """asyncssh's connection ends (closed by asyncssh, or by us): the attacker's is
        closed after what is queued for it, and asyncssh hears of it as from a transport."""
        if self._closing:
            return
        self._flush()
        self._closing = True
        self.drained()
        # Through the attacker side's close, so a client that never reads is still
        # aborted (a plain close here would make its later close() a no-op).
        self._attacker.close()
        if self._ssh is not None and self._context is not None:
            asyncio.get_running_loop().call_soon(
                self._ssh.connection_lost, None, context=self._context
            )

    def abort(self) -> None:
        """As :meth:`close`: the attacker's transport bounds its own flush."""
        self.close()

    def is_closing(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """Nothing: asyncssh learns no socket or addresses (the session has them)."""
        return default

    def pause_reading(self) -> None:
        """Stop reading the attacker."""
        if self._attacker.transport is not None:
            self._attacker.transport.pause_reading()

    def resume_reading(self) -> None:
        """Read the attacker again."""
        if self._attacker.transport is not None:
            self._attacker.transport.resume_reading()

    def get_write_buffer_size(self) -> int:
        """Bytes queued for the attacker."""
        pending = sum(map(len, self._pending)) if self._pending else 0
        return pending + self._attacker.buffered

    def drained(self) -> None:
        """asyncssh sent its last bytes (a subclass may want to know)."""
