"""Files attackers upload, stored once each under their sha256 in the downloads directory.

Bytes are written as they pass (page-cache writes of at most one SSH packet each);
hashing a finished file, up to ``capture_max_bytes``, runs on a worker thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

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

    def begin(self) -> Capture:
        """Start capturing one file."""
        return Capture(self, self.root / "incoming" / secrets.token_hex(8))

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

    def __init__(self, store: FileStore, temp: Path) -> None:
        self._store = store
        self._temp = temp
        self._fd: int | None = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._end = 0
        self.oversized = False

    def write_at(self, offset: int, data: bytes) -> None:
        """Write bytes at an offset; past the size bound the capture is abandoned."""
        if self._fd is None:
            return
        if offset + len(data) > self._store.max_bytes:
            log.warning("upload larger than %d bytes: not captured", self._store.max_bytes)
            self.oversized = True
            self.abort()
            return
        os.pwrite(self._fd, data, offset)
        self._end = max(self._end, offset + len(data))

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
            os.close(self._fd)
            self._fd = None
            self._temp.unlink(missing_ok=True)
