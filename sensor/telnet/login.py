"""The login dialogue of one Telnet connection, as an explicit state machine.

Telnet has no authentication messages: a login is text. The sensor first shows the
guests' greeting and prompts itself (no guest is leased for connections that never log
in), then, once a password deserves a guest (the userdb accepted it when spoofing; any
password otherwise), leases one and watches its output for the username and password
prompts (``telnet_*_prompt_regex``), answering them::

    LOCAL --password given--> CONNECTING --guest up--> WAITING
      ^                           |                     |  ^
      +------ no guest -----------+     username prompt |  | username sent
                                                        v  |
                           WAITING --password prompt--> USERNAME      PASSWORD
                                                                         |
                  PASSWORD --password sent--> VERIFYING --shell prompt--> LOGGED_IN
                  PASSWORD --password sent, credentials known good------> LOGGED_IN
                  VERIFYING --username or password prompt (failed)--> USERNAME | PASSWORD

``WAITING`` also goes straight to ``PASSWORD`` when the guest skips the username (it took
the one sent during negotiation), and back to ``LOCAL`` when a new guest shows no login
prompt in time. ``LOGGED_IN`` is final: detection stops, so a shell's
own "Password:" (``su``, ``passwd``) is never taken for the login's.
"""

from __future__ import annotations

import re
from enum import Enum

from honeyfleet.errors import FailedPrecondition

# How much of the guest's latest output prompt detection looks at.
TAIL_CHARS = 2048
# Bytes of one chunk of output normalised for it: room for the line ends, NULs and colour
# codes that normalising drops (a chunk is up to 64 KiB, and only its end matters).
MAX_FEED = 4 * TAIL_CHARS
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class LoginState(Enum):
    """Where a connection's login dialogue is."""

    LOCAL = "local"
    CONNECTING = "connecting"
    WAITING = "waiting"
    USERNAME = "username"
    PASSWORD = "password"  # noqa: S105 (a name, not a secret)
    VERIFYING = "verifying"
    LOGGED_IN = "logged_in"


ALLOWED: dict[LoginState, frozenset[LoginState]] = {
    LoginState.LOCAL: frozenset({LoginState.CONNECTING}),
    LoginState.CONNECTING: frozenset({LoginState.WAITING, LoginState.LOCAL}),
    LoginState.WAITING: frozenset({LoginState.USERNAME, LoginState.PASSWORD, LoginState.LOCAL}),
    LoginState.USERNAME: frozenset({LoginState.WAITING}),
    LoginState.PASSWORD: frozenset({LoginState.VERIFYING, LoginState.LOGGED_IN}),
    LoginState.VERIFYING: frozenset(
        {LoginState.USERNAME, LoginState.PASSWORD, LoginState.LOGGED_IN}
    ),
    LoginState.LOGGED_IN: frozenset(),
}


def transition(current: LoginState, new: LoginState) -> LoginState:
    """The new state, if the move is legal; FailedPrecondition otherwise."""
    if new not in ALLOWED[current]:
        raise FailedPrecondition(f"login cannot go from {current.value} to {new.value}")
    return new


class Prompt(Enum):
    """What the guest's output ends with."""

    USERNAME = "username"
    PASSWORD = "password"  # noqa: S105 (a name, not a secret)
    SHELL = "shell"


class PromptDetector:
    """Matches the prompt regexes against the end of the guest's recent output.

    Output is normalised first: every line ending (``\\r\\n``, ``\\r\\0``, ``\\n``, a
    bare ``\\r``) becomes ``\\n``, NULs and ANSI colour codes go, so one expression
    matches whatever the guest's telnetd sends.
    """

    def __init__(self, *, username: str, password: str, shell: str) -> None:
        self._patterns = {
            Prompt.PASSWORD: re.compile(password),
            Prompt.USERNAME: re.compile(username),
            Prompt.SHELL: re.compile(shell),
        }
        self._tail = ""

    def feed(self, data: bytes) -> None:
        """Add guest output."""
        if len(data) > MAX_FEED:
            data = data[-MAX_FEED:]
            self._tail = ""  # no longer next to what follows
        text = (
            data.replace(b"\r\0", b"\n")
            .replace(b"\r\n", b"\n")
            .replace(b"\r", b"\n")
            .replace(b"\0", b"")
            .decode("utf-8", "replace")
        )
        self._tail = _ANSI.sub("", self._tail + text)[-TAIL_CHARS:]

    def clear(self) -> None:
        """Forget what was seen (after answering a prompt)."""
        self._tail = ""

    def prompt(self, *wanted: Prompt) -> Prompt | None:
        """The first of ``wanted`` whose expression matches the recent output."""
        for kind in wanted:
            if self._patterns[kind].search(self._tail):
                return kind
        return None
