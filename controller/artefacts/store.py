"""The controller's content-addressed artefact store on local disk.

Content lives under ``root/<sha[:2]>/<sha>``, written first to ``root/incoming/`` and
renamed into place only once its size and sha256 match what the uploader declared, so a
stored file is always whole and named by its hash. The index
(:mod:`controller.artefacts.index`) records the content and every reference to it.

Bounds: at most ``max_uploads`` uploads at once (more are refused with a retry hint),
at most ``max_upload_bytes`` per artefact, and ``max_bytes`` for everything: storing new
content first evicts the least recently referenced content until it fits. Retention
(``retention_days``) forgets content not referenced for that long. Chunk writes and
hashing run on the store's I/O threads and the index on its own thread, so the event
loop never waits for a disk.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import os
import re
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO, Any, TypeVar

from controller.artefacts.index import ArtefactIndex, Blob, Reference, RefQuery
from controller.artefacts.metrics import ArtefactMetrics
from honeyfleet.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted

log = logging.getLogger(__name__)
T = TypeVar("T")

SHA256 = re.compile(r"[0-9a-f]{64}")
READ_CHUNK = 256 * 1024
# Seconds an uploader refused for too many uploads at once is told to wait.
RETRY_AFTER = 2.0
# Content evicted per index call while making room.
EVICT_BATCH = 64
MICROS_PER_DAY = 86_400 * 1_000_000


def check_sha256(value: str) -> str:
    """``value`` if it is a lowercase hex sha256; InvalidArgument if not."""
    if not SHA256.fullmatch(value):
        raise InvalidArgument("sha256 must be 64 lowercase hex digits")
    return value


class ArtefactStore:
    """Artefacts on local disk, indexed, within a byte budget."""

    def __init__(
        self,
        root: Path,
        *,
        max_bytes: int,
        max_upload_bytes: int,
        max_uploads: int,
        retention_days: int = 0,
    ) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.max_upload_bytes = max_upload_bytes
        self.max_uploads = max_uploads
        self.retention_days = retention_days
        self._uploads = 0
        self._io = concurrent.futures.ThreadPoolExecutor(max_uploads, thread_name_prefix="artef-io")
        self._indexer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="artef-ix")
        self._index: ArtefactIndex | None = None
        self.metrics = ArtefactMetrics()
        self.stored_bytes = 0
        """Bytes of stored content (changed on the index thread only)."""
        self.metrics.bytes.set_function(lambda: self.stored_bytes)

    async def open(self) -> None:
        """Create the directories and the index; drop uploads a crash left unfinished."""
        self._index = await self._on_index(self._open)

    def _open(self) -> ArtefactIndex:
        incoming = self.root / "incoming"
        incoming.mkdir(parents=True, exist_ok=True)
        for leftover in incoming.iterdir():
            leftover.unlink(missing_ok=True)
        index = ArtefactIndex(self.root / "index.sqlite3")
        self.stored_bytes = index.total_bytes()
        return index

    async def close(self) -> None:
        """Close the index and stop the threads."""
        if self._index is not None:
            index, self._index = self._index, None
            await self._on_index(index.close)
        self._io.shutdown(wait=True)
        self._indexer.shutdown(wait=True)

    def path(self, sha256: str) -> Path:
        """Where content with this hash lives."""
        return self.root / sha256[:2] / sha256

    async def total_bytes(self) -> int:
        """Bytes of stored content."""
        return await self._on_index(self._ix().total_bytes)

    async def reference_if_stored(self, ref: Reference) -> bool:
        """Record ``ref`` if its content is stored already; whether it was."""
        self._check(ref)
        index = self._ix()
        stored = await self._on_index(lambda: index.add_reference(ref, new_blob=False))
        if stored:
            self.metrics.uploads.labels("already_stored").inc()
        return stored

    def receive(self, ref: Reference) -> Receiving:
        """Start receiving new content for ``ref`` (use as ``async with``).

        ResourceExhausted (with a retry hint) when ``max_uploads`` are running already.
        """
        self._check(ref)
        if self._uploads >= self.max_uploads:
            self.metrics.uploads.labels("busy").inc()
            raise ResourceExhausted(
                f"{self.max_uploads} artefact uploads are running", retry_after=RETRY_AFTER
            )
        return Receiving(self, ref)

    async def references(self, query: RefQuery) -> list[Reference]:
        """A page of references, newest first."""
        return await self._on_index(self._ix().references, query)

    async def content(self, sha256: str) -> tuple[Blob, AsyncIterator[bytes]]:
        """Stored content and an iterator over its bytes; NotFound if it is not stored."""
        check_sha256(sha256)
        blob = await self._on_index(self._ix().blob, sha256)
        if blob is None:
            raise NotFound(f"no artefact {sha256}")
        try:
            # Opened now: content evicted later is still read whole (POSIX unlink).
            path = self.path(sha256)
            file = await self._on_io(lambda: path.open("rb"))
        except FileNotFoundError:
            raise NotFound(f"artefact {sha256} is indexed but its file is gone") from None
        return blob, self._read(file)

    async def _read(self, file: IO[bytes]) -> AsyncIterator[bytes]:
        """The file's bytes in chunks, read on the I/O threads."""
        try:
            while chunk := await self._on_io(file.read, READ_CHUNK):
                yield chunk
        finally:
            file.close()

    async def expire(self, now_us: int) -> int:
        """Forget content not referenced within ``retention_days``; how many went."""
        if not self.retention_days:
            return 0
        cutoff = now_us - self.retention_days * MICROS_PER_DAY
        index = self._ix()
        gone = 0
        while batch := await self._on_index(lambda: index.oldest(EVICT_BATCH, before_us=cutoff)):
            await self._on_index(self._remove, index, batch, "retention")
            gone += len(batch)
        if gone:
            log.info("artefact retention: removed %d artefacts", gone)
        return gone

    def _check(self, ref: Reference) -> None:
        """Refuse metadata that is malformed or beyond the bounds (counted)."""
        try:
            check_sha256(ref.sha256)
            if ref.size < 0:
                raise InvalidArgument("size must not be negative")
            limit = min(self.max_upload_bytes, self.max_bytes)
            if ref.size > limit:
                raise FailedPrecondition(f"artefact of {ref.size} bytes is above the limit {limit}")
        except (InvalidArgument, FailedPrecondition):
            self.metrics.uploads.labels("refused").inc()
            raise

    def _store(self, index: ArtefactIndex, temp: Path, ref: Reference) -> None:
        """Move checked content into place and index it, making room first (index thread)."""
        if index.blob(ref.sha256) is not None:
            temp.unlink()
            index.add_reference(ref, new_blob=False)
            return
        used = index.total_bytes()
        while used + ref.size > self.max_bytes:
            victims = index.oldest(EVICT_BATCH)
            if not victims:
                break
            for victim in victims:
                if used + ref.size <= self.max_bytes:
                    break
                self._remove(index, [victim], "budget")
                used -= victim.size
                log.info("artefact store budget: evicted %s (%d bytes)", victim.sha256, victim.size)
        final = self.path(ref.sha256)
        final.parent.mkdir(exist_ok=True)
        temp.rename(final)
        _sync_dir(final.parent)
        index.add_reference(ref, new_blob=True)
        self.stored_bytes += ref.size

    def _remove(self, index: ArtefactIndex, blobs: list[Blob], reason: str) -> None:
        """Delete content from the index, then from disk (index thread)."""
        for blob in blobs:
            index.remove(blob.sha256)
            self.path(blob.sha256).unlink(missing_ok=True)
            self.stored_bytes -= blob.size
            self.metrics.removed.labels(reason).inc()

    def _ix(self) -> ArtefactIndex:
        """The open index (RuntimeError before open or after close)."""
        if self._index is None:
            raise RuntimeError("the artefact store is not open")
        return self._index

    async def _on_index(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the index thread (the index is used there only)."""
        return await asyncio.get_running_loop().run_in_executor(self._indexer, fn, *args)

    async def _on_io(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking file work on the I/O threads."""
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)


