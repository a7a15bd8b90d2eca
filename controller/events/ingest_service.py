"""EventIngestService: sensors stream batches; each is acknowledged once durably stored.

One batch per stream is in flight: the next request is read only after the previous
batch was acknowledged, so a slow store slows the sensor instead of filling memory.
Overload is answered, not queued without bound: a sensor over its quota of streams or
unacknowledged bytes, or a batch that finds no room in the store queue in time, ends
the stream with RESOURCE_EXHAUSTED and a ``retry-after-ms`` trailer; the sensor keeps
the unacknowledged batch and sends it again after that.
Malformed events are dropped, counted and logged, and their batch is still
acknowledged (a sensor resending them would be refused again and never drain its
spool). Every stored event's ``sensor`` is the caller's certificate name, for a sensor;
pool nodes stream their own events the same way, each placed on the session of its
lease (:mod:`controller.events.origin`).
Every acknowledgement carries the linger hint (controller.events.linger): how long the
sensor should gather events before its next batch, so that batches fill under load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from google.protobuf.duration_pb2 import Duration

from controller.events.origin import LeaseLookup, NodeOrigin
from controller.events.pipeline import EventPipeline
from controller.events.quota import Overloaded
from controller.events.rows import EventRow
from controller.events.validate import to_row
from controller.registry import Registry
from honeyfleet.authz import current_caller
from honeyfleet.errors import InvalidArgument
from honeyfleet.pki.identity import Role
from honeyfleet.v1 import ingest_pb2, ingest_pb2_grpc

log = logging.getLogger(__name__)

# Seconds a stream refused at its start waits for the sensor's first batch (see
# _first_request); a client that sends nothing is refused after this anyway.
REFUSAL_WAIT = 5.0


async def _first_request(requests: AsyncIterator[ingest_pb2.StreamEventsRequest]) -> None:
    """Wait (bounded) for a refused stream's first batch before the refusal goes out.

    A sensor writes its batch right after opening the stream; if the refusal races that
    write, grpc.aio reports the failed write as INTERNAL and the status, with its retry
    hint, is lost. Refused after its batch arrived, the sensor reads the refusal whole.
    """
    with contextlib.suppress(TimeoutError, StopAsyncIteration):
        async with asyncio.timeout(REFUSAL_WAIT):
            await anext(requests)


def _duration(seconds: float) -> Duration | None:
    """A protobuf Duration of whole milliseconds; None (left unset) for less than one."""
    millis = int(seconds * 1000)
    if not millis:
        return None
    duration = Duration()
    duration.FromMilliseconds(millis)
    return duration


class EventIngestServicer(ingest_pb2_grpc.EventIngestServiceServicer):
    """Receives sensors' and pool nodes' event batches."""

    def __init__(self, pipeline: EventPipeline, registry: Registry, leases: LeaseLookup) -> None:
        self._pipeline = pipeline
        self._registry = registry
        self._origin = NodeOrigin(leases)

    async def StreamEvents(
        self, request_iterator: AsyncIterator[ingest_pb2.StreamEventsRequest], context: Any
    ) -> AsyncIterator[ingest_pb2.StreamEventsResponse]:
        """Store each batch, then acknowledge it."""
        identity = current_caller().identity
        node = identity.name if identity.role is Role.POOLNODE else None
        # Quotas are per sender; a pool node may share its name with a sensor.
        sensor = identity.name if node is None else str(identity)
        warned_name = False
        try:
            with self._pipeline.stream(sensor):
                log.info("sensor %s opened an event stream", sensor)
                async for request in request_iterator:
                    if node is None:
                        # A streaming sensor is alive, whether or not it asks for leases.
                        self._registry.seen(sensor)
                    self._pipeline.linger.received(len(request.events))
                    with self._pipeline.batch(sensor, request.ByteSize()):
                        if node is None:
                            rows, rewritten = self._accept(f"sensor {sensor}", request, sensor)
                        else:
                            rows, rewritten = await self._accept_node(node, request), 0
                        if rewritten and not warned_name:
                            warned_name = True
                            log.warning(
                                "sensor %s sends events naming another sensor; stored as %s, "
                                "the name in its certificate (set the sensor's name to match)",
                                sensor,
                                sensor,
                            )
                        ack = await self._pipeline.write(rows)
                    self._pipeline.metrics.batches.inc()
                    yield ingest_pb2.StreamEventsResponse(
                        batch_id=request.batch_id,
                        stored=ack.stored,
                        duplicates=ack.duplicates,
                        linger=_duration(self._pipeline.linger_hint()),
                    )
        except Overloaded as e:
            # The interceptor turns the error into the status, with its retry hint.
            log.info("sensor %s event stream refused: %s", sensor, e)
            if e.reason == "sensor_streams":
                await _first_request(request_iterator)
            raise

    async def _accept_node(
        self, node: str, request: ingest_pb2.StreamEventsRequest
    ) -> list[EventRow]:
        """A pool node's batch: its valid rows, each on the session of its lease."""
        rows, _ = self._accept(f"pool node {node}", request, None)
        placed: list[EventRow] = []
        problems: list[str] = []
        for row in rows:
            try:
                placed.append(await self._origin.place(node, row))
            except InvalidArgument as e:
                problems.append(str(e))
        if problems:
            self._pipeline.metrics.rejected.labels("origin").inc(len(problems))
            log.warning(
                "pool node %s batch %d: dropped %d events of %d not on its own leases, first: %s",
                node,
                request.batch_id,
                len(problems),
                len(request.events),
                problems[0],
            )
        return placed

    def _accept(
        self, sender: str, request: ingest_pb2.StreamEventsRequest, sensor: str | None
    ) -> tuple[list[EventRow], int]:
        """The batch's valid rows, and how many had their sensor field replaced by ``sensor``
        (None: kept, for a pool node's events)."""
        rows: list[EventRow] = []
        rewritten = 0
        problems: list[str] = []
        now = datetime.now(UTC)
        for message in request.events:
            try:
                row, wrong_name = to_row(message, sensor, now=now)
            except InvalidArgument as e:
                problems.append(str(e))
                continue
            rows.append(row)
            rewritten += wrong_name
        if problems:
            self._pipeline.metrics.rejected.labels("validation").inc(len(problems))
            log.warning(
                "%s batch %d: dropped %d malformed events of %d, first: %s",
                sender,
                request.batch_id,
                len(problems),
                len(request.events),
                problems[0],
            )
        if rewritten:
            self._pipeline.metrics.sensor_rewritten.inc(rewritten)
        return rows, rewritten
