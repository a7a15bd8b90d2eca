"""inetutils telnetd's side of the negotiation, as a telnetlib3 writer that sends it.

What Debian 12's ``telnetd`` (inetutils 2.4) sends, round by round, each round once the
client has answered everything the one before asked:

1. ``WILL AUTHENTICATION, WILL ENCRYPT, DO TTYPE, DO TSPEED, DO XDISPLOC, DO NEW-ENVIRON,
   DO OLD-ENVIRON``;
2. for each of those the client agreed to, in this order: ``SB TSPEED SEND``,
   ``SB XDISPLOC SEND``, ``SB NEW-ENVIRON SEND`` (no variable list: "all of them"),
   ``SB TTYPE SEND``;
3. ``WILL SGA, DO ECHO, DO LINEMODE, DO NAWS, WILL STATUS, DO LFLOW``; a client that
   agrees to LINEMODE is told ``MODE EDIT|TRAPSIG`` at once, and the round is answered
   when it acknowledges the mode;
4. ``SB LFLOW RESTART-ANY`` (if it agreed to flow control), ``WILL ECHO``, ``DO TM`` (the
   kludge line mode probe, only for a client that refused LINEMODE), ``DO BINARY``, and
   for a line-mode client ``DONT LINEMODE`` with the reply to its special characters:
   telnetd gives up line mode once ``login`` puts the pty in raw mode, and so do we;
5. ``WILL SGA`` and ``WILL ECHO`` again, to a client that refused them and line mode.

telnetd ends its LINEMODE MODE and LFLOW subnegotiations with a NUL byte; so do we. It
sends what it has to say in one write per round (and per client packet it answers); so
do we (:meth:`TelnetdWriter.held`): a round split over several TCP segments is what
nmap's "Linux telnetd" pattern matches on (it ends a read at ``DO XDISPLOC``).
Where telnetlib3 answers differently (``SB STATUS IS`` sent unasked on ``DO STATUS``, a
``DONT`` to OLD-ENVIRON, its own variable list), the methods below answer as telnetd.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator

from telnetlib3.slc import LMODE_MODE, LMODE_SLC
from telnetlib3.stream_writer import TelnetWriter
from telnetlib3.telopt import (
    AUTHENTICATION,
    BINARY,
    DO,
    DONT,
    ECHO,
    ENCRYPT,
    IAC,
    LFLOW,
    LINEMODE,
    NAWS,
    NEW_ENVIRON,
    SB,
    SE,
    SEND,
    SGA,
    STATUS,
    TM,
    TSPEED,
    TTYPE,
    WILL,
    XDISPLOC,
)

OLD_ENVIRON = b"$"  # RFC 1408 (telnetlib3 has no name for it)
FIRST_ROUND = (
    (WILL, AUTHENTICATION),
    (WILL, ENCRYPT),
    (DO, TTYPE),
    (DO, TSPEED),
    (DO, XDISPLOC),
    (DO, NEW_ENVIRON),
    (DO, OLD_ENVIRON),
)
# The SEND requests of round 2, in telnetd's order.
REQUESTED = (TSPEED, XDISPLOC, NEW_ENVIRON, TTYPE)
THIRD_ROUND = ((WILL, SGA), (DO, ECHO), (DO, LINEMODE), (DO, NAWS), (WILL, STATUS), (DO, LFLOW))
# LINEMODE MODE: EDIT | TRAPSIG, and the ACK bit of the client's answer.
MODE_EDIT_TRAPSIG = 0x03
MODE_ACK = 0x04
LFLOW_RESTART_ANY = 0x03
SLC_ACK = 0x80
SLC_LEVEL = 0x03
SLC_NOSUPPORT = 0
SLC_DEFAULT = 3
# The special characters of a Linux pty (what telnetd reads from it), as SLC triplets'
# (flags, value): interrupt, abort and suspend flush input and output as the pty does.
PTY_SLC = {
    3: (0x62, 0x03),  # IP: ^C
    4: (0x02, 0x0F),  # AO: ^O
    7: (0x62, 0x1C),  # ABORT: ^\
    8: (0x02, 0x04),  # EOF: ^D
    9: (0x42, 0x1A),  # SUSP: ^Z
    10: (0x02, 0x7F),  # EC: DEL
    11: (0x02, 0x15),  # EL: ^U
    12: (0x02, 0x17),  # EW: ^W
    13: (0x02, 0x12),  # RP: ^R
    14: (0x02, 0x16),  # LNEXT: ^V
    15: (0x02, 0x11),  # XON: ^Q
    16: (0x02, 0x13),  # XOFF: ^S
}


def slc_reply(triplets: bytes) -> bytes:
    """telnetd's answer to a client's SLC list: an ACK where the pty agrees, else the pty's.

    Functions both sides do not support are left out, as telnetd leaves them out.
    """
    out = bytearray()
    for i in range(0, len(triplets) - 2, 3):
        func, flags, value = triplets[i : i + 3]
        ours = PTY_SLC.get(func)
        if ours is None:
            if flags & SLC_LEVEL != SLC_NOSUPPORT:
                out += bytes((func, SLC_NOSUPPORT, 0))
        elif flags & SLC_LEVEL != SLC_DEFAULT and value == ours[1]:
            out += bytes((func, flags | SLC_ACK, value))
        else:
            out += bytes((func, *ours))
    return bytes(out).replace(IAC, IAC + IAC)


def _subnegotiation(option: bytes, payload: bytes, *, nul: bool = False) -> bytes:
    """IAC SB option payload IAC SE, and telnetd's trailing NUL where it sends one."""
    return IAC + SB + option + payload + IAC + SE + (b"\0" if nul else b"")


