"""``log_raw``: the raw bytes each side of a Telnet proxy sent, for tuning prompt regexes.

Raw means as received, negotiation included, before telnetlib3 interprets anything.
Each direction has its own budget per session (``log_raw_max_bytes``), so a chatty
session cannot flood the sensor's log.
"""

from __future__ import annotations

import logging
from enum import Enum
from typing import Any


class Direction(Enum):
    """Which side sent the bytes."""

    FROM_ATTACKER = "from attacker"
    FROM_GUEST = "from guest"


class RawLog:
    """Logs raw bytes on a session's logger until each direction's budget is spent."""

    def __init__(self, log: logging.LoggerAdapter[Any], max_bytes: int) -> None:
        self._log = log
        self._left = dict.fromkeys(Direction, max_bytes)

    def __call__(self, direction: Direction, data: bytes) -> None:
        """Log ``data`` (or what the budget leaves of it)."""
        left = self._left[direction]
        if left <= 0:
            return
        chunk = data[:left]
        self._left[direction] = left - len(chunk)
        self._log.info("raw %s: %r", direction.value, chunk)
        if self._left[direction] <= 0:
            self._log.info("raw %s: log_raw_max_bytes reached, no more logged", direction.value)
