"""What a Telnet peer sends besides data: option commands and subnegotiations, bounded.

telnetlib3 interprets the protocol; this guard reads the same raw bytes first (from the
protocol's ``data_received``) and enforces what telnetlib3 leaves open:

* a subnegotiation (``IAC SB ... IAC SE``) longer than ``max_subnegotiation`` bytes ends
  the connection (telnetlib3 buffers up to 1 MiB, then discards and carries on);
* more than ``max_negotiations`` option commands and subnegotiations end it too, which
  is what stops an option ping-pong (well-formed window-size updates are not counted:
  terminals send one per resize; empty or oversized ones are);
* compression (MCCP2/MCCP3) started by the peer ends it: we never agree to compression,
  and telnetlib3 would otherwise start inflating whatever follows.

It also remembers every option command once, in order, for the session's log, and hands
each complete subnegotiation (raw, as received) to a callback.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

from telnetlib3.telopt import name_command

IAC = 255
SB = 250
SE = 240
# The three-byte option commands, by code.
COMMANDS = {251: "WILL", 252: "WONT", 253: "DO", 254: "DONT"}
NAWS = 31
# IAC SB NAWS, two 16-bit sizes (each byte possibly doubled as IAC IAC), IAC SE.
MAX_NAWS = 3 + 2 * 4 + 2
MCCP = frozenset({86, 87})


class NegotiationViolation(Exception):
    """The peer broke a negotiation bound; the connection must end."""


class _Scan(Enum):
    """Where the scanner is in the byte stream."""

    DATA = "data"
    IAC = "iac"
    OPTION = "option"
    SB = "sb"
    SB_IAC = "sb-iac"


class NegotiationGuard:
    """Incremental scanner of one direction of a Telnet connection."""

    def __init__(
        self,
        *,
        max_subnegotiation: int,
        max_negotiations: int,
        on_subnegotiation: Callable[[bytes], None] | None = None,
    ) -> None:
        self._max_sb = max_subnegotiation
        self._max_negotiations = max_negotiations
        self._on_subnegotiation = on_subnegotiation
        self._state = _Scan.DATA
        self._command = 0
        self._sb = bytearray()
        self.negotiations = 0
        # Insertion-ordered set of "WILL NAWS"-style strings.
        self.options: dict[str, None] = {}
        self._scanners: dict[_Scan, Callable[[bytes, int], int]] = {
            _Scan.DATA: self._data,
            _Scan.IAC: self._iac,
            _Scan.OPTION: self._option,
            _Scan.SB: self._subnegotiation,
            _Scan.SB_IAC: self._subnegotiation_iac,
        }

    def feed(self, data: bytes) -> None:
        """Scan more bytes; raises NegotiationViolation when a bound is broken."""
        position = 0
        while position < len(data):
            position = self._scanners[self._state](data, position)

    def _data(self, data: bytes, position: int) -> int:
        """Plain data: skip to the next IAC."""
        found = data.find(IAC, position)
        if found < 0:
            return len(data)
        self._state = _Scan.IAC
        return found + 1

    def _iac(self, data: bytes, position: int) -> int:
        """The byte after IAC."""
        byte = data[position]
        if byte in COMMANDS:
            self._command = byte
            self._state = _Scan.OPTION
        elif byte == SB:
            self._sb = bytearray((IAC, SB))
            self._state = _Scan.SB
        else:  # IAC IAC (a data byte) or a two-byte command (NOP, AYT, IP, ...)
            self._state = _Scan.DATA
        return position + 1

    def _option(self, data: bytes, position: int) -> int:
        """The option byte of WILL/WONT/DO/DONT."""
        option = data[position]
        self._count()
        self.options.setdefault(f"{COMMANDS[self._command]} {_name(option)}")
        self._state = _Scan.DATA
        return position + 1

    def _subnegotiation(self, data: bytes, position: int) -> int:
        """Inside IAC SB: take bytes up to the next IAC, within the bound."""
        found = data.find(IAC, position)
        end = len(data) if found < 0 else found
        self._sb += data[position:end]
        if len(self._sb) > self._max_sb:
            raise NegotiationViolation(f"subnegotiation longer than {self._max_sb} bytes")
        if len(self._sb) > 2 and self._sb[2] in MCCP:
            raise NegotiationViolation(f"{_name(self._sb[2])} started without agreement")
        if found < 0:
            return end
        self._state = _Scan.SB_IAC
        return found + 1

    def _subnegotiation_iac(self, data: bytes, position: int) -> int:
        """IAC inside a subnegotiation: an escaped 255, the end (SE), or a broken one."""
        byte = data[position]
        if byte == IAC:
            self._sb += bytes((IAC, IAC))
            self._state = _Scan.SB
            return position + 1
        if byte != SE:
            # RFC 854 allows only IAC IAC and IAC SE here; like telnetlib3, treat the
            # subnegotiation as abandoned and this byte as a command after IAC.
            self._state = _Scan.IAC
            return position
        self._sb += bytes((IAC, SE))
        # A window size is free (terminals send one per resize); anything longer tagged
        # NAWS, and an empty IAC SB IAC SE, count like every other subnegotiation.
        if not (self._sb[2] == NAWS and len(self._sb) <= MAX_NAWS):
            self._count()
        self._state = _Scan.DATA
        if self._on_subnegotiation is not None:
            self._on_subnegotiation(bytes(self._sb))
        return position + 1

    def _count(self) -> None:
        """One more negotiation; past the bound the peer is cut off."""
        self.negotiations += 1
        if self.negotiations > self._max_negotiations:
            raise NegotiationViolation(f"more than {self._max_negotiations} option negotiations")


def _name(option: int) -> str:
    """An option's name ("NAWS"), or its number when telnetlib3 has none."""
    name = name_command(bytes([option]))
    return str(option) if name.startswith("b'") else name
