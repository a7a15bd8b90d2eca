"""Session recordings in asciicast v2 (asciinema's format), bounded in size.

A header line (width, height, start time, env), then one JSON array a line:
``[seconds, "o", text]`` for output the attacker saw, ``[seconds, "i", text]`` for
what the attacker typed, ``[seconds, "r", "COLSxROWS"]`` for a resize. Bytes are decoded
as UTF-8 incrementally (a character split across reads stays whole); undecodable bytes
become U+FFFD. The sha256 of the attacker's raw input covers all of it even when the file
stopped growing at its bound. Only the attacker's channels are recorded: credentials the
sensor uses towards the guest never pass through here.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO


@dataclass(frozen=True)
class RecordingSummary:
    """What ``cowrie.log.closed`` reports about a closed recording."""

    path: Path
    size: int
    shasum: str
    duration: float
    truncated: bool


class Recorder:
    """Writes one asciicast v2 file."""

    def __init__(self, path: Path, *, width: int, height: int, term: str, max_bytes: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._max_bytes = max_bytes
        self._start = time.monotonic()
        self._input_hash = hashlib.sha256()
        self._decoders = {
            kind: codecs.getincrementaldecoder("utf-8")(errors="replace") for kind in "io"
        }
        self._file: IO[str] = path.open("w", encoding="utf-8")
        self.size = 0
        self.truncated = False
        header = {
            "version": 2,
            "width": width,
            "height": height,
            "timestamp": int(time.time()),
            "env": {"TERM": term, "SHELL": "/bin/sh"},
        }
        self._write(json.dumps(header))

    def output(self, data: bytes) -> None:
        """Record bytes shown to the attacker."""
        if not self.truncated:
            self._event("o", self._decoders["o"].decode(data))

    def input(self, data: bytes) -> None:
        """Record bytes the attacker sent (hashed even once the file is full)."""
        self._input_hash.update(data)
        if not self.truncated:
            self._event("i", self._decoders["i"].decode(data))

    def resize(self, width: int, height: int) -> None:
        """Record a terminal resize."""
        if not self.truncated:
            self._event("r", f"{width}x{height}")

    def close(self) -> RecordingSummary:
        """Finish the file and summarise it."""
        self._file.close()
        return RecordingSummary(
            path=self.path,
            size=self.size,
            shasum=self._input_hash.hexdigest(),
            duration=time.monotonic() - self._start,
            truncated=self.truncated,
        )

    def _event(self, kind: str, text: str) -> None:
        """Append one event line, unless empty or past the size bound."""
        if text:
            elapsed = round(time.monotonic() - self._start, 6)
            self._write(json.dumps([elapsed, kind, text], ensure_ascii=False))

    def _write(self, line: str) -> None:
        """Append a line if it fits the bound; past it, stop and remember why."""
        if self.truncated:
            return
        size = len(line.encode("utf-8")) + 1
        if self.size + size > self._max_bytes:
            self.truncated = True
            return
        self._file.write(line + "\n")
        self.size += size
