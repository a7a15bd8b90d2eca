"""The pool node's ``state_dir/downloads``, kept within a budget of bytes and age.

Files land there from two places: downloads fetched for guests under ``egress_policy =
"fetch"`` and files kept by disk diffs, each named by its sha256. Nothing else removes
them, so :class:`Downloads` prunes: every ``PRUNE_PERIOD`` seconds it deletes files
older than ``downloads_max_age``, then the oldest (by last write: a file fetched again is
young again) until the rest fit ``downloads_max_bytes``. It never deletes a file

* held by a connection serving it to a guest (:meth:`Downloads.hold`),
* still waiting in the artefact outbox for the controller (the outbox's hard link would
  keep its bytes on disk anyway, and the controller does not have it yet),
* written in the last ``GRACE`` seconds (a fetch or disk diff between storing a file and
  queueing it for upload).

What is pruned is logged and counted (``honeyfleet_poolnode_downloads_pruned_*``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from poolnode.metrics import PoolMetrics

log = logging.getLogger(__name__)

PRUNE_PERIOD = 60.0
GRACE = 60.0
"""Seconds a new file is safe from pruning, whatever the budget."""


@dataclass(frozen=True)
class Pruned:
    """What one pass did."""

    files: int = 0
    bytes: int = 0
    left_bytes: int = 0
    """What the directory holds after the pass."""
    protected_bytes: int = 0
    """Bytes the budget wanted gone but that were held, queued or too new."""


@dataclass(frozen=True)
class _File:
    path: Path
    size: int
    mtime: float


class Downloads:
    """Prunes one downloads directory; ``hold`` protects a file while it is served."""

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int,
        max_age: float,
        queued: Callable[[str], bool],
        metrics: PoolMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``queued(sha256)`` says whether the artefact outbox still waits to upload it;
        ``max_age`` 0 means no age limit."""
        self.directory = directory
        self._max_bytes = max_bytes
        self._max_age = max_age
        self._queued = queued
        self._metrics = metrics
        self._clock = clock
        # Counted holds, by file name; read by the pruning thread, hence the lock.
        self._held: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._bytes = 0
        metrics.downloads_bytes.set_function(lambda: self._bytes)

    @contextlib.contextmanager
    def hold(self, sha256: str) -> Iterator[None]:
        """Keep the file ``sha256`` from being pruned while the block runs."""
        with self._lock:
            self._held[sha256] += 1
        try:
            yield
        finally:
            with self._lock:
                self._held[sha256] -= 1
                if not self._held[sha256]:
                    del self._held[sha256]

    async def run(self) -> None:
        """Prune now and every PRUNE_PERIOD seconds until cancelled."""
        while True:
            try:
                await self.prune()
            except OSError as e:
                log.warning("downloads: cannot prune %s: %s", self.directory, e)
            await asyncio.sleep(PRUNE_PERIOD)

    async def prune(self) -> Pruned:
        """One pass (its disk work on a thread); logs and counts what it deleted."""
        pruned = await asyncio.to_thread(self._prune)
        self._bytes = pruned.left_bytes
        if pruned.files:
            log.info(
                "downloads: pruned %d files (%d bytes); %d bytes left (budget %d)",
                pruned.files,
                pruned.bytes,
                pruned.left_bytes,
                self._max_bytes,
            )
        if pruned.protected_bytes:
            log.warning(
                "downloads: %d bytes over the budget or age are kept: served to a guest, "
                "waiting for upload to the controller, or under %g s old",
                pruned.protected_bytes,
                GRACE,
            )
        return pruned

    def _prune(self) -> Pruned:
        """Delete what the budget says, oldest first (blocking)."""
        files = sorted(_listing(self.directory), key=lambda f: f.mtime)
        now = self._clock()
        total = sum(f.size for f in files)
        deleted = freed = protected = 0
        for file in files:
            too_old = self._max_age > 0 and file.mtime < now - self._max_age
            if not too_old and total <= self._max_bytes:
                break  # the rest are younger and fit
            if self._protected(file, now):
                protected += file.size
                continue
            with contextlib.suppress(FileNotFoundError):
                file.path.unlink()
            reason = "age" if too_old else "budget"
            self._metrics.downloads_pruned_files.labels(reason).inc()
            self._metrics.downloads_pruned_bytes.labels(reason).inc(file.size)
            deleted += 1
            freed += file.size
            total -= file.size
        return Pruned(deleted, freed, total, protected)

    def _protected(self, file: _File, now: float) -> bool:
        """Whether ``file`` must stay: held, queued for upload, or new."""
        name = file.path.name
        with self._lock:
            held = name in self._held
        return held or file.mtime > now - GRACE or self._queued(name)


def _listing(directory: Path) -> list[_File]:
    """The directory's complete files (a ``.part`` is a write in progress)."""
    found = []
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        return []
    for path in entries:
        if path.suffix == ".part":
            continue
        try:
            info = path.lstat()
        except FileNotFoundError:
            continue
        if stat.S_ISREG(info.st_mode):
            found.append(_File(path, info.st_size, info.st_mtime))
    return found
