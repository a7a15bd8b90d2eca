"""The attacker's side: a telnetlib3 server protocol that negotiates like Debian's telnetd.

It sends what inetutils telnetd 2.4 (Debian 12's ``inetutils-telnetd``) sends, in its
order, round by round, each round once the client answered the one before (the rounds
are :class:`~sensor.telnet.telnetd.TelnetdWriter`'s), ending in character-at-a-time
mode, where the guest's login and shell do all the echoing and editing.

Like telnetd, it says nothing more to a client that says nothing: no login prompt
until the client has answered or, having sent something, waited ``NEGOTIATION_WAIT``.
It refuses what telnetd does not speak (compression, CHARSET, MUD protocols). Bytes
travel in binary (``encoding=False``): they are the guest's business, not ours to decode.

Everything a connection learns is handed to its :class:`AttackerPeer` (the session).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Protocol

from telnetlib3 import BaseServer
from telnetlib3.stream_reader import TelnetReader, TelnetReaderUnicode
from telnetlib3.stream_writer import TelnetWriter, TelnetWriterUnicode
from telnetlib3.telopt import (
    AARDWOLF,
    ABORT,
    AO,
    ATCP,
    AUTHENTICATION,
    CHARSET,
    COM_PORT_OPTION,
    EC,
    ECHO,
    EL,
    ENCRYPT,
    EOF,
    EOR,
    GMCP,
    IP,
    MCCP2_COMPRESS,
    MCCP3_COMPRESS,
    MSDP,
    MSP,
    MSSP,
    MXP,
    NAWS,
    NEW_ENVIRON,
    SUSP,
    TSPEED,
    TTYPE,
    XDISPLOC,
    ZMP,
)

from sensor.telnet.telnetd import TelnetdWriter

# A client that has sent something but not answered every request gets its login prompt
# this long after its first bytes; one that sends nothing never does (the login grace
# time ends it), as with telnetd.
NEGOTIATION_WAIT = 2.0
# No prompt for a silent client: telnetlib3's own wait is made longer than any session.
SILENT_WAIT = 24 * 3600.0
# Options a Linux telnetd does not speak, refused whoever asks.
REFUSED = frozenset(
    {CHARSET, EOR, COM_PORT_OPTION, MCCP2_COMPRESS, MCCP3_COMPRESS}
    | {GMCP, MSDP, MSSP, MSP, MXP, ZMP, AARDWOLF, ATCP}
)
# Telnet's editing and signal commands, turned into the keys a pty understands, in stream
# order (as telnetd does): a client in line mode sends IAC IP for Ctrl-C, for example.
COMMAND_KEYS = {
    IP: b"\x03",
    EOF: b"\x04",
    AO: b"\x0f",
    EL: b"\x15",
    SUSP: b"\x1a",
    ABORT: b"\x1c",
    EC: b"\x7f",
}


class AttackerPeer(Protocol):
    """The session an attacker's connection belongs to."""

    def from_attacker(self, data: bytes) -> bool:
        """Raw bytes as received; False when they broke a bound (the session is closing)."""

    def negotiated(self, reader: TelnetReader, writer: TelnetWriter) -> None:
        """Negotiation is done (or given up on): the login can start."""

    def window(self, cols: int, rows: int) -> None:
        """The client's window size (NAWS)."""

    def client_info(self, name: str, value: str) -> None:
        """A terminal type, speed or X display the client told."""

    def environment(self, env: dict[str, str]) -> None:
        """Variables the client sent (NEW-ENVIRON)."""

    def close(self, reason: str) -> None:
        """End the session."""


Accept = Callable[["TelnetdProtocol", asyncio.Transport], AttackerPeer | None]


