"""LeaseService and SensorService: what sensors call."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration

from controller.leases import SHED_RETRY_AFTER, LeaseManager
from controller.registry import Registry
from honeyfleet.authz import current_caller
from honeyfleet.errors import HoneyfleetError, InvalidArgument, ResourceExhausted
from honeyfleet.intake import queued_seconds
from honeyfleet.v1 import lease_pb2, lease_pb2_grpc, sensor_pb2, sensor_pb2_grpc

log = logging.getLogger(__name__)

MAX_LISTEN_ADDRESSES = 64
MAX_TEXT = 256


def _calling_sensor(registry: Registry) -> str:
    """The calling sensor as "sensor/<name>", refreshing its last-seen time."""
    caller = current_caller()
    registry.seen(caller.identity.name)
    return str(caller.identity)


class LeaseServicer(lease_pb2_grpc.LeaseServiceServicer):
    """Leases for sensors; a sensor only ever sees and changes its own leases."""

    def __init__(self, registry: Registry, leases: LeaseManager, *, max_calls: int) -> None:
        self._registry = registry
        self._leases = leases
        # Calls in flight on one Leases stream (as many as calls of their own on one
        # connection): more are refused at once, not given a task each.
        self._max_calls = max_calls

    async def AcquireLease(
        self, request: lease_pb2.AcquireLeaseRequest, context: Any
    ) -> lease_pb2.AcquireLeaseResponse:
        """Place the session on a guest."""
        sensor = _calling_sensor(self._registry)
        # The caller's deadline bounds the wait, so it hears our answer, not its timeout.
        return await self._acquire(
            sensor, request, context.time_remaining(), queued=queued_seconds(context)
        )

    async def RenewLease(
        self, request: lease_pb2.RenewLeaseRequest, context: Any
    ) -> lease_pb2.RenewLeaseResponse:
        """Extend the lease's TTL."""
        sensor = _calling_sensor(self._registry)
        lease = await self._leases.renew(sensor, request.lease_id)
        return lease_pb2.RenewLeaseResponse(lease=lease.to_proto())

    async def ReleaseLease(
        self, request: lease_pb2.ReleaseLeaseRequest, context: Any
    ) -> lease_pb2.ReleaseLeaseResponse:
        """End the lease."""
        sensor = _calling_sensor(self._registry)
        lease = await self._leases.release(sensor, request.lease_id, request.reason)
        return lease_pb2.ReleaseLeaseResponse(lease=lease.to_proto())

    async def Leases(
        self, request_iterator: AsyncIterator[lease_pb2.LeasesRequest], context: Any
    ) -> AsyncIterator[lease_pb2.LeasesResponse]:
        """Take each message's releases as it is read, serve its call in a task of its
        own and answer each call as it ends.

        Every answer confirms the releases read before it (releases_through), so a
        release costs the stream one message, or none when it rides along with a call.
        Calls still running when the sensor's side of the stream ends are answered
        before the stream closes; a stream that breaks cancels them (as it would calls
        of their own).
        """
        caller = current_caller().identity
        sensor = str(caller)
        answers: asyncio.Queue[lease_pb2.LeasesResponse | None] = asyncio.Queue()
        calls: set[asyncio.Task[None]] = set()
        # The id of the last message whose releases were taken.
        taken = 0

        async def read() -> None:
            nonlocal taken
            try:
                async for request in request_iterator:
                    self._registry.seen(caller.name)
                    if request.releases:
                        for release in request.releases:
                            self._leases.release_held(sensor, release.lease_id, release.reason)
                        taken = request.id
                        if not request.HasField("call"):
                            continue  # releases only: nothing to answer
                    if len(calls) >= self._max_calls:
                        answers.put_nowait(self._refuse(request.id))
                        continue
                    call = asyncio.create_task(self._answer(sensor, request, answers))
                    calls.add(call)
                    call.add_done_callback(calls.discard)
                await asyncio.gather(*calls)
            finally:
                answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (answer := await answers.get()) is not None:
                answer.releases_through = taken
                yield answer
        finally:
            reader.cancel()
            for call in list(calls):
                call.cancel()
        await reader  # re-raises what broke the sensor's side of the stream

    def _refuse(self, call_id: int) -> lease_pb2.LeasesResponse:
        """The answer to a call beyond the stream's bound."""
        self._leases.metrics.shed.labels("stream_calls").inc()
        error = ResourceExhausted(
            f"{self._max_calls} lease calls of this sensor are in flight already "
            "(max_concurrent_streams)",
            retry_after=SHED_RETRY_AFTER,
        )
        return lease_pb2.LeasesResponse(id=call_id, error=_error(error))

    async def _answer(
        self,
        sensor: str,
        request: lease_pb2.LeasesRequest,
        answers: asyncio.Queue[lease_pb2.LeasesResponse | None],
    ) -> None:
        """Run one call of the Leases stream and queue its answer (or its error)."""
        timeout = (
            request.timeout.ToTimedelta().total_seconds() if request.HasField("timeout") else None
        )
        try:
            match request.WhichOneof("call"):
                case "acquire":
                    acquired = await self._acquire(sensor, request.acquire, timeout)
                    answer = lease_pb2.LeasesResponse(id=request.id, acquire=acquired)
                case "renew":
                    lease = await self._leases.renew(sensor, request.renew.lease_id)
                    answer = lease_pb2.LeasesResponse(
                        id=request.id, renew=lease_pb2.RenewLeaseResponse(lease=lease.to_proto())
                    )
                case "release":
                    lease = await self._leases.release(
                        sensor, request.release.lease_id, request.release.reason
                    )
                    answer = lease_pb2.LeasesResponse(
                        id=request.id,
                        release=lease_pb2.ReleaseLeaseResponse(lease=lease.to_proto()),
                    )
                case _:
                    raise InvalidArgument(
                        "a Leases request names no call (acquire, renew, release)"
                    )
        except HoneyfleetError as e:
            answer = lease_pb2.LeasesResponse(id=request.id, error=_error(e))
        except Exception:
            log.exception("lease call %d of %s failed", request.id, sensor)
            answer = lease_pb2.LeasesResponse(
                id=request.id,
                error=lease_pb2.LeasesError(
                    code=grpc.StatusCode.INTERNAL.value[0], message="internal error"
                ),
            )
        answers.put_nowait(answer)

    async def _acquire(
        self,
        sensor: str,
        request: lease_pb2.AcquireLeaseRequest,
        time_remaining: float | None,
        *,
        queued: float | None = None,
    ) -> lease_pb2.AcquireLeaseResponse:
        """Place a session on a guest for ``sensor``; the answer to send."""
        lease, credentials = await self._leases.acquire(
            sensor, request, time_remaining, queued=queued
        )
        ttl = Duration()
        ttl.FromMilliseconds(int(self._leases.ttl * 1000))
        return lease_pb2.AcquireLeaseResponse(
            lease=lease.to_proto(), credentials=credentials, ttl=ttl
        )


