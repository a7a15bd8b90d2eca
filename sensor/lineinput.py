"""Reconstructs the command lines an attacker types into a terminal.

Keystrokes arrive as raw bytes; the guest's shell does the real editing. This keeps a
best-effort copy of the line: printable characters append, backspace and DEL erase one,
^U and ^C clear the line, ^W erases a word, escape sequences (arrows, function keys)
are skipped, and Enter (CR or LF) ends the line. Lines are bounded in length.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable

MAX_LINE = 4096
ESC = "\x1b"
# Control characters and what they do to the line (others are dropped).
ERASE_CHAR = frozenset("\x7f\x08")
ERASE_LINE = frozenset("\x15\x03")
ERASE_WORD = "\x17"
ENTER = frozenset("\r\n")


class LineEditor:
    """Feeds keystrokes in, calls ``on_line(text)`` for every non-empty line entered."""

    __slots__ = ("_decoder", "_escape", "_last_enter", "_line", "_max_line", "_on_line")

    def __init__(self, on_line: Callable[[str], None], *, max_line: int = MAX_LINE) -> None:
        self._on_line = on_line
        self._max_line = max_line
        self._line: list[str] = []
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # Escape-sequence state: "" (none), "esc" (saw ESC), "csi" (in ESC [ ... final).
        self._escape = ""
        self._last_enter = ""

    def feed(self, data: bytes) -> None:
        """Apply keystrokes."""
        for char in self._decoder.decode(data):
            self._key(char)

    def _key(self, char: str) -> None:
        """Apply one character."""
        if self._escape:
            self._in_escape(char)
            return
        if char in ENTER:
            # CR LF from one Enter key must not end two lines.
            if not (char == "\n" and self._last_enter == "\r"):
                self._enter()
            self._last_enter = char
            return
        self._last_enter = ""
        if char == ESC:
            self._escape = "esc"
        elif char in ERASE_CHAR:
            if self._line:
                self._line.pop()
        elif char in ERASE_LINE:
            self._line.clear()
        elif char == ERASE_WORD:
            self._erase_word()
        elif char >= " " and len(self._line) < self._max_line:
            self._line.append(char)

    def _in_escape(self, char: str) -> None:
        """Skip ESC x, ESC O x and ESC [ params final."""
        if self._escape == "esc" and char in "[O":
            self._escape = "csi" if char == "[" else "ss3"
        elif self._escape == "csi" and not "\x40" <= char <= "\x7e":
            return  # parameter or intermediate byte
        else:
            self._escape = ""

    def _erase_word(self) -> None:
        """^W: drop trailing spaces, then the word before them."""
        while self._line and self._line[-1] == " ":
            self._line.pop()
        while self._line and self._line[-1] != " ":
            self._line.pop()

    def _enter(self) -> None:
        """End the line."""
        text = "".join(self._line).strip()
        self._line.clear()
        if text:
            self._on_line(text)
