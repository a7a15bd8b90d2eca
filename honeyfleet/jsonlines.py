"""A Cowrie-format JSON lines log with daily rotation.

Writes ``<path>`` (e.g. ``cowrie.json``) and, when the UTC day changes, renames it to
``<path>.YYYY-MM-DD`` as Cowrie does, so Filebeat, Logstash, Splunk forwarders and
T-Pot style pipelines read it unchanged. Old files beyond ``keep_days`` are deleted.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TextIO

from honeyfleet.events import Event, to_json


class JsonLinesLog:
    """Appends events to a daily-rotated JSON lines file. Not thread-safe."""

    def __init__(self, path: Path, *, keep_days: int = 30, fsync: bool = False) -> None:
        self.path = path
        self._keep_days = keep_days
        self._fsync = fsync
        self._file: TextIO | None = None
        self._day: date | None = None

    def write(self, events: Iterable[Event]) -> None:
        """Append events, rotating first if the day changed."""
        self.write_lines(to_json(event) for event in events)

    def write_lines(self, lines: Iterable[str]) -> None:
        """Append events already in JSON (one line each, no newline), rotating first if the
        day changed."""
        today = datetime.now(UTC).date()
        handle = self._open(today)
        handle.writelines(f"{line}\n" for line in lines)
        handle.flush()
        if self._fsync:
            os.fsync(handle.fileno())

    def close(self) -> None:
        """Close the current file."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open(self, today: date) -> TextIO:
        if self._file is not None and self._day == today:
            return self._file
        self.close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            written = datetime.fromtimestamp(self.path.stat().st_mtime, UTC).date()
            if written != today:
                self.path.rename(self.path.with_name(f"{self.path.name}.{written.isoformat()}"))
                self._prune(today)
        self._file = self.path.open("a", encoding="utf-8")
        self._day = today
        return self._file

    def _prune(self, today: date) -> None:
        """Delete rotated files older than keep_days."""
        cutoff = today - timedelta(days=self._keep_days)
        for old in self.path.parent.glob(f"{self.path.name}.*"):
            try:
                day = date.fromisoformat(old.name.rsplit(".", 1)[1])
            except ValueError:
                continue
            if day < cutoff:
                old.unlink(missing_ok=True)
