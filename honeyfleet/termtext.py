"""Attacker text made harmless for the operator's terminal.

Usernames, passwords, commands and client versions come from attackers. Printed as they
are, their escape sequences would erase lines, forge output, set the window title or
write the clipboard (OSC 52) in the operator's terminal, bidi overrides would reorder
what the operator reads, and rich would act on ``[link=...]`` markup. Every such string
goes through `shown` (plain output) or `cell` (rich tables) before it reaches a terminal;
``--json`` output stays exact and is not passed through here.
"""

from __future__ import annotations

from rich.text import Text

# The escapes operators know by sight; every other character gets its code point.
_SHORT = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(char: str) -> str:
    """A character as a Python-style escape (``\\r``, ``\\x1b``, ``\\u202e``, ``\\\\``)."""
    if char in _SHORT:
        return _SHORT[char]
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def shown(text: str) -> str:
    """``text`` with every character that is not printable made a visible escape.

    "Printable" is Python's `str.isprintable`: control characters (C0, DEL, C1),
    format characters (bidi overrides and isolates, zero-width characters), line and
    paragraph separators, spaces other than ASCII space, surrogates and unassigned code
    points are escaped. A backslash is doubled, so an escape on screen always means a
    character that was escaped, never one the attacker typed.
    """
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(c if c.isprintable() and c != "\\" else _escape(c) for c in text)


def cell(text: str) -> Text:
    """``shown(text)`` as rich Text: rich parses no markup or emoji codes in it."""
    return Text(shown(text))