def _error(error: HoneyfleetError) -> lease_pb2.LeasesError:
    """A call's error as the Leases stream answers it."""
    answer = lease_pb2.LeasesError(code=error.code.value[0], message=str(error))
    if isinstance(error, ResourceExhausted) and error.retry_after is not None:
        answer.retry_after.FromMilliseconds(round(error.retry_after * 1000))
    return answer


class SensorServicer(sensor_pb2_grpc.SensorServiceServicer):
    """Sensor announcements."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    async def RegisterSensor(
        self, request: sensor_pb2.RegisterSensorRequest, context: Any
    ) -> sensor_pb2.RegisterSensorResponse:
        """Record the sensor's version and listen addresses."""
        if len(request.listen_addresses) > MAX_LISTEN_ADDRESSES or any(
            len(text) > MAX_TEXT
            for text in (request.version, request.hostname, *request.listen_addresses)
        ):
            raise InvalidArgument(
                f"at most {MAX_LISTEN_ADDRESSES} listen addresses; texts up to {MAX_TEXT} chars"
            )
        caller = current_caller()
        await self._registry.describe_sensor(
            caller.identity.name,
            version=request.version,
            listen_addresses=list(request.listen_addresses),
            hostname=request.hostname,
        )
        return sensor_pb2.RegisterSensorResponse(sensor=str(caller.identity))
