"""Captures files sent with legacy SCP (``scp -O``): the source side of ``scp -t``.

The client sends ``C<mode> <size> <name>`` then exactly ``size`` bytes and a NUL, for
each file; ``D``/``E`` enter and leave directories and ``T`` carries times. Only the
client's side of the exec channel is parsed (the guest answers with single status bytes).
Header lines are bounded; a stream that breaks the protocol stops being parsed, while
the relay itself goes on untouched.
"""

from __future__ import annotations

import posixpath
import shlex
from collections.abc import Callable
from enum import Enum

from sensor.capture import Capture, Logger, SessionFiles

MAX_HEADER = 4096


def is_scp_upload(command: str) -> bool:
    """Whether an exec command is an scp sink (``scp ... -t ...``): a file upload."""
    try:
        argv = shlex.split(command[:MAX_HEADER])
    except ValueError:
        return False
    if not argv or argv[0].rsplit("/", 1)[-1] != "scp":
        return False
    flags = [a for a in argv[1:] if a.startswith("-") and not a.startswith("--")]
    return any("t" in flag for flag in flags)


def scp_target(command: str) -> str:
    """Where an scp sink writes: its last operand ("" if none, or unparsable)."""
    try:
        argv = shlex.split(command[:MAX_HEADER])
    except ValueError:
        return ""
    operands = [a for a in argv[1:] if not a.startswith("-")]
    return operands[-1] if operands else ""


class Stage(Enum):
    """Where the parser is in the SCP stream."""

    HEADER = "header"
    DATA = "data"
    TRAILER = "trailer"
    STOPPED = "stopped"


class ScpObserver:
    """Parses the client's SCP stream; hands each complete file to ``on_file(path, capture)``.

    The path is the header's file name under the command's ``target``, as Cowrie names
    an SCP upload (its ``url`` and ``destfile``).
    """

    def __init__(
        self,
        files: SessionFiles,
        on_file: Callable[[str, Capture], None],
        target: str = "",
    ) -> None:
        self._files = files
        self._on_file = on_file
        self._target = target
        self._log: Logger = files.log
        self._stage = Stage.HEADER
        self._header = bytearray()
        self._remaining = 0
        self._name = ""
        self._capture: Capture | None = None
        self._handlers = {
            Stage.HEADER: self._feed_header,
            Stage.DATA: self._feed_data,
            Stage.TRAILER: self._feed_trailer,
        }

    def feed(self, data: bytes) -> None:
        """Parse bytes the client sent."""
        view = memoryview(data)
        while view and self._stage is not Stage.STOPPED:
            view = self._handlers[self._stage](view)

    def close(self) -> None:
        """The channel ended: drop an unfinished file."""
        if self._capture is not None:
            self._capture.abort()
            self._capture = None

    def _feed_header(self, view: memoryview) -> memoryview:
        """Accumulate one header line and act on it."""
        end = bytes(view[:MAX_HEADER]).find(b"\n")
        if end < 0:
            self._header += view
            if len(self._header) > MAX_HEADER:
                self._stop("header line too long")
            return view[len(view) :]
        self._header += view[:end]
        line = self._header.decode("utf-8", "replace")
        self._header.clear()
        if line.startswith("C"):
            self._start_file(line)
        elif line[:1] not in ("D", "E", "T"):
            self._stop(f"unexpected SCP line {line[:40]!r}")
        return view[end + 1 :]

    def _start_file(self, line: str) -> None:
        """``C<mode> <size> <name>``: begin a file."""
        parts = line[1:].split(" ", 2)
        # isdigit() alone takes "²", which int() refuses.
        if len(parts) != 3 or not (parts[1].isascii() and parts[1].isdigit()):
            self._stop(f"malformed SCP file header {line[:40]!r}")
            return
        self._remaining = int(parts[1])
        self._name = parts[2].rsplit("/", 1)[-1]
        self._capture = self._files.begin()
        self._stage = Stage.DATA if self._remaining else Stage.TRAILER

    def _feed_data(self, view: memoryview) -> memoryview:
        """File bytes."""
        take = min(self._remaining, len(view))
        if self._capture is not None:
            self._capture.append(bytes(view[:take]))
        self._remaining -= take
        if not self._remaining:
            self._stage = Stage.TRAILER
        return view[take:]

    def _feed_trailer(self, view: memoryview) -> memoryview:
        """The NUL after a file: the file is complete."""
        capture, self._capture = self._capture, None
        self._stage = Stage.HEADER
        if capture is not None:
            self._on_file(posixpath.join(self._target, self._name), capture)
        return view[1:]

    def _stop(self, reason: str) -> None:
        """Give up parsing (the relay goes on)."""
        self._log.warning("scp capture stopped: %s", reason)
        self.close()
        self._stage = Stage.STOPPED