class Receiving:
    """One upload of new content: chunks in, then checked and stored, or dropped."""

    def __init__(self, store: ArtefactStore, ref: Reference) -> None:
        self._store = store
        self.ref = ref
        self.received = 0
        self._temp = store.root / "incoming" / f"{ref.sha256}.{secrets.token_hex(8)}"
        self._file: IO[bytes] | None = None
        self._digest = hashlib.sha256()
        self._stored = False

    async def __aenter__(self) -> Receiving:
        """Take an upload slot and create the temporary file."""
        self._store._uploads += 1
        try:
            self._file = await self._store._on_io(lambda: self._temp.open("xb"))
        except BaseException:
            self._store._uploads -= 1
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Give the slot back; drop the temporary file unless it was stored."""
        self._store._uploads -= 1
        if not self._stored:
            await self._store._on_io(self._discard)

    async def write(self, chunk: bytes) -> None:
        """Append a chunk; InvalidArgument past the declared size."""
        self.received += len(chunk)
        if self.received > self.ref.size:
            self._store.metrics.uploads.labels("refused").inc()
            raise InvalidArgument(f"more than the declared {self.ref.size} bytes")
        await self._store._on_io(self._write, chunk)

    async def commit(self) -> None:
        """Check size and sha256 against the metadata, then store; InvalidArgument if not."""
        store = self._store
        if self.received != self.ref.size:
            store.metrics.uploads.labels("refused").inc()
            raise InvalidArgument(f"got {self.received} bytes, declared {self.ref.size}")
        await store._on_io(self._finish)
        if self._digest.hexdigest() != self.ref.sha256:
            store.metrics.uploads.labels("refused").inc()
            raise InvalidArgument("content does not match the declared sha256")
        await store._on_index(store._store, store._ix(), self._temp, self.ref)
        self._stored = True
        store.metrics.uploads.labels("stored").inc()

    def _write(self, chunk: bytes) -> None:
        assert self._file is not None
        self._file.write(chunk)
        self._digest.update(chunk)

    def _finish(self) -> None:
        """Flush the content to disk before it may be renamed into place."""
        assert self._file is not None
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def _discard(self) -> None:
        if self._file is not None:
            self._file.close()
        self._temp.unlink(missing_ok=True)


def _sync_dir(path: Path) -> None:
    """fsync a directory so a rename into it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
