"""Session recordings in asciicast v2 (asciinema's format), bounded, written off the loop.

A header line (width, height, start time, env), then one JSON array a line:
``[seconds, "o", text]`` for output the attacker saw, ``[seconds, "i", text]`` for
what the attacker typed, ``[seconds, "r", "COLSxROWS"]`` for a resize. Bytes are decoded
as UTF-8 incrementally (a character split across reads stays whole); undecodable bytes
become U+FFFD. NUL bytes in the output are left out: a terminal shows nothing for them,
and as JSON each would take six bytes (``/dev/zero`` would fill a recording six times
faster than it fills a screen). They are dropped from the bytes, before decoding
(``bytes.translate`` costs a third less than removing them from the decoded text, which
took 5% of a sensor's CPU relaying ``/dev/zero``). The sha256 of the attacker's raw
input covers all of it even when the file stopped growing at its bound. Only the
attacker's channels are recorded: credentials the sensor uses towards the guest never
pass through here.

How a session uses one (``recordings`` is the sensor's :class:`Recordings`; the session
core, :meth:`sensor.session.core.Session.recorder`, starts it held before login and
commits it in ``logged_in``)::

    recorder = recordings.start(session_id, report, width=80, height=24, term="xterm",
                                held=True)   # before login: kept in memory only
    recorder.output(b"login: ")             # output/input/resize as bytes pass
    recorder.commit()                        # at login: what was held goes to disk
    recorder.discard()                       # or: never logged in, nothing is kept
    summary = await recorder.close()         # at the end: None if nothing was kept

A recording starts HELD (``held=True``: at most ``recording_held_bytes`` kept in memory,
nothing on disk, for a client that has not logged in) or WRITING. Lines are queued on
the event loop and written by the sensor's artefact writer thread in batches (at most
``FLUSH_BYTES`` or ``FLUSH_SECONDS`` apart), so a keystroke never waits for a disk.
Every byte is drawn from the artefact budget (:mod:`sensor.artefacts`) when queued.
An I/O error ends the recording alone (a ``honeyfleet.artefact.failed`` event; the
file keeps what was written, and the summary says how much); no method here raises
because of the disk, so a session's teardown never does either. ::

    HELD ──commit()──▶ WRITING ──close()──▶ CLOSED
      └────────────discard() / close()────────▲
"""

from __future__ import annotations

import asyncio
import codecs
import concurrent.futures
import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from sensor.artefacts import ArtefactReport, ArtefactWriter, DiskBudget

log = logging.getLogger(__name__)

KIND = "recording"
WHAT = "the session's recording"
# Queued lines are handed to the writer thread once this many bytes are waiting...
FLUSH_BYTES = 64 * 1024
# ...or this many seconds after the first of them was queued.
FLUSH_SECONDS = 1.0


class RecordingState(Enum):
    """Where a recording's lines go."""

    HELD = "held"
    WRITING = "writing"
    CLOSED = "closed"


TRANSITIONS = {
    RecordingState.HELD: {RecordingState.WRITING, RecordingState.CLOSED},
    RecordingState.WRITING: {RecordingState.CLOSED},
    RecordingState.CLOSED: set(),
}


def transition(current: RecordingState, new: RecordingState) -> RecordingState:
    """The new state; ValueError for a move the diagram does not have."""
    if new not in TRANSITIONS[current]:
        raise ValueError(f"recording cannot go from {current.value} to {new.value}")
    return new


@dataclass(frozen=True)
class RecordingSummary:
    """What ``cowrie.log.closed`` reports about a closed recording."""

    path: Path
    size: int
    shasum: str
    duration: float
    truncated: bool


