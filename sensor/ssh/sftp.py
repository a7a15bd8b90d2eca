"""Captures files uploaded over the SFTP subsystem by reading the packets as they pass.

Requests (client to guest) and responses (guest to client) are parsed separately:
an ``OPEN`` for writing remembers the file name by request id, the guest's ``HANDLE``
reply binds that name to a handle, ``WRITE`` puts bytes at their offset and ``CLOSE``
(or the channel's end) finishes the file. A HANDLE that names a handle still open (a CLOSE
sent before the OPEN's reply came back, or a hostile sftp-server) finishes the file it
replaces first (drops it if nothing was written), so no capture, and no descriptor, is
ever orphaned; how many are open at once is the
session's bound (:class:`sensor.capture.SessionFiles`). Packets over the bound or
malformed packets stop the inspection; the relay itself is never held up.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from sensor.capture import Capture, Logger, SessionFiles

FXP_OPEN = 3
FXP_CLOSE = 4
FXP_WRITE = 6
FXP_STATUS = 101
FXP_HANDLE = 102
FXF_WRITE = 0x02
# An SFTP WRITE carries at most 256 KiB in practice (OpenSSH sends 32 KiB).
MAX_PACKET = 256 * 1024 + 1024
# OPEN requests awaiting the guest's answer that are remembered, per channel.
MAX_PENDING = 32


class Malformed(Exception):
    """A packet field runs past the packet's end."""


class Fields:
    """Reads SFTP's big-endian fields from one packet."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._at = 0

    def uint(self, size: int) -> int:
        """An unsigned integer of ``size`` bytes."""
        if self._at + size > len(self._data):
            raise Malformed
        value = int.from_bytes(self._data[self._at : self._at + size], "big")
        self._at += size
        return value

    def string(self) -> bytes:
        """A length-prefixed string."""
        size = self.uint(4)
        if self._at + size > len(self._data):
            raise Malformed
        value = self._data[self._at : self._at + size]
        self._at += size
        return value


class Packets:
    """Splits one direction's byte stream into SFTP packets (type byte + body)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Complete packets in the bytes so far; Malformed if one exceeds the bound."""
        self._buffer += data
        out = []
        while len(self._buffer) >= 4:
            size = int.from_bytes(self._buffer[:4], "big")
            if size > MAX_PACKET or size == 0:
                raise Malformed
            if len(self._buffer) < 4 + size:
                break
            out.append(bytes(self._buffer[4 : 4 + size]))
            del self._buffer[: 4 + size]
        return out


class SftpObserver:
    """Watches one SFTP channel; hands each uploaded file to ``on_file(name, capture)``."""

    def __init__(
        self,
        files: SessionFiles,
        on_file: Callable[[str, Capture], None],
    ) -> None:
        self._files = files
        self._on_file = on_file
        self._log: Logger = files.log
        self._requests = Packets()
        self._responses = Packets()
        self._opening: dict[int, str] = {}
        self._open: dict[bytes, tuple[str, Capture]] = {}
        self._stopped = False
        self._request_handlers = {
            FXP_OPEN: self._on_open,
            FXP_WRITE: self._on_write,
            FXP_CLOSE: self._on_close,
        }
        self._response_handlers = {FXP_HANDLE: self._on_handle, FXP_STATUS: self._on_status}

    def from_client(self, data: bytes) -> None:
        """Bytes the client sent to the guest."""
        self._parse(self._requests, data, self._request_handlers)

    def from_guest(self, data: bytes) -> None:
        """Bytes the guest sent to the client."""
        self._parse(self._responses, data, self._response_handlers)

    def close(self) -> None:
        """The channel ended: finish files still open (the attacker wrote them)."""
        for handle in list(self._open):
            self._finish(handle)
        self._opening.clear()

    def _parse(
        self, packets: Packets, data: bytes, handlers: Mapping[int, Callable[[Fields], None]]
    ) -> None:
        """Dispatch each complete packet to its handler."""
        if self._stopped:
            return
        try:
            for packet in packets.feed(data):
                handler = handlers.get(packet[0])
                if handler is not None:
                    handler(Fields(packet[1:]))
        except Malformed:
            self._log.warning("sftp inspection stopped: malformed or oversized packet")
            self._stopped = True
            self.close()

    def _on_open(self, fields: Fields) -> None:
        """OPEN: remember names of files opened for writing."""
        request = fields.uint(4)
        name = fields.string().decode("utf-8", "replace")
        if fields.uint(4) & FXF_WRITE and len(self._opening) < MAX_PENDING:
            self._opening[request] = name

    def _on_handle(self, fields: Fields) -> None:
        """HANDLE: the guest opened a file we are waiting for."""
        name = self._opening.pop(fields.uint(4), None)
        if name is None:
            return
        handle = fields.string()
        self._replace(handle)
        capture = self._files.begin()
        if capture is not None:
            self._open[handle] = (name, capture)

    def _on_status(self, fields: Fields) -> None:
        """STATUS: an OPEN that failed needs no capture."""
        self._opening.pop(fields.uint(4), None)

    def _on_write(self, fields: Fields) -> None:
        """WRITE: bytes at an offset."""
        fields.uint(4)
        entry = self._open.get(fields.string())
        offset = fields.uint(8)
        data = fields.string()
        if entry is not None:
            entry[1].write_at(offset, data)

    def _on_close(self, fields: Fields) -> None:
        """CLOSE: the file is complete."""
        fields.uint(4)
        self._finish(fields.string())

    def _replace(self, handle: bytes) -> None:
        """A handle named again without a CLOSE seen: its file is done (dropped if empty)."""
        entry = self._open.get(handle)
        if entry is None:
            return
        if entry[1].written:
            self._finish(handle)
        else:
            del self._open[handle]
            entry[1].abort()

    def _finish(self, handle: bytes) -> None:
        """Hand a complete file on."""
        entry = self._open.pop(handle, None)
        if entry is not None:
            self._on_file(*entry)
