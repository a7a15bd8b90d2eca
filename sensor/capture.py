"""Files attackers upload, stored once each under their sha256 in the downloads directory.

Bytes are queued as they pass, in the relay's data callbacks, and written by the
sensor's artefact writer thread (:class:`sensor.artefacts.ArtefactWriter`) in batches
of up to ``BATCH_BYTES``; hashing a finished file, up to ``capture_max_bytes``, runs on
a worker thread. So the event loop never waits for a disk, and a file that cannot be made
or written (a full disk) is given up, said once (a ``honeyfleet.artefact.failed`` event),
and the relay goes on. A disk slower than the attacker ends the capture rather than let
queued bytes grow: at most ``MAX_IN_FLIGHT`` bytes of a file wait for the thread.

Each session captures through its own :class:`SessionFiles`, which holds at most
``capture_max_open`` files open at once (each holds a descriptor until it is finished or
dropped, so descriptors never grow with what an attacker sends), and every byte comes
out of the sensor's artefact budget (:mod:`sensor.artefacts`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from honeyfleet.artefactclient import file_sha256
from sensor.artefacts import ArtefactReport, ArtefactWriter, DiskBudget

log = logging.getLogger(__name__)

Logger = logging.Logger | logging.LoggerAdapter[logging.Logger]

KIND = "capture"
WHAT = "an upload"
# Queued bytes of one file are handed to the writer thread in batches of this size (each
# hand-over wakes the thread: with 64 KiB, capturing 32 MiB of piped stdin cost the loop
# and the writer 0.085 s of CPU, with 256 KiB 0.058 s, hashing included)...
BATCH_BYTES = 256 * 1024
# ...and a file whose unwritten bytes exceed this is given up (the disk cannot keep up).
MAX_IN_FLIGHT = 8 * 1024 * 1024


@dataclass(frozen=True)
class StoredFile:
    """A captured file in the store."""

    shasum: str
    path: Path
    size: int
    duplicate: bool
    """Whether the store held this content already (Cowrie's ``duplicate``)."""


class FileStore:
    """The downloads directory; each file kept once, named by its sha256."""

    def __init__(
        self,
        root: Path,
        *,
        max_bytes: int,
        max_open: int,
        budget: DiskBudget,
        writer: ArtefactWriter,
    ) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.max_open = max_open
        self.budget = budget
        self.writer = writer
        (root / "incoming").mkdir(parents=True, exist_ok=True)

    def session(self, report: ArtefactReport, logger: Logger = log) -> SessionFiles:
        """A session's way into the store; problems go to its ``logger`` and events."""
        return SessionFiles(self, report, logger)

    def keep(self, temp: Path) -> StoredFile:
        """Move a finished capture to its sha256 name (blocking)."""
        shasum, size = file_sha256(temp)
        final = self.root / shasum
        if final.exists():
            temp.unlink()
            return StoredFile(shasum, final, size, duplicate=True)
        temp.rename(final)
        return StoredFile(shasum, final, size, duplicate=False)


class SessionFiles:
    """One session's captures: a bounded number open at once, all within the budget."""

    __slots__ = ("log", "open", "report", "store")

    def __init__(self, store: FileStore, report: ArtefactReport, logger: Logger) -> None:
        self.store = store
        self.report = report
        self.log = logger
        self.open = 0

    def begin(self) -> Capture | None:
        """Start capturing one file; None if the session has too many open or no budget."""
        if self.open >= self.store.max_open:
            self.log.warning("upload not captured: %d captures open", self.open)
            return None
        if self.store.budget.reached:
            self.report.over_budget(KIND, WHAT)
            return None
        return Capture(self, self.store.root / "incoming" / secrets.token_hex(8))


class _TempFile:
    """The file side of a capture: touched only on the writer thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.error: OSError | None = None
        self.in_flight = 0  # bytes handed over and not yet written (read on the loop)
        self._fd: int | None = None

    def write(self, chunks: list[tuple[int, bytes]], size: int) -> None:
        """Create the file if need be, then write each chunk at its offset."""
        try:
            if self.error is None:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                for offset, data in chunks:
                    view = memoryview(data)
                    while view:  # a short write is followed by the error that caused it
                        written = os.pwrite(self._fd, view, offset)
                        if not written:
                            raise OSError(errno.EIO, "nothing written")
                        view, offset = view[written:], offset + written
        except OSError as e:
            self.error = e
        finally:
            self.in_flight -= size

    def close(self, remove: bool) -> None:
        """Close the descriptor (and remove the file, for an abandoned capture)."""
        fd, self._fd = self._fd, None
        try:
            if fd is not None:
                os.close(fd)
        except OSError as e:
            self.error = self.error or e
        if remove or self.error is not None:
            with contextlib.suppress(OSError):
                self.path.unlink(missing_ok=True)


class Capture:
    """One file being captured; bytes may arrive at any offset (SFTP) or in order (SCP)."""

    def __init__(self, files: SessionFiles, temp: Path) -> None:
        self._files = files
        self._store = files.store
        self._file = _TempFile(temp)
        self._end = 0
        self._reserved = 0
        self._queued: list[tuple[int, bytes]] = []
        self._queued_bytes = 0
        self._active = True
        self.oversized = False
        files.open += 1

    @property
    def written(self) -> int:
        """The furthest byte written so far."""
        return self._end

    @property
    def active(self) -> bool:
        """Whether bytes are still being kept."""
        return self._active

    def write_at(self, offset: int, data: bytes) -> None:
        """Queue bytes for an offset; past a bound, or failing, the capture is dropped."""
        if not self._active:
            return
        if self._failed():
            return
        end = offset + len(data)
        if end > self._store.max_bytes:
            self._files.log.warning(
                "upload larger than %d bytes: not captured", self._store.max_bytes
            )
            self.oversized = True
            self.abort()
            return
        if end > self._reserved:
            if not self._store.budget.take(end - self._reserved):
                self._files.report.over_budget(KIND, WHAT)
                self.abort()
                return
            self._reserved = end
        if self._file.in_flight + self._queued_bytes > MAX_IN_FLIGHT:
            self._give_up(OSError(errno.EAGAIN, "the disk could not keep up"))
            return
        self._queued.append((offset, bytes(data)))
        self._queued_bytes += len(data)
        self._end = max(self._end, end)
        if self._queued_bytes >= BATCH_BYTES:
            self._hand_over()

    def append(self, data: bytes) -> None:
        """Write bytes after the furthest written so far."""
        self.write_at(self._end, data)

    async def finish(self) -> StoredFile | None:
        """Store the file (hashed on a thread); None if it was abandoned or cannot be kept."""
        if not self._active:
            return None
        self._hand_over()
        self._close()
        try:
            await asyncio.wrap_future(self._store.writer.submit(self._file.close, False))
        except RuntimeError:  # the writer is stopped: the sensor is shutting down
            self._file.error = self._file.error or OSError(errno.ESHUTDOWN, "sensor stopping")
        if self._failed(closed=True):
            return None
        try:
            stored = await asyncio.to_thread(self._store.keep, self._file.path)
        except OSError as e:
            self._give_up(e, closed=True)
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self._file.path.unlink, missing_ok=True)
            return None
        if stored.duplicate:
            self._store.budget.give(self._reserved)
        return stored

    def abort(self) -> None:
        """Drop the partial file (removed by the writer thread)."""
        if not self._active:
            return
        self._close()
        self._store.budget.give(self._reserved)
        self._queued.clear()
        with contextlib.suppress(RuntimeError):
            self._store.writer.submit(self._file.close, True)

    def _hand_over(self) -> None:
        """Give the queued bytes to the writer thread."""
        chunks, self._queued = self._queued, []
        size, self._queued_bytes = self._queued_bytes, 0
        if not chunks:
            return
        self._file.in_flight += size
        try:
            self._store.writer.submit(self._file.write, chunks, size)
        except RuntimeError:
            self._file.in_flight -= size
            self._file.error = self._file.error or OSError(errno.ESHUTDOWN, "sensor stopping")

    def _failed(self, *, closed: bool = False) -> bool:
        """Whether the writer thread met an error (reported here, once)."""
        error = self._file.error
        if error is None:
            return False
        self._give_up(error, closed=closed)
        return True

    def _give_up(self, error: OSError, *, closed: bool = False) -> None:
        """Report an error and drop the capture."""
        self._files.log.error("upload not captured: %s: %s", self._file.path, error)
        self._files.report.failed(KIND, WHAT, error)
        if closed:
            self._store.budget.give(self._reserved)
        else:
            self.abort()

    def _close(self) -> None:
        """The capture no longer takes bytes nor holds a place among the session's."""
        if self._active:
            self._active = False
            self._files.open -= 1
