"""Further destinations for stored events, beside the store: a Cowrie JSON lines file.

Sinks receive each event once, right after the transaction that stored it and its
batches' acknowledgements (one transaction's events at a time, in commit order, while
the next transaction is written), so resent events never reach them twice. A controller
crash between the commit and the sink write can lose those lines from the file (never
from the store); every line carries the event's ``hf_event_id`` for downstream de-duplication.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from controller.events.rows import EventRow
from honeyfleet.events import to_json
from honeyfleet.jsonlines import JsonLinesLog


class Sink(Protocol):
    """A destination for newly stored events."""

    name: str
    """Short, fixed name, used as a metric label."""

    async def write(self, rows: Sequence[EventRow]) -> None:
        """Deliver rows; OSError when the destination fails."""

    async def close(self) -> None:
        """Flush and release resources."""


class JsonLinesSink:
    """Cowrie's JSON log format, one event a line, rotated daily (for ELK, Splunk, ...)."""

    name = "jsonlines"

    def __init__(self, path: Path, *, keep_days: int) -> None:
        self.path = path
        self._log = JsonLinesLog(path, keep_days=keep_days)
        # JsonLinesLog is not thread-safe: one thread does all its file I/O.
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jsonlines")

    async def write(self, rows: Sequence[EventRow]) -> None:
        """Append rows as Cowrie JSON lines."""
        # The text as received, not encoded again; JSON may hold raw line breaks between
        # its tokens, which would split a line, so such (odd, or hostile) text is redone.
        lines = [
            to_json(row.event) if "\n" in row.json or "\r" in row.json else row.json for row in rows
        ]
        await asyncio.get_running_loop().run_in_executor(
            self._executor, self._log.write_lines, lines
        )

    async def close(self) -> None:
        """Close the file."""
        await asyncio.get_running_loop().run_in_executor(self._executor, self._log.close)
        self._executor.shutdown(wait=True)