class TelnetdWriter(TelnetWriter):
    """telnetlib3's writer, negotiating in telnetd's rounds (:meth:`next_round`)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._rounds = iter((self._first, self._requests, self._third, self._fourth, self._fifth))
        self._slc_reply = b""
        self._held: bytearray | None = None

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Everything sent inside goes out in one write at the end (nested: the outermost)."""
        if self._held is not None:
            yield
            return
        self._held = bytearray()
        try:
            yield
        finally:
            held, self._held = bytes(self._held), None
            if held:
                super().send_iac(held)

    def send_iac(self, buf: bytes) -> None:
        """Send, or keep for the end of :meth:`held`."""
        if self._held is None:
            super().send_iac(buf)
        else:
            self._held += buf

    def next_round(self) -> bool:
        """Send the next round that has something to say; False when all were sent."""
        with self.held():
            return any(send() for send in self._rounds)

    def _commands(self, commands: tuple[tuple[bytes, bytes], ...]) -> bool:
        """Send option commands; True when there were any."""
        for command, option in commands:
            self.iac(command, option)
        return bool(commands)

    def _first(self) -> bool:
        """Terminal, speed, display, environments; authentication and encryption offered."""
        return self._commands(FIRST_ROUND)

    def _requests(self) -> bool:
        """SEND for every option of the first round the client agreed to."""
        agreed = [option for option in REQUESTED if self.remote_option.enabled(option)]
        for option in agreed:
            self.pending_option[SB + option] = True
            self.send_iac(_subnegotiation(option, SEND))
        return bool(agreed)

    def _third(self) -> bool:
        """Echo, line mode, window size, status, flow control."""
        return self._commands(THIRD_ROUND)

    def _fourth(self) -> bool:
        """Character mode: we echo, the client sends binary; line mode given up."""
        linemode = self.remote_option.enabled(LINEMODE)
        if self.remote_option.enabled(LFLOW):
            self.send_iac(_subnegotiation(LFLOW, bytes((LFLOW_RESTART_ANY,)), nul=True))
        self.iac(WILL, ECHO)
        if not linemode:
            self.iac(DO, TM)
        self.iac(DO, BINARY)
        if linemode:
            self.iac(DONT, LINEMODE)
            if self._slc_reply:
                self.send_iac(_subnegotiation(LINEMODE, LMODE_SLC + self._slc_reply))
        return True

    def _fifth(self) -> bool:
        """Suppress-go-ahead and echo again, to a client without line mode that refused them."""
        if self.remote_option.enabled(LINEMODE):
            return False
        refused = tuple((WILL, o) for o in (SGA, ECHO) if not self.local_option.enabled(o))
        return self._commands(refused)

    def handle_do(self, opt: bytes) -> bool:
        """DO STATUS is agreed without sending our status (telnetd waits for SEND)."""
        if opt == STATUS:
            return True
        return super().handle_do(opt)

    def handle_will(self, opt: bytes) -> None:
        """Record what round 2 and 4 ask about, instead of asking at once; start line mode."""
        if opt in (*REQUESTED, LFLOW, OLD_ENVIRON):
            # OLD-ENVIRON is taken and never used: NEW-ENVIRON is what telnetd asks for.
            self.remote_option[opt] = True
        elif opt == LINEMODE:
            if not self.remote_option.enabled(LINEMODE):
                self.remote_option[LINEMODE] = True
                self.pending_option[SB + LINEMODE] = True
                mode = LMODE_MODE + bytes((MODE_EDIT_TRAPSIG,))
                self.send_iac(_subnegotiation(LINEMODE, mode, nul=True))
        else:
            super().handle_will(opt)

    def handle_subnegotiation(self, buf: collections.deque[bytes]) -> None:
        """LINEMODE is ours: the mode's acknowledgement ends the wait, SLC is answered later."""
        if not buf or buf[0] != LINEMODE:
            super().handle_subnegotiation(buf)
            return
        payload = b"".join(buf)[1:]
        if payload[:1] == LMODE_MODE and len(payload) > 1 and payload[1] & MODE_ACK:
            self.pending_option[SB + LINEMODE] = False
        elif payload[:1] == LMODE_SLC:
            self._slc_reply = slc_reply(payload[1:])
