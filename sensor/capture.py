"""Files attackers upload, stored once each under their sha256 in the downloads directory.

Bytes are written as they pass (page-cache writes of at most one SSH packet each);
hashing a finished file, up to ``capture_max_bytes``, runs on a worker thread. Writing
happens inside the relay's data callbacks, so a file that cannot be made or written
(a full disk) is given up, said once, and the relay goes on.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

Logger = logging.Logger | logging.LoggerAdapter[logging.Logger]

HASH_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class StoredFile:
    """A captured file in the store."""

    shasum: str
    path: Path
    size: int


class FileStore:
    """The downloads directory; each file kept once, named by its sha256."""

    def __init__(self, root: Path, *, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        (root / "incoming").mkdir(parents=True, exist_ok=True)

    def begin(self, logger: Logger = log) -> Capture:
        """Start capturing one file; problems are logged to ``logger`` (a session's)."""
        return Capture(self, self.root / "incoming" / secrets.token_hex(8), logger)

    def keep(self, temp: Path) -> StoredFile:
        """Move a finished capture to its sha256 name, dropping duplicates (blocking)."""
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
        else:
            temp.rename(final)
        return StoredFile(shasum, final, size)


class Capture:
    """One file being captured; bytes may arrive at any offset (SFTP) or in order (SCP)."""

    def __init__(self, store: FileStore, temp: Path, logger: Logger = log) -> None:
        self._store = store
        self._temp = temp
        self._log = logger
        self._end = 0
        self.oversized = False
        self._fd: int | None = None
        try:
            self._fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            self._log.error("upload not captured: cannot create %s: %s", temp, e)

    def write_at(self, offset: int, data: bytes) -> None:
        """Write bytes at an offset; past the size bound, or failing, the capture is dropped."""
        if self._fd is None:
            return
        if offset + len(data) > self._store.max_bytes:
            self._log.warning("upload larger than %d bytes: not captured", self._store.max_bytes)
            self.oversized = True
            self.abort()
            return
        view = memoryview(data)
        try:
            while view:  # a short write is followed by the error that caused it
                written = os.pwrite(self._fd, view, offset)
                if not written:
                    raise OSError(errno.EIO, "nothing written")
                view, offset = view[written:], offset + written
        except OSError as e:
            self._log.error("upload not captured: cannot write %s: %s", self._temp, e)
            self.abort()
            return
        self._end = max(self._end, offset)

    def append(self, data: bytes) -> None:
        """Write bytes after the furthest written so far."""
        self.write_at(self._end, data)

    async def finish(self) -> StoredFile | None:
        """Store the file (hashed on a thread); None if it was abandoned."""
        if self._fd is None:
            return None
        os.close(self._fd)
        self._fd = None
        return await asyncio.to_thread(self._store.keep, self._temp)

    def abort(self) -> None:
        """Drop the partial file."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
                self._temp.unlink(missing_ok=True)
            except OSError as e:
                self._log.error("cannot remove the partial upload %s: %s", self._temp, e)
