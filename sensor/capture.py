"""Files attackers upload, stored once each under their sha256 in the downloads directory.

Bytes are written as they pass (page-cache writes of at most one SSH packet each);
hashing a finished file, up to ``capture_max_bytes``, runs on a worker thread. Writing
happens inside the relay's data callbacks, so a file that cannot be made or written
(a full disk) is given up, said once (a ``honeyfleet.artefact.failed`` event), and the
relay goes on.

Each session captures through its own :class:`SessionFiles`, which holds at most
``capture_max_open`` files open at once (each holds a descriptor until it is finished or
dropped, so descriptors never grow with what an attacker sends), and every byte comes
out of the sensor's artefact budget (:mod:`sensor.artefacts`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from sensor.artefacts import ArtefactReport, DiskBudget

log = logging.getLogger(__name__)

Logger = logging.Logger | logging.LoggerAdapter[logging.Logger]

HASH_CHUNK = 1024 * 1024
KIND = "capture"


@dataclass(frozen=True)
class StoredFile:
    """A captured file in the store."""

    shasum: str
    path: Path
    size: int


class FileStore:
    """The downloads directory; each file kept once, named by its sha256."""

    def __init__(self, root: Path, *, max_bytes: int, max_open: int, budget: DiskBudget) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.max_open = max_open
        self.budget = budget
        (root / "incoming").mkdir(parents=True, exist_ok=True)

    def session(self, report: ArtefactReport, logger: Logger = log) -> SessionFiles:
        """A session's way into the store; problems go to its ``logger`` and events."""
        return SessionFiles(self, report, logger)

    def keep(self, temp: Path) -> tuple[StoredFile, bool]:
        """Move a finished capture to its sha256 name (blocking); True if it was new."""
        digest = hashlib.sha256()
        size = 0
        with temp.open("rb") as f:
            while chunk := f.read(HASH_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        shasum = digest.hexdigest()
        final = self.root / shasum
        if final.exists():
            temp.unlink()
            return StoredFile(shasum, final, size), False
        temp.rename(final)
        return StoredFile(shasum, final, size), True


class SessionFiles:
    """One session's captures: a bounded number open at once, all within the budget."""

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
            self.report.over_budget(KIND, "an upload")
            return None
        capture = Capture(self, self.store.root / "incoming" / secrets.token_hex(8))
        return capture if capture.active else None


class Capture:
    """One file being captured; bytes may arrive at any offset (SFTP) or in order (SCP)."""

    def __init__(self, files: SessionFiles, temp: Path) -> None:
        self._files = files
        self._store = files.store
        self._temp = temp
        self._end = 0
        self._reserved = 0
        self.oversized = False
        self._fd: int | None = None
        try:
            self._fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            files.log.error("upload not captured: cannot create %s: %s", temp, e)
            files.report.failed(KIND, "an upload", e)
            return
        files.open += 1

    @property
    def written(self) -> int:
        """The furthest byte written so far."""
        return self._end

    @property
    def active(self) -> bool:
        """Whether bytes are still being kept."""
        return self._fd is not None

    def write_at(self, offset: int, data: bytes) -> None:
        """Write bytes at an offset; past a bound, or failing, the capture is dropped."""
        if self._fd is None:
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
                self._files.report.over_budget(KIND, "an upload")
                self.abort()
                return
            self._reserved = end
        view = memoryview(data)
        try:
            while view:  # a short write is followed by the error that caused it
                written = os.pwrite(self._fd, view, offset)
                if not written:
                    raise OSError(errno.EIO, "nothing written")
                view, offset = view[written:], offset + written
        except OSError as e:
            self._files.log.error("upload not captured: cannot write %s: %s", self._temp, e)
            self._files.report.failed(KIND, "an upload", e)
            self.abort()
            return
        self._end = max(self._end, offset)

    def append(self, data: bytes) -> None:
        """Write bytes after the furthest written so far."""
        self.write_at(self._end, data)

    async def finish(self) -> StoredFile | None:
        """Store the file (hashed on a thread); None if it was abandoned or cannot be kept."""
        if self._fd is None:
            return None
        fd, self._fd = self._fd, None
        self._files.open -= 1
        try:
            os.close(fd)
            stored, new = await asyncio.to_thread(self._store.keep, self._temp)
        except OSError as e:
            self._files.log.error("cannot keep an uploaded file: %s", e)
            self._files.report.failed(KIND, "an upload", e)
            self._store.budget.give(self._reserved)
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self._temp.unlink, missing_ok=True)
            return None
        if not new:
            self._store.budget.give(self._reserved)
        return stored

    def abort(self) -> None:
        """Drop the partial file."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        self._files.open -= 1
        self._store.budget.give(self._reserved)
        try:
            os.close(fd)
            self._temp.unlink(missing_ok=True)
        except OSError as e:
            self._files.log.error("cannot remove the partial upload %s: %s", self._temp, e)