class Recordings:
    """A sensor's recordings: their directory, bounds, budget and the artefact writer."""

    def __init__(
        self,
        root: Path,
        *,
        max_bytes: int,
        held_bytes: int,
        budget: DiskBudget,
        writer: ArtefactWriter,
    ) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.held_bytes = held_bytes
        self.budget = budget
        self._writer = writer

    def start(
        self,
        session: str,
        report: ArtefactReport,
        *,
        width: int,
        height: int,
        term: str,
        held: bool = False,
    ) -> Recorder:
        """A new recording for ``session`` (HELD in memory until :meth:`Recorder.commit`)."""
        return Recorder(
            self, self.root / f"{session}.cast", report, width=width, height=height,
            term=term, held=held,
        )  # fmt: skip

    def submit(self, job: _Job) -> concurrent.futures.Future[None]:
        """Run a recording's file work on the writer thread (in order)."""
        return self._writer.submit(job.run)


class _Job:
    """One batch of a recording's file work, run on the writer thread."""

    def __init__(self, file: _File, lines: list[bytes], *, last: bool) -> None:
        self._file = file
        self._lines = lines
        self._last = last

    def run(self) -> None:
        """Open if need be, append the lines, close if it is the last batch."""
        self._file.write(self._lines, last=self._last)


class _File:
    """The file side of a recording: touched only on the writer thread."""

    __slots__ = ("_handle", "error", "path", "written")

    def __init__(self, path: Path) -> None:
        # A string: a Path holds its parts and, once opened, its string too (0.3 KB a
        # held session).
        self.path = os.fspath(path)
        self.error: OSError | None = None
        self.written = 0
        self._handle: io.FileIO | None = None

    def write(self, lines: list[bytes], *, last: bool) -> None:
        """Append lines (opening the file first); after an error, do nothing more."""
        if self.error is None:
            try:
                if self._handle is None:
                    Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                    # Unbuffered: lines come in batches already, and a buffer would be
                    # 8 KB held by every recorded session however idle. Opened by its
                    # string: a file opened by a Path keeps that Path as its name.
                    self._handle = io.FileIO(self.path, "w")
                if lines:
                    data = b"".join(lines)
                    view = memoryview(data)
                    while view:  # a raw write may take part of it
                        view = view[self._handle.write(view) :]
                    self.written += len(data)
            except OSError as e:
                self.error = e
        if last or self.error is not None:
            self._close()

    def _close(self) -> None:
        """Close the handle, keeping the first error."""
        handle, self._handle = self._handle, None
        if handle is not None:
            try:
                handle.close()
            except OSError as e:
                self.error = self.error or e


