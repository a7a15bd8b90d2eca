"""The attacker's side: a telnetlib3 server protocol that negotiates like a Linux telnetd.

It asks what netkit/inetutils telnetd ask first (terminal type, speed, X display, the
environment), then, once the client answers anything, offers to echo and suppress
go-ahead and asks for the window size: character-at-a-time mode, where the guest's
login and shell do all the echoing and editing. It refuses what those daemons do not
speak (compression, CHARSET, LINEMODE, MUD protocols). Bytes travel in binary
(``encoding=False``): they are the guest's business, not ours to decode.

Everything a connection learns is handed to its :class:`AttackerPeer` (the session).
"""

from __future__ import annotations

import asyncio
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
    CHARSET,
    COM_PORT_OPTION,
    DO,
    EC,
    ECHO,
    EL,
    EOF,
    EOR,
    GMCP,
    IP,
    LINEMODE,
    MCCP2_COMPRESS,
    MCCP3_COMPRESS,
    MSDP,
    MSP,
    MSSP,
    MXP,
    NAWS,
    NEW_ENVIRON,
    SGA,
    SUSP,
    TSPEED,
    TTYPE,
    USERVAR,
    VAR,
    WILL,
    XDISPLOC,
    ZMP,
)

# A client that answers none of our requests gets its login prompt after this long.
NEGOTIATION_WAIT = 2.0
FIRST_ROUND = (TTYPE, TSPEED, XDISPLOC, NEW_ENVIRON)
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
        super().__init__(shell=self._negotiated, encoding=False, connect_maxwait=NEGOTIATION_WAIT)
        self._accept = accept
        self._write_buffer_high = write_buffer_high
        self._peer: AttackerPeer | None = None
        self._second_round = False

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
        writer.always_dont |= REFUSED | {LINEMODE}
        peer = self._peer
        writer.set_ext_callback(NAWS, lambda rows, cols: peer.window(cols, rows))
        writer.set_ext_callback(NEW_ENVIRON, peer.environment)
        writer.set_ext_callback(TTYPE, lambda value: peer.client_info("ttype", value))
        writer.set_ext_callback(XDISPLOC, lambda value: peer.client_info("xdisploc", value))
        writer.set_ext_callback(TSPEED, lambda rx, tx: peer.client_info("tspeed", f"{rx},{tx}"))
        # Like telnetd: "send me every variable you have".
        writer.set_ext_offer_callback(NEW_ENVIRON, lambda: [VAR, USERVAR])
        reader = self.reader
        for command, key in COMMAND_KEYS.items():
            writer.set_iac_callback(command, lambda _, key=key: reader.feed_data(key))

    def begin_negotiation(self) -> None:
        """Ask for what telnetd asks for first."""
        super().begin_negotiation()
        assert self.writer is not None
        for option in FIRST_ROUND:
            self.writer.iac(DO, option)

    def begin_advanced_negotiation(self) -> None:
        """Character mode: we echo, no go-ahead; and the window size."""
        if self._second_round or self.writer is None:
            return
        self._second_round = True
        self.writer.iac(WILL, SGA)
        self.writer.iac(WILL, ECHO)
        self.writer.iac(DO, NAWS)

    def check_negotiation(self, final: bool = False) -> bool:
        """Done when both rounds are answered (or given up on).

        telnetlib3 starts the second round only when the client agreed to something;
        telnetd sends it anyway, so a client that refused or ignored the first round
        still gets it.
        """
        assert self.writer is not None
        if final or not any(self.writer.pending_option.values()):
            self.begin_advanced_negotiation()
        return super().check_negotiation(final)

    def data_received(self, data: bytes) -> None:
        """Bounds first, then telnetlib3."""
        if self._peer is not None and self._peer.from_attacker(data):
            super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        """The client is gone (or we closed it)."""
        if self._peer is None:
            return
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