class TelnetdProtocol(BaseServer):
    """One attacker connection, admitted (or refused) by ``accept`` when it is made."""

    def __init__(self, accept: Accept, write_buffer_high: int) -> None:
        # Our own future for "negotiation done" (a constructor argument of telnetlib3's),
        # so the wait can end when the client first speaks, not when it connects.
        self._connected: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        super().__init__(
            shell=self._negotiated,
            encoding=False,
            connect_maxwait=SILENT_WAIT,
            writer_factory=TelnetdWriter,
            _waiter_connected=self._connected,
        )
        self._accept = accept
        self._write_buffer_high = write_buffer_high
        self._peer: AttackerPeer | None = None
        self._spoke: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Admit or refuse, then set the writer's policy and callbacks.

        A refused connection is the refuser's from then on (``accept`` returns None).
        """
        assert isinstance(transport, asyncio.Transport)
        self._peer = self._accept(self, transport)
        if self._peer is None:
            return
        super().connection_made(transport)
        transport.set_write_buffer_limits(high=self._write_buffer_high)
        assert self.reader is not None and isinstance(self.writer, TelnetWriter)
        # Reading pauses while the session has not taken what arrived (telnetlib3's
        # server reader would otherwise buffer without bound).
        self.reader.set_transport(transport)
        writer = self.writer
        writer.compression = False
        writer.always_wont |= REFUSED
        writer.always_dont |= REFUSED | {ECHO}
        # Offered as telnetd offers them (with nothing to authenticate or encrypt with):
        # a client's DO is taken without a WONT.
        writer.always_will |= {AUTHENTICATION, ENCRYPT}
        peer = self._peer
        writer.set_ext_callback(NAWS, lambda rows, cols: peer.window(cols, rows))
        writer.set_ext_callback(NEW_ENVIRON, peer.environment)
        writer.set_ext_callback(TTYPE, lambda value: peer.client_info("ttype", value))
        writer.set_ext_callback(XDISPLOC, lambda value: peer.client_info("xdisploc", value))
        writer.set_ext_callback(TSPEED, lambda rx, tx: peer.client_info("tspeed", f"{rx},{tx}"))
        reader = self.reader
        for command, key in COMMAND_KEYS.items():
            writer.set_iac_callback(command, lambda _, key=key: reader.feed_data(key))

    def begin_negotiation(self) -> None:
        """Send telnetd's first round."""
        super().begin_negotiation()
        self._next_round()

    def begin_advanced_negotiation(self) -> None:
        """Rounds are ours (:meth:`check_negotiation`), not telnetlib3's."""

    def _next_round(self) -> bool:
        """Send telnetd's next round; False when all were sent."""
        return isinstance(self.writer, TelnetdWriter) and self.writer.next_round()

    def check_negotiation(self, final: bool = False) -> bool:
        """Done when every round is answered (or, ``final``, given up on).

        A round goes out once the one before is answered, whatever the answers were
        (telnetd too sends the next round to a client that refused everything).
        """
        assert self.writer is not None
        if final:
            while self._next_round():
                pass
        elif not any(self.writer.pending_option.values()) and self._next_round():
            return False
        return super().check_negotiation(final)

    def _stop_waiting(self) -> None:
        """The client spoke NEGOTIATION_WAIT ago and still has not answered everything."""
        if not self._connected.done():
            with self._held():
                self.check_negotiation(final=True)
            self._connected.set_result(None)

    def data_received(self, data: bytes) -> None:
        """Bounds first, then telnetlib3."""
        if self._peer is not None and self._peer.from_attacker(data):
            if self._spoke is None and data:
                loop = asyncio.get_running_loop()
                self._spoke = loop.call_later(NEGOTIATION_WAIT, self._stop_waiting)
            # telnetd answers a packet (and sends its next round) in one write.
            with self._held():
                super().data_received(data)

    def _held(self) -> contextlib.AbstractContextManager[None]:
        """The writer's :meth:`TelnetdWriter.held`, once there is a writer."""
        if isinstance(self.writer, TelnetdWriter):
            return self.writer.held()
        return contextlib.nullcontext()

    def connection_lost(self, exc: Exception | None) -> None:
        """The client is gone (or we closed it)."""
        if self._peer is None:
            return
        if self._spoke is not None:
            self._spoke.cancel()
        super().connection_lost(exc)
        self._peer.close("client disconnected")

    async def _negotiated(
        self,
        reader: TelnetReader | TelnetReaderUnicode,
        writer: TelnetWriter | TelnetWriterUnicode,
    ) -> None:
        """telnetlib3's shell callback: hand over to the session."""
        assert isinstance(reader, TelnetReader) and isinstance(writer, TelnetWriter)
        if self._peer is not None:
            self._peer.negotiated(reader, writer)