class Recorder:
    """One asciicast v2 recording (use from the event loop)."""

    __slots__ = (
        "_decoders",
        "_failed",
        "_file",
        "_flush_timer",
        "_input_hash",
        "_queued",
        "_queued_bytes",
        "_recordings",
        "_report",
        "_start",
        "size",
        "state",
        "truncated",
    )

    def __init__(
        self,
        recordings: Recordings,
        path: Path,
        report: ArtefactReport,
        *,
        width: int,
        height: int,
        term: str,
        held: bool,
    ) -> None:
        self.state = RecordingState.HELD if held else RecordingState.WRITING
        self.size = 0
        self.truncated = False
        self._recordings = recordings
        self._report = report
        self._file = _File(path)
        self._start = time.monotonic()
        self._input_hash = hashlib.sha256()
        self._decoders = {
            kind: codecs.getincrementaldecoder("utf-8")(errors="replace") for kind in "io"
        }
        self._queued: list[bytes] = []  # encoded lines, each ending in a newline
        self._queued_bytes = 0
        self._flush_timer: asyncio.TimerHandle | None = None
        self._failed = False
        header = {
            "version": 2,
            "width": width,
            "height": height,
            "timestamp": int(time.time()),
            "env": {"TERM": term, "SHELL": "/bin/sh"},
        }
        self._line(json.dumps(header))

    @property
    def path(self) -> Path:
        """The recording's file."""
        return Path(self._file.path)

    def output(self, data: bytes) -> None:
        """Record bytes shown to the attacker (NULs left out: they show nothing)."""
        if self._taking():
            self._event("o", self._decoders["o"].decode(data.translate(None, b"\0")))

    def input(self, data: bytes) -> None:
        """Record bytes the attacker sent (hashed even once the file is full)."""
        self._input_hash.update(data)
        if self._taking():
            self._event("i", self._decoders["i"].decode(data))

    def resize(self, width: int, height: int) -> None:
        """Record a terminal resize."""
        if self._taking():
            self._event("r", f"{width}x{height}")

    def commit(self) -> None:
        """The client logged in: what was held goes to disk, and so does what follows."""
        if self.state is not RecordingState.HELD:
            return
        if not self._recordings.budget.take(self.size):
            self._report.over_budget(KIND, WHAT)
            self.discard()
            return
        self.state = transition(self.state, RecordingState.WRITING)
        self._flush()

    def discard(self) -> None:
        """Keep nothing (a client that never logged in)."""
        if self.state is RecordingState.HELD:
            self.state = transition(self.state, RecordingState.CLOSED)
            self._queued.clear()

    async def close(self) -> RecordingSummary | None:
        """Finish the recording once its writes are done; its summary, or None if nothing
        was kept. Never raises (an I/O error is reported as an event instead)."""
        if self.state is not RecordingState.WRITING:
            self.discard()
            return None
        self.state = transition(self.state, RecordingState.CLOSED)
        # The writer runs jobs in order: the last one done means all are.
        last_job = self._flush(last=True)
        if last_job is not None:
            # Shielded: a cancelled teardown still leaves the writer's work alone.
            await asyncio.shield(asyncio.wrap_future(last_job))
        self._check_failure()
        if self._file.error is not None:
            self._recordings.budget.give(self.size - self._file.written)
        return RecordingSummary(
            path=self.path,
            size=self._file.written,
            shasum=self._input_hash.hexdigest(),
            duration=time.monotonic() - self._start,
            truncated=self.truncated,
        )

    # Queueing lines.

    def _taking(self) -> bool:
        """Whether lines are still wanted (the writer's failures are noticed here too)."""
        self._check_failure()
        return not self.truncated and self.state is not RecordingState.CLOSED

    def _event(self, kind: str, text: str) -> None:
        """Queue one event line, unless empty."""
        if text:
            elapsed = round(time.monotonic() - self._start, 6)
            self._line(json.dumps([elapsed, kind, text], ensure_ascii=False))

    def _line(self, line: str) -> None:
        """Queue a line if it fits the bounds; past one, stop and remember why."""
        # Encoded once, here: its size is what the bounds count.
        data = line.encode("utf-8") + b"\n"
        size = len(data)
        bound = (
            self._recordings.held_bytes
            if self.state is RecordingState.HELD
            else self._recordings.max_bytes
        )
        if self.size + size > bound:
            self.truncated = True
            return
        if self.state is RecordingState.WRITING and not self._recordings.budget.take(size):
            self._over_budget()
            return
        self._queued.append(data)
        self._queued_bytes += size
        self.size += size
        if self.state is RecordingState.WRITING:
            if self._queued_bytes >= FLUSH_BYTES:
                self._flush()
            elif self._flush_timer is None:
                loop = asyncio.get_running_loop()
                self._flush_timer = loop.call_later(FLUSH_SECONDS, self._flush)

    def _flush(self, *, last: bool = False) -> concurrent.futures.Future[None] | None:
        """Hand the queued lines to the writer thread; the job, if one was submitted
        (not kept here: a done future held by every idle session is 1.5 KB for nothing)."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        lines, self._queued, self._queued_bytes = self._queued, [], 0
        if not lines and not last:
            return None
        try:
            return self._recordings.submit(_Job(self._file, lines, last=last))
        except RuntimeError:  # the writer is shut down: the sensor is stopping
            self._file.error = self._file.error or OSError("recording writer stopped")
            return None

    def _over_budget(self) -> None:
        """The artefact budget is spent: the recording stops here."""
        self.truncated = True
        self._report.over_budget(KIND, WHAT)

    def _check_failure(self) -> None:
        """Report, once, an I/O error the writer thread met; the recording stops there."""
        error = self._file.error
        if error is None or self._failed:
            return
        self._failed = True
        self.truncated = True
        log.error("recording %s failed: %s", self.path, error)
        self._report.failed(KIND, WHAT, error)
