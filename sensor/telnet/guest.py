"""The guest's side: a telnetlib3 client on the tunnel's socket, wearing the attacker's terminal.

The guest's telnetd sees the attacker's terminal type, window size and environment
(through the session), except ``USER``, which the session decides: the lease's username
when spoofing, the attacker's otherwise, and never a value starting with ``-`` (that is
how the telnetd ``-f`` authentication bypass is done). Raw bytes from the guest pass the
same bounds as the attacker's before telnetlib3 reads them.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from telnetlib3 import TelnetClient
from telnetlib3.stream_reader import TelnetReader
from telnetlib3.stream_writer import TelnetWriter
from telnetlib3.telopt import IAC, LINEMODE, NAWS, SB, SE

from sensor.telnet.server import NEGOTIATION_WAIT, REFUSED


class GuestTelnet(TelnetClient):
    """The sensor's Telnet client towards one guest."""

    def __init__(
        self,
        *,
        term: str,
        size: tuple[int, int],
        environ: Mapping[str, str],
        from_guest: Callable[[bytes], bool],
    ) -> None:
        super().__init__(
            term=term,
            cols=size[0],
            rows=size[1],
            encoding=False,
            compression=False,
            # The server's wait serves here too: the guest's telnetd has answered by the
            # time its login prompt shows; only telnetlib3's bookkeeping waits on this.
            connect_maxwait=NEGOTIATION_WAIT,
        )
        self._term = term
        self._size = size
        self._environ = dict(environ)
        self._from_guest = from_guest

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Refuse what a plain telnet client would not speak, and line mode.

        The relay is character at a time (the attacker's keys go through as typed), so
        the guest's telnetd must not expect the client to edit lines.
        """
        super().connection_made(transport)
        assert self.writer is not None
        self.writer.always_wont |= REFUSED | {LINEMODE}
        self.writer.always_dont |= REFUSED

    def data_received(self, data: bytes) -> None:
        """Bounds first (False: the session is closing), then telnetlib3."""
        if self._from_guest(data):
            super().data_received(data)

    def send_ttype(self) -> str:
        """The attacker's terminal type."""
        return self._term

    def send_naws(self) -> tuple[int, int]:
        """The attacker's window, as (rows, cols)."""
        return self._size[1], self._size[0]

    def send_env(self, keys: Sequence[str]) -> dict[str, Any]:
        """The variables asked for, or all of them when the guest asks for "everything"."""
        wanted = [key for key in keys if key]
        if not wanted:
            return dict(self._environ)
        return {key: self._environ.get(key, "") for key in wanted}

    def resize(self, cols: int, rows: int) -> None:
        """The attacker's window changed: tell the guest, if it asked for sizes."""
        self._size = (cols, rows)
        writer = self.writer
        if writer is not None and writer.local_option.enabled(NAWS):
            value = struct.pack("!HH", min(cols, 65535), min(rows, 65535))
            writer.send_iac(IAC + SB + NAWS + value.replace(IAC, IAC + IAC) + IAC + SE)


async def open_guest(sock: socket.socket, factory: Callable[[], GuestTelnet]) -> GuestTelnet:
    """Start the client on the tunnel's socket; its reader and writer are ready at once."""
    _, protocol = await asyncio.get_running_loop().create_connection(factory, sock=sock)
    assert isinstance(protocol.reader, TelnetReader) and isinstance(protocol.writer, TelnetWriter)
    return protocol
