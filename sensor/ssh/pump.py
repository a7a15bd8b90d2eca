"""The byte pump between an attacker's TCP connection and asyncssh.

asyncssh runs on one end of a socketpair (``asyncssh.run_server(sock=...)``); the pump
moves bytes between the attacker's socket and the other end. That gives the sensor what
asyncssh's public API does not: a count of bytes before login, the client's cleartext
version line and KEXINIT (for hassh) with a bound on declared packet lengths, and the
attacker's backlog (a client that stops reading pauses the guest instead of growing
buffers). Each direction's backpressure pauses the other side's reads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

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
        if self.inner is not None and self.inner.transport is not None:
            self.inner.transport.write(data)

    def last_words(self) -> None:
        """After our banner: OpenSSH's reply to a refused first line, then the end."""
        refusal, self._refusal = self._refusal, None
        if refusal is None or self._owner is None or self.transport is None:
            return
        self.transport.write(refusal.reply)
        self._owner.pump_closed(str(refusal))

    def eof_received(self) -> bool:
        """Half-close towards asyncssh."""
        if self.inner is not None and self.inner.transport is not None:
            self.inner.transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        """The attacker is gone."""
        if self._owner is not None:
            self._owner.pump_closed("client disconnected")

    def pause_writing(self) -> None:
        """The attacker is not reading: stop taking asyncssh's output."""
        if self.inner is not None and self.inner.transport is not None:
            self.inner.transport.pause_reading()
        if self._owner is not None:
            self._owner.attacker_backlog(True)

    def resume_writing(self) -> None:
        """The attacker reads again."""
        if self.inner is not None and self.inner.transport is not None:
            self.inner.transport.resume_reading()
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


class InnerSide(asyncio.Protocol):
    """Protocol on our end of the socketpair (asyncssh holds the other end)."""

    def __init__(self, attacker: AttackerSide, high_water: int) -> None:
        self._attacker = attacker
        self._high_water = high_water
        self.transport: asyncio.Transport | None = None
        self.banner_relayed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start reading the attacker now that asyncssh can take bytes."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=self._high_water)
        if self._attacker.transport is not None:
            self._attacker.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        """asyncssh's output goes to the attacker."""
        if self._attacker.transport is not None:
            self._attacker.transport.write(data)
        if not self.banner_relayed and b"\n" in data:
            # asyncssh's KEXINIT follows only the client's version: nothing after it yet.
            self.banner_relayed = True
            self._attacker.last_words()

    def eof_received(self) -> bool:
        """asyncssh is done sending."""
        if self._attacker.transport is not None and self._attacker.transport.can_write_eof():
            self._attacker.transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        """asyncssh closed the connection (logout, timeout, protocol error)."""
        # Through the attacker side's close, so a client that never reads is still
        # aborted (a plain close here would make its later close() a no-op).
        self._attacker.close()

    def pause_writing(self) -> None:
        """asyncssh is not keeping up: stop reading the attacker."""
        if self._attacker.transport is not None:
            self._attacker.transport.pause_reading()

    def resume_writing(self) -> None:
        """asyncssh caught up."""
        if self._attacker.transport is not None:
            self._attacker.transport.resume_reading()

    def close(self) -> None:
        """Close asyncssh's connection."""
        if self.transport is not None:
            self.transport.close()
