"""The durable artefact outbox: files a sensor or pool node keeps go to the controller.

Shared by every role that captures files (sensors: uploads and recordings; pool nodes:
files from guests' disks). :meth:`Outbox.put` queues a file on local disk
(:mod:`honeyfleet.outboxqueue`: content hard-linked under its sha256, a row in SQLite)
and returns once that is durable; :meth:`Outbox.run` uploads what is queued, oldest
first, one at a time, through ArtefactService (:mod:`honeyfleet.artefactclient`), and
forgets an artefact only once the controller answered STORED or ALREADY_STORED. So
delivery is at least once, across restarts of either end, and content the controller
holds already is not sent again (it answers ALREADY_STORED to the metadata, before any
byte moves; its index keeps one reference per session and name, so a resend after a
crash stores nothing twice).

While the controller is away the outbox retries with capped, jittered backoff, honouring
a RESOURCE_EXHAUSTED answer's retry hint. An artefact the controller refuses for good
(INVALID_ARGUMENT: its content no longer matches; FAILED_PRECONDITION: above the store's
limits) is dropped and counted, so one bad file never blocks the rest. The queue is
bounded (``artefact_outbox_max_bytes`` of content, ``artefact_outbox_max_files``
artefacts); what does not fit is refused at once and counted, and stays only where the
role keeps it. All disk work runs on the outbox's own thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import CollectorRegistry, Counter, Gauge

from honeyfleet.artefactclient import file_sha256, upload
from honeyfleet.backoff import Backoff
from honeyfleet.config import positive, setting
from honeyfleet.errors import Unavailable, retry_after
from honeyfleet.outboxqueue import Item, OutboxQueue, Queued
from honeyfleet.tls import TlsFiles, secure_channel
from honeyfleet.v1 import artefact_pb2, artefact_pb2_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")

BACKOFF_FIRST = 0.5
BACKOFF_MOST = 30.0
# Seconds an idle outbox waits before looking at its queue again (a put wakes it sooner).
IDLE_POLL = 5.0
# The controller's answers that no retry will change: the artefact is dropped.
SHA256 = re.compile(r"[0-9a-f]{64}")
REFUSED_FOR_GOOD = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)


def max_bytes_setting() -> Any:
    """The ``artefact_outbox_max_bytes`` key of every role that uploads artefacts."""
    return setting(
        2 * 1024**3,
        "bytes of artefacts waiting for upload to the controller (each content once); "
        "past it new artefacts are not queued, and stay only on this host",
        check=positive,
    )


def max_files_setting() -> Any:
    """The ``artefact_outbox_max_files`` key of every role that uploads artefacts."""
    return setting(
        100_000,
        "artefacts waiting for upload to the controller; past it new ones are not queued",
        check=positive,
    )


class OutboxMetrics:
    """The outbox's backlog, deliveries and failures, in the role's registry."""

    def __init__(self, prefix: str, registry: CollectorRegistry) -> None:
        r = registry
        self.files = Gauge(
            f"{prefix}_outbox_artefacts",
            "Artefacts waiting for upload to the controller",
            registry=r,
        )
        self.bytes = Gauge(
            f"{prefix}_outbox_bytes", "Bytes of artefact content waiting for upload", registry=r
        )
        self.uploaded = Counter(
            f"{prefix}_outbox_uploaded",
            "Artefacts the controller took (result: stored, already_stored)",
            ["result"],
            registry=r,
        )
        self.failures = Counter(
            f"{prefix}_outbox_failures",
            "Failed uploads (reason: retry: tried again later; refused: the controller "
            "refused the artefact for good; missing: its content was gone)",
            ["reason"],
            registry=r,
        )
        self.refused = Counter(
            f"{prefix}_outbox_refused",
            "Artefacts not queued (reason: over_bytes, over_items, error)",
            ["reason"],
            registry=r,
        )


class Outbox:
    """Queues artefacts durably and uploads them; :meth:`open`, run :meth:`run`, :meth:`close`."""

    def __init__(
        self,
        directory: Path,
        controller: str,
        tls: TlsFiles,
        metrics: OutboxMetrics,
        *,
        max_bytes: int,
        max_files: int,
        on_delivered: Callable[[Item], Awaitable[None]] | None = None,
    ) -> None:
        self.controller = controller
        self._on_delivered = on_delivered
        """Told of each artefact the controller took (e.g. to free the role's own copy)."""
        self._tls = tls
        self._metrics = metrics
        self._queue = OutboxQueue(directory, max_bytes=max_bytes, max_items=max_files)
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="outbox")
        self._queued = asyncio.Event()
        self._progress = asyncio.Event()
        self.connected = asyncio.Event()
        """Set while the last upload went through (cleared by a failure)."""
        metrics.files.set_function(lambda: self._queue.items)
        metrics.bytes.set_function(lambda: self._queue.bytes)

    @property
    def backlog(self) -> int:
        """Artefacts waiting for upload."""
        return self._queue.items

    def queued(self, sha256: str) -> bool:
        """Whether the content ``sha256`` waits for upload (safe from any thread)."""
        return SHA256.fullmatch(sha256) is not None and self._queue.path(sha256).exists()

    async def open(self) -> None:
        """Open the queue (content left by a crash is removed)."""
        orphans = await self._run(self._queue.open)
        if orphans:
            log.info("outbox: removed %d files a crash left without their row", len(orphans))
        if self._queue.items:
            log.info(
                "outbox holds %d artefacts (%d bytes) for %s",
                self._queue.items,
                self._queue.bytes,
                self.controller,
            )

    async def close(self) -> None:
        """Close the queue (what waits is uploaded after the next start)."""
        await self._run(self._queue.close)
        self._executor.shutdown(wait=True)

    async def put(
        self,
        path: Path,
        kind: artefact_pb2.ArtefactKind.ValueType,
        *,
        session: str,
        filename: str,
        sha256: str | None = None,
        capture_time: float | None = None,
    ) -> str | None:
        """Queue the file at ``path`` for upload (durable on return); its sha256, or None
        when it was not queued (over a bound, or unreadable: counted and logged).

        ``sha256`` is computed unless given; the file must not change afterwards.
        """
        if sha256 is not None and not SHA256.fullmatch(sha256):
            # It names a file in the outbox: never let it be a path.
            log.error("outbox: %s not queued: %r is not a sha256", path, sha256[:80])
            self._metrics.refused.labels("error").inc()
            return None
        try:
            queued, item = await self._run(
                self._put, path, kind, session, filename, sha256, capture_time
            )
        except (OSError, sqlite3.Error, RuntimeError) as e:  # RuntimeError: closed
            log.error("outbox: cannot queue %s for upload: %s", path, e)
            self._metrics.refused.labels("error").inc()
            return None
        if not queued.accepted:
            log.warning(
                "outbox: %s (%d bytes) not queued for upload: %s (%d artefacts, %d bytes wait)",
                path,
                item.size,
                queued.value,
                self._queue.items,
                self._queue.bytes,
            )
            self._metrics.refused.labels(queued.value).inc()
            return None
        self._queued.set()
        return item.sha256

    async def idle(self) -> None:
        """Wait until nothing waits for upload (for tests and orderly shutdowns)."""
        while self._queue.items:
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(IDLE_POLL):
                    await self._progress.wait()

    async def run(self) -> None:
        """Upload until cancelled."""
        backoff = Backoff(BACKOFF_FIRST, BACKOFF_MOST)
        while True:
            hint = 0.0
            problem = ""
            try:
                # A channel per attempt: a reconnection uses the current (renewed) certificate.
                async with secure_channel(self.controller, self._tls) as channel:
                    await self._deliver(artefact_pb2_grpc.ArtefactServiceStub(channel), backoff)
            except grpc.aio.AioRpcError as e:
                problem = f"{e.code().name} ({e.details()})"
                hint = retry_after(e, cap=BACKOFF_MOST * 4)
            except (Unavailable, sqlite3.Error, OSError) as e:
                problem = str(e)
            self.connected.clear()
            self._metrics.failures.labels("retry").inc()
            delay = backoff.delay(hint)
            log.warning(
                "outbox: uploading to %s: %s; %d artefacts waiting, retrying in %.1fs",
                self.controller,
                problem,
                self._queue.items,
                delay,
            )
            await asyncio.sleep(delay)

    async def _deliver(
        self, stub: artefact_pb2_grpc.ArtefactServiceAsyncStub, backoff: Backoff
    ) -> None:
        """Upload the oldest artefact until none is left, then wait for more."""
        while True:
            # Cleared before reading, so a put landing meanwhile is not missed.
            self._queued.clear()
            item = await self._run(self._queue.oldest)
            if item is None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(IDLE_POLL):
                        await self._queued.wait()
                continue
            path = self._queue.path(item.sha256)
            try:
                status = await upload(stub, _metadata(item), path)
            except FileNotFoundError:
                log.error("outbox: content of %s is gone; dropped", item.sha256)
                self._metrics.failures.labels("missing").inc()
                await self._forget(item)
                continue
            except grpc.aio.AioRpcError as e:
                if e.code() not in REFUSED_FOR_GOOD:
                    raise
                log.error(
                    "outbox: the controller refused %s (%s, session %s): %s: %s; dropped",
                    item.sha256,
                    item.filename,
                    item.session,
                    e.code().name,
                    e.details(),
                )
                self._metrics.failures.labels("refused").inc()
                await self._forget(item)
                continue
            await self._forget(item)
            if self._on_delivered is not None:
                await self._on_delivered(item)
            self._metrics.uploaded.labels(
                "stored" if status == artefact_pb2.UPLOAD_STATUS_STORED else "already_stored"
            ).inc()
            self.connected.set()
            backoff.reset()

    async def _forget(self, item: Item) -> None:
        """Remove an artefact that is done with (delivered or dropped)."""
        await self._run(self._queue.remove, item)
        self._progress.set()

    def _put(
        self,
        path: Path,
        kind: artefact_pb2.ArtefactKind.ValueType,
        session: str,
        filename: str,
        sha256: str | None,
        capture_time: float | None,
    ) -> tuple[Queued, Item]:
        """Hash if need be, then queue (on the outbox's thread)."""
        size = path.stat().st_size
        if sha256 is None:
            sha256, size = file_sha256(path)
        at = time.time() if capture_time is None else capture_time
        item = Item(sha256, size, int(kind), session, filename, int(at * 1_000_000))
        return self._queue.put(path, item), item

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the outbox's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)


def _metadata(item: Item) -> artefact_pb2.ArtefactMetadata:
    """The upload's metadata for a queued artefact."""
    stamp = Timestamp()
    stamp.FromMicroseconds(item.capture_us)
    return artefact_pb2.ArtefactMetadata(
        sha256=item.sha256,
        size=item.size,
        kind=item.kind,  # type: ignore[arg-type]
        session=item.session,
        filename=item.filename,
        capture_time=stamp,
    )
