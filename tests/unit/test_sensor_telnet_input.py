"""Login keystrokes: echo, line endings, editing, and what the recording may keep."""

from __future__ import annotations

import pytest

from sensor.telnet.login import Prompt
from sensor.telnet.loginput import Line, LoginInput


class Keys:
    """A LoginInput with its echo and recording captured."""

    def __init__(self, max_line: int = 64) -> None:
        self.echo = bytearray()
        self.recorded = bytearray()
        self.input = LoginInput(
            max_line=max_line, max_pending=1024, echo=self.echo.extend, record=self.recorded.extend
        )

    def type(self, data: bytes, prompt: Prompt | None = None) -> list[Line]:
        """Feed keystrokes at ``prompt`` (each line leaves no prompt up, as at a login)."""
        if prompt is not None:
            self.input.prompt = prompt
        self.input.feed(data)
        lines = []
        while (line := self.input.next_line()) is not None:
            lines.append(line)
            self.input.prompt = prompt
        return lines


@pytest.mark.parametrize("enter", [b"\r\n", b"\r\0", b"\n"])
def test_every_enter_ends_the_line_and_is_passed_on_as_typed(enter: bytes) -> None:
    keys = Keys()
    assert keys.type(b"root" + enter, Prompt.USERNAME) == [Line(Prompt.USERNAME, "root", enter)]
    assert bytes(keys.echo) == b"root\r\n"
    assert bytes(keys.recorded) == b"root" + enter


def test_a_bare_cr_is_sent_as_cr_nul_and_its_late_companion_is_swallowed() -> None:
    keys = Keys()
    assert keys.type(b"root\r", Prompt.USERNAME) == [Line(Prompt.USERNAME, "root", b"\r\0")]
    assert keys.type(b"\nsecret\r\n", Prompt.PASSWORD) == [Line(Prompt.PASSWORD, "secret", b"\r\n")]
    keys.input.prompt = None
    keys.type(b"x\r")
    assert keys.input.take_pending() == b"x\r"
    keys.type(b"\rab\r", Prompt.USERNAME)
    keys.input.prompt = None
    keys.input.feed(b"\0ls\r\0")
    assert keys.input.take_pending() == b"ls\r\0"


def test_passwords_are_neither_echoed_nor_recorded() -> None:
    keys = Keys()
    assert keys.type(b"hunter2\r\0", Prompt.PASSWORD) == [Line(Prompt.PASSWORD, "hunter2", b"\r\0")]
    assert keys.echo == b"" and keys.recorded == b""


def test_erasing_and_cursor_keys() -> None:
    keys = Keys()
    lines = keys.type(b"rooot\x7f\x7f\x08ot\r\n", Prompt.USERNAME)
    assert lines[0].text == "root"
    assert keys.echo.count(b"\b \b") == 3
    assert keys.type(b"junk\x15admin\x1b[D\x1bOA\r\n", Prompt.USERNAME)[0].text == "admin"
    assert keys.type("jürg\x7f\x7f\r\n".encode(), Prompt.USERNAME)[0].text == "jü"
    assert keys.type(b"\x7f\x7f\r\n", Prompt.USERNAME)[0].text == ""


def test_lines_are_bounded() -> None:
    keys = Keys(max_line=8)
    assert keys.type(b"a" * 100 + b"\r\n", Prompt.USERNAME)[0].text == "a" * 8


def test_keystrokes_wait_for_a_prompt_and_type_ahead_is_bounded() -> None:
    keys = Keys()
    keys.input.feed(b"root\r\ntoor\r\n")
    assert keys.input.next_line() is None  # no prompt up
    keys.input.prompt = Prompt.USERNAME
    assert keys.input.next_line() == Line(Prompt.USERNAME, "root", b"\r\n")
    assert keys.input.next_line() is None  # the login has not asked for the password yet
    keys.input.prompt = Prompt.PASSWORD
    assert keys.input.next_line() == Line(Prompt.PASSWORD, "toor", b"\r\n")
    keys.input.feed(b"x" * 5000)
    assert len(keys.input.take_pending()) == 1024


def test_enter_after_a_stray_escape_still_ends_the_line() -> None:
    keys = Keys()
    lines = keys.type(b"root\x1b\r123 admin\r", Prompt.USERNAME)
    assert lines == [
        Line(Prompt.USERNAME, "root", b"\r\0"),
        Line(Prompt.USERNAME, "123 admin", b"\r\0"),
    ]
    assert bytes(keys.echo) == b"root\r\n123 admin\r\n"
    # ESC x ends after one byte, ESC [ only at its final byte, ESC O after one more.
    assert keys.type(b"a\x1bbc\x1b[1;5Dd\x1bOPe\r\n", Prompt.USERNAME)[0].text == "acde"


def test_the_echo_of_a_line_is_written_at_once() -> None:
    writes: list[bytes] = []
    keys = LoginInput(max_line=64, max_pending=1024, echo=writes.append, record=lambda _: None)
    keys.prompt = Prompt.USERNAME
    keys.feed(b"roox\x7ft")
    assert keys.next_line() is None
    keys.feed(b"\r\n")
    assert keys.next_line() == Line(Prompt.USERNAME, "root", b"\r\n")
    assert writes == [b"roox\b \bt", b"\r\n"]
