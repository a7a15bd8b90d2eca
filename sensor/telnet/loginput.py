"""What the attacker types at a login prompt, with the echo a login would give.

Keystrokes are held back from the guest until a line is complete: with spoofing, the
guest never sees what the attacker typed, only the credentials the sensor sends for it.
At a username prompt the typing is echoed (as the guest would), at a password prompt it
is not, and password keystrokes are never passed to the recording. Enter is ``\\r\\n``,
``\\r\\0``, a bare ``\\r`` or a bare ``\\n``; the line remembers which, so the guest gets
the same. Cursor and function keys are dropped. Bytes typed while no prompt is up wait
(bounded) for the next one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sensor.telnet.login import Prompt

CR, LF, NUL, ESC = 0x0D, 0x0A, 0x00, 0x1B
ERASE_CHAR = frozenset({0x7F, 0x08})
ERASE_LINE = 0x15
RUBOUT = b"\b \b"


@dataclass(frozen=True)
class Line:
    """One line typed at a prompt."""

    prompt: Prompt
    text: str
    # How the attacker ended it; a bare CR is sent on as CR NUL, as RFC 854 asks.
    ending: bytes


class LoginInput:
    """Turns keystrokes into lines for the prompt that is up (``prompt``)."""

    def __init__(
        self,
        *,
        max_line: int,
        max_pending: int,
        echo: Callable[[bytes], None],
        record: Callable[[bytes], None],
    ) -> None:
        self.prompt: Prompt | None = None
        self._max_line = max_line
        self._max_pending = max_pending
        self._echo = echo
        self._record = record
        self._pending = bytearray()
        self._line = bytearray()
        self._after_cr = False
        # Escape-sequence state: "" (none), "esc" (saw ESC), "csi" (in ESC [ ... final),
        # "ss3" (ESC O, one byte to go).
        self._escape = ""
        # Echo of one next_line call, written at once (not a write per keystroke).
        self._shown = bytearray()

    def feed(self, data: bytes) -> None:
        """Take keystrokes (consumed by :meth:`next_line`); beyond the bound they are dropped."""
        self._pending += data[: max(0, self._max_pending - len(self._pending))]

    def take_pending(self) -> bytes:
        """Everything typed ahead and not consumed (for the shell once logged in)."""
        if self._after_cr and self._pending and self._pending[0] in (LF, NUL):
            del self._pending[:1]
        self._after_cr = False
        data = bytes(self._pending)
        self._pending.clear()
        return data

    def next_line(self) -> Line | None:
        """Consume keystrokes at the current prompt until a line is complete."""
        prompt = self.prompt
        if prompt is None:
            return None
        consumed, enter = 0, b""
        while not enter and consumed < len(self._pending):
            consumed += 1
            enter = self._key(prompt, self._pending[consumed - 1])
        if enter == b"\r" and consumed < len(self._pending):
            # The CR's companion belongs to this Enter, never to the next line.
            companion = self._pending[consumed]
            if companion in (LF, NUL):
                consumed += 1
                enter += bytes((companion,))
            self._after_cr = False
        line = self._finish(prompt, b"\r\0" if enter == b"\r" else enter) if enter else None
        if self._shown:
            # All of this call's echo at once: one write (and recording entry), not one
            # per keystroke.
            self._echo(bytes(self._shown))
            self._shown.clear()
        if prompt is Prompt.USERNAME:
            self._record(bytes(self._pending[:consumed]))
        del self._pending[:consumed]
        return line

    def _key(self, prompt: Prompt, byte: int) -> bytes:
        """Apply one keystroke; the Enter byte (CR or LF) when it ends the line."""
        after_cr, self._after_cr = self._after_cr, False
        if after_cr and byte in (LF, NUL):
            return b""  # the second half of an Enter that ended the previous line
        if self._escape and byte >= 0x20:
            self._in_escape(byte)
            return b""
        # A control key ends an escape sequence and does what it does (as a terminal
        # executes C0 controls inside one): Enter after a stray ESC still ends the line.
        self._escape = ""
        if byte in (CR, LF):
            self._after_cr = byte == CR
            return bytes((byte,))
        if byte == ESC:
            self._escape = "esc"
        elif byte in ERASE_CHAR:
            self._erase(prompt, 1)
        elif byte == ERASE_LINE:
            self._erase(prompt, len(self._line))
        elif byte >= 0x20 and len(self._line) < self._max_line:
            self._line.append(byte)
            self._show(prompt, bytes((byte,)))
        return b""

    def _in_escape(self, byte: int) -> None:
        """Skip cursor and function keys (ESC x, ESC O x, ESC [ params final)."""
        if self._escape == "esc" and byte in b"[O":
            self._escape = "csi" if byte == ord("[") else "ss3"
        elif self._escape == "csi" and not 0x40 <= byte <= 0x7E:
            return  # a parameter or intermediate byte
        else:
            self._escape = ""

    def _erase(self, prompt: Prompt, count: int) -> None:
        """Rub out up to ``count`` characters (a UTF-8 character's bytes go together)."""
        for _ in range(count):
            if not self._line:
                return
            while len(self._line) > 1 and 0x80 <= self._line[-1] < 0xC0:
                self._line.pop()
            self._line.pop()
            self._show(prompt, RUBOUT)

    def _finish(self, prompt: Prompt, ending: bytes) -> Line:
        """End the line."""
        self._show(prompt, b"\r\n")
        text = self._line.decode("utf-8", "replace")
        self._line.clear()
        self._escape = ""
        self.prompt = None
        return Line(prompt, text, ending)

    def _show(self, prompt: Prompt, data: bytes) -> None:
        """Echo at a username prompt; a password prompt shows nothing."""
        if prompt is Prompt.USERNAME:
            self._shown += data
