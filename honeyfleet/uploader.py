"""Streams spooled events to the controller's EventIngestService, deleting on ack.

Used by every role that writes events (sensors, pool nodes; "sensor" below means the
writing process, whichever role it is).

One batch is in flight at a time: send it, wait for its acknowledgement, delete exactly
its events from the spool, send the next. A broken stream or an unreachable controller
only delays delivery: the uploader reconnects with capped, jittered exponential backoff
and resends the one unacknowledged batch (never an acknowledged event), which the
controller deduplicates by event uuid anyway. A controller that sheds load answers
RESOURCE_EXHAUSTED with a ``retry-after-ms`` trailer; the uploader waits at least that
long, spread by jitter so refused sensors do not all come back at once.

Batches fill under load: with a backlog each batch takes up to ``batch`` events at once.
A batch that is not full waits until its oldest event has waited the linger, so the
rest of a burst (a session's start is several events) and, on a busy fleet, the next
events travel in the same batch. The linger is the larger of the sensor's own
(``linger``) and the one the controller asks for in each acknowledgement (it grows with
the fleet's load, and is 0 on a quiet fleet); the controller's is clamped to
``max_linger``, so it can delay delivery only that long. A full batch never waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sqlite3
from datetime import UTC, datetime
from typing import Any

import grpc

from honeyfleet.backoff import Backoff
from honeyfleet.config import non_negative, positive, setting
from honeyfleet.errors import Unavailable, retry_after
from honeyfleet.events import MAX_EVENT_JSON, parse_timestamp, to_proto
from honeyfleet.spool import Spool, Spooled
from honeyfleet.tls import TlsFiles, secure_channel
from honeyfleet.v1 import ingest_pb2, ingest_pb2_grpc

log = logging.getLogger(__name__)

BACKOFF_START = 0.2
BACKOFF_MAX = 10.0
ACK_TIMEOUT = 30.0
# Well under the 4 MiB gRPC message limit; events are at most 256 KiB each.
BATCH_BYTES = 1024 * 1024
# Past this a batch is full: the next event might not fit.
FULL_BYTES = BATCH_BYTES - MAX_EVENT_JSON
IDLE_POLL = 1.0


def batch_setting() -> Any:
    """The ``upload_batch`` key of every role that uploads events."""
    return setting(500, "events per batch sent to the controller", check=positive)


def linger_setting() -> Any:
    """The ``upload_linger`` key of every role that uploads events."""
    return setting(
        0.1,
        "seconds a batch that is not full waits after its first event, so the rest of "
        "their burst goes in the same batch (fewer, fuller batches); 0 sends at once",
        check=non_negative,
    )


def max_linger_setting() -> Any:
    """The ``upload_max_linger`` key of every role that uploads events."""
    return setting(
        5.0,
        "most seconds a batch that is not full waits because the controller asks for it "
        "(a busy controller asks for longer); 0 ignores the request",
        check=non_negative,
    )


class Uploader:
    """Delivers a spool's events to the controller; run :meth:`run` as a task."""

    def __init__(
        self,
        spool: Spool,
        controller: str,
        tls: TlsFiles,
        *,
        batch: int,
        linger: float = 0.0,
        max_linger: float = 0.0,
    ) -> None:
        self._spool = spool
        self._controller = controller
        self._tls = tls
        self._batch = batch
        self._linger = linger
        self._max_linger = max_linger
        self.linger_hint = 0.0
        """Seconds of linger the controller asked for in its last acknowledgement (clamped)."""
        self._batch_id = 0
        self.connected = asyncio.Event()
        self.delivered = 0

    async def run(self) -> None:
        """Deliver until cancelled."""
        backoff = Backoff(BACKOFF_START, BACKOFF_MAX)
        while True:
            problem = ""
            hint = 0.0
            try:
                # A channel per stream: a reconnection uses the current (renewed) certificate.
                async with secure_channel(self._controller, self._tls) as channel:
                    await self._stream(ingest_pb2_grpc.EventIngestServiceStub(channel))
            except grpc.aio.AioRpcError as e:
                problem = f"{e.code().name} ({e.details()})"
                hint = retry_after(e, cap=BACKOFF_MAX * 6)
            except Unavailable as e:
                problem = str(e)
            except sqlite3.Error as e:  # a disk problem: keep trying, the events wait
                log.error("reading the spool %s: %s", self._spool.path, e)
            if self.connected.is_set():
                backoff.reset()
            self.connected.clear()
            delay = backoff.delay(hint)
            if problem:
                log.warning(
                    "event ingest at %s: %s; %d events waiting, retrying in %.1fs",
                    self._controller,
                    problem,
                    self._spool.count,
                    delay,
                )
            await asyncio.sleep(delay)

    async def _stream(self, stub: ingest_pb2_grpc.EventIngestServiceAsyncStub) -> None:
        """One StreamEvents call: batches out, acks in, until the stream breaks."""
        call = stub.StreamEvents(None)
        try:
            await call.wait_for_connection()
            self.connected.set()
            # A new stream may reach a controller that is not busy: no hint until it says.
            self.linger_hint = 0.0
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
                    continue
                if len(batch) < self._batch and _batch_bytes(batch) <= FULL_BYTES:
                    wait = max(self._linger, self.linger_hint) - _age(batch[0])
                    if wait > 0:
                        await self._gather(wait)
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
                hint = ack.linger.seconds + ack.linger.nanos / 1e9
                # The controller's word, bounded by ours: it can only delay delivery so much.
                self.linger_hint = min(max(hint, 0.0), self._max_linger)
        finally:
            call.cancel()

    async def _gather(self, seconds: float) -> None:
        """Wait until the spool holds a full batch, or for ``seconds``.

        Returns early only after a commit since the last read: the spool's counts
        include events not committed yet, which that read could not see.
        """
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._spool.changed.wait()
                while self._spool.count < self._batch and self._spool.bytes <= FULL_BYTES:
                    self._spool.changed.clear()
                    await self._spool.changed.wait()


def _age(item: Spooled) -> float:
    """Seconds since the event was made; infinite when its time is unusable (a clock
    stepped back, a foreign spelling), so that a confused clock never holds a batch back."""
    try:
        age = (datetime.now(UTC) - parse_timestamp(item.event["timestamp"])).total_seconds()
    except ValueError:
        return math.inf
    return age if age >= 0 else math.inf


def _batch_bytes(batch: list[Spooled]) -> int:
    """The batch's size as the spool counts it."""
    return sum(item.size for item in batch)
