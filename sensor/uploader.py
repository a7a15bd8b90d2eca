"""Streams spooled events to the controller's EventIngestService, deleting on ack.

One batch is in flight at a time: send it, wait for its acknowledgement, delete exactly
its events from the spool, send the next. A broken stream or an unreachable controller
only delays delivery: the uploader reconnects with capped, jittered exponential backoff
and resends the one unacknowledged batch (never an acknowledged event), which the
controller deduplicates by event uuid anyway. A controller that sheds load answers
RESOURCE_EXHAUSTED with a ``retry-after-ms`` trailer; the uploader waits at least that
long, spread by jitter so refused sensors do not all come back at once.

Batches fill under load: with a backlog each batch takes up to ``batch`` events; when
the spool was empty, the uploader waits ``linger`` seconds after the first new event so
the rest of its burst (a session's start is several events) travels in the same batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
from collections.abc import Iterable

import grpc

from honeyfleet.errors import RETRY_AFTER_TRAILER, Unavailable
from honeyfleet.events import to_proto
from honeyfleet.tls import TlsFiles, secure_channel
from honeyfleet.v1 import ingest_pb2, ingest_pb2_grpc
from sensor.spool import Spool

log = logging.getLogger(__name__)

BACKOFF_START = 0.2
BACKOFF_MAX = 10.0
ACK_TIMEOUT = 30.0
# Well under the 4 MiB gRPC message limit; events are at most 256 KiB each.
BATCH_BYTES = 1024 * 1024
IDLE_POLL = 1.0


class Uploader:
    """Delivers a spool's events to the controller; run :meth:`run` as a task."""

    def __init__(
        self, spool: Spool, controller: str, tls: TlsFiles, *, batch: int, linger: float = 0.0
    ) -> None:
        self._spool = spool
        self._controller = controller
        self._tls = tls
        self._batch = batch
        self._linger = linger
        self._batch_id = 0
        self.connected = asyncio.Event()
        self.delivered = 0

    async def run(self) -> None:
        """Deliver until cancelled."""
        backoff = BACKOFF_START
        while True:
            problem = ""
            hint = 0.0
            try:
                # A channel per stream: a reconnection uses the current (renewed) certificate.
                async with secure_channel(self._controller, self._tls) as channel:
                    await self._stream(ingest_pb2_grpc.EventIngestServiceStub(channel))
            except grpc.aio.AioRpcError as e:
                problem = f"{e.code().name} ({e.details()})"
                hint = _retry_after(e)
            except Unavailable as e:
                problem = str(e)
            except sqlite3.Error as e:  # a disk problem: keep trying, the events wait
                log.error("reading the spool %s: %s", self._spool.path, e)
            if self.connected.is_set():
                backoff = BACKOFF_START
            self.connected.clear()
            # Jitter spreads sensors that failed together (a controller restart); a
            # controller's hint is never undercut, only stretched by up to half.
            delay = max(
                backoff * random.uniform(0.8, 1.2),  # noqa: S311
                hint * random.uniform(1.0, 1.5),  # noqa: S311
            )
            if problem:
                log.warning(
                    "event ingest at %s: %s; %d events waiting, retrying in %.1fs",
                    self._controller,
                    problem,
                    self._spool.count,
                    delay,
                )
            await asyncio.sleep(delay)
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _stream(self, stub: ingest_pb2_grpc.EventIngestServiceAsyncStub) -> None:
        """One StreamEvents call: batches out, acks in, until the stream breaks."""
        call = stub.StreamEvents(None)
        try:
            await call.wait_for_connection()
            self.connected.set()
            while True:
                # Cleared before reading, so a commit landing meanwhile is not missed.
                self._spool.changed.clear()
                batch = await self._spool.oldest(self._batch, BATCH_BYTES)
                if not batch:
                    # asyncio.timeout, never wait_for: on Python 3.11 wait_for loses a
                    # cancellation that arrives as the awaited thing completes, and the
                    # uploader would then outlive Sensor.stop().
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(IDLE_POLL):
                            await self._spool.changed.wait()
                            # Let the rest of the burst that woke us join the batch.
                            await asyncio.sleep(self._linger)
                    continue
                self._batch_id += 1
                request = ingest_pb2.StreamEventsRequest(
                    batch_id=self._batch_id,
                    events=[to_proto(item.event, item.text) for item in batch],
                )
                try:
                    await call.write(request)
                except asyncio.InvalidStateError:
                    # grpc.aio's answer to a write on a call the controller already ended;
                    # its status may be a refusal with a retry hint, which must not be lost.
                    code = await call.code()
                    if code != grpc.StatusCode.OK:
                        raise grpc.aio.AioRpcError(
                            code,
                            await call.initial_metadata(),
                            await call.trailing_metadata(),
                            await call.details(),
                            None,
                        ) from None
                    raise Unavailable("the controller ended the event stream") from None
                try:
                    async with asyncio.timeout(ACK_TIMEOUT):
                        ack = await call.read()
                except TimeoutError:
                    raise Unavailable(f"no acknowledgement within {ACK_TIMEOUT:.0f}s") from None
                if not isinstance(ack, ingest_pb2.StreamEventsResponse):
                    raise Unavailable("the controller ended the event stream")
                if ack.batch_id != self._batch_id:
                    raise Unavailable(f"acknowledged batch {ack.batch_id}, sent {self._batch_id}")
                await self._spool.delete(batch)
                self.delivered += len(batch)
        finally:
            call.cancel()


def _retry_after(error: grpc.aio.AioRpcError) -> float:
    """The seconds a RESOURCE_EXHAUSTED answer asks to wait (0 without a usable hint)."""
    if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return 0.0
    # grpc.aio gives (key, value) pairs; grpc-stubs types them as the sync API's objects.
    trailers: Iterable[tuple[str, str | bytes]] = error.trailing_metadata() or ()  # type: ignore[assignment]
    value = next((v for k, v in trailers if k == RETRY_AFTER_TRAILER), None)
    if not isinstance(value, str) or not value.isdigit():
        return 0.0
    # Capped: a confused (or hostile) controller must not park the spool for long.
    return min(int(value) / 1000, BACKOFF_MAX * 6)
