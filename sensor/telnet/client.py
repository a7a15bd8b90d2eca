"""What an attacker's Telnet client told during negotiation, and its events.

Every option command is logged once (``honeyfleet.telnet.options``, with the terminal
type, speed and X display), every NEW-ENVIRON variable once (``cowrie.client.var``), the
first window size (``cowrie.client.size``). A username found in a raw ENVIRON or
NEW-ENVIRON subnegotiation by ``telnet_username_in_negotiation_regex`` is kept for the
login, unless it starts with ``-``: ``USER=-f root`` is the telnetd authentication
bypass, logged as ``cowrie.telnet.exploit_attempt`` and never used or forwarded.
"""

from __future__ import annotations

import re

from sensor.config import SensorConfig
from sensor.events import SessionEvents
from sensor.telnet.negotiation import NegotiationGuard

MAX_ENV = 32
MAX_VALUE = 1024
DEFAULT_TERM = "xterm"
DEFAULT_SIZE = (80, 24)
# ENVIRON and NEW-ENVIRON: the only subnegotiations that carry USER. The expression is
# the operator's; it is not run over every other subnegotiation an attacker makes up.
ENVIRON_OPTIONS = frozenset({36, 39})


class ClientInfo:
    """One client's negotiation: bounds (:attr:`guard`), what it said, the events."""

    def __init__(self, config: SensorConfig, events: SessionEvents) -> None:
        self._events = events
        self.guard = NegotiationGuard(
            max_subnegotiation=config.telnet_max_subnegotiation,
            max_negotiations=config.telnet_max_negotiations,
            on_subnegotiation=self._subnegotiation,
        )
        self._username_regex = re.compile(
            config.telnet_username_in_negotiation_regex.encode("latin-1"), re.DOTALL
        )
        self.username: str | None = None
        self.environ: dict[str, str] = {}
        self.info: dict[str, str] = {}
        self.size: tuple[int, int] | None = None
        self._options_reported: int | None = None
        self._exploit_seen = False

    @property
    def term(self) -> str:
        """The terminal type, or a common default."""
        return self.info.get("ttype", DEFAULT_TERM)

    @property
    def window(self) -> tuple[int, int]:
        """(columns, rows), or the usual 80x24."""
        return self.size or DEFAULT_SIZE

    def resized(self, cols: int, rows: int) -> None:
        """A window size (NAWS); the first is logged."""
        if self.size is None:
            self._events.emit(
                "cowrie.client.size", "Terminal Size: {width} {height}", width=cols, height=rows
            )
        self.size = (cols, rows)

    def told(self, name: str, value: str) -> None:
        """Terminal type, speed or X display."""
        self.info[name] = value[:MAX_VALUE]

    def environment(self, env: dict[str, str]) -> None:
        """NEW-ENVIRON variables: each logged once and kept (bounded)."""
        for name, value in env.items():
            if name in self.environ:
                continue  # whatever a client repeats is logged once
            if len(self.environ) >= MAX_ENV:
                break
            value = value[:MAX_VALUE]
            self.environ[name] = value
            self._events.emit(
                "cowrie.client.var", "Telnet NEW-ENVIRON: {name}={value}", name=name, value=value
            )
            if name == "USER":
                self._check_exploit(value)

    def report_options(self) -> None:
        """Log the option commands not logged yet.

        The first report (when negotiation settles) is made even if there were none and
        carries the terminal details; a later one only if new commands came.
        """
        first = self._options_reported is None
        options = list(self.guard.options)[self._options_reported or 0 :]
        if not options and not first:
            return
        self._options_reported = len(self.guard.options)
        self._events.emit(
            "honeyfleet.telnet.options",
            "Telnet client options: {summary}",
            message_args={"summary": ", ".join(options) or "none"},
            options=options,
            **(self.info if first else {}),
        )

    def _subnegotiation(self, raw: bytes) -> None:
        """A complete subnegotiation: look for a username in an environment one."""
        # raw is IAC SB option ... IAC SE.
        if len(raw) < 3 or raw[2] not in ENVIRON_OPTIONS:
            return
        found = self._username_regex.search(raw)
        if found is None:
            return
        username = found.group(2)[:MAX_VALUE].decode("utf-8", "replace")
        self._check_exploit(username)
        # Never a value that a telnetd would pass to login(1) as options.
        if username and not username.startswith("-"):
            self.username = username

    def _check_exploit(self, username: str) -> None:
        """``USER=-f root`` (CVE-2026-24061), logged once."""
        if username.startswith("-f") and not self._exploit_seen:
            self._exploit_seen = True
            self._events.emit(
                "cowrie.telnet.exploit_attempt",
                "CVE-2026-24061 exploit attempt detected: USER={value}",
                cve="CVE-2026-24061",
                name="USER",
                value=username,
            )
