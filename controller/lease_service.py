"""LeaseService and SensorService: what sensors call."""

from __future__ import annotations

from typing import Any

from google.protobuf.duration_pb2 import Duration

from controller.leases import LeaseManager
from controller.registry import Registry
from honeyfleet.authz import current_caller
from honeyfleet.errors import InvalidArgument
from honeyfleet.intake import queued_seconds
from honeyfleet.v1 import lease_pb2, lease_pb2_grpc, sensor_pb2, sensor_pb2_grpc

MAX_LISTEN_ADDRESSES = 64
MAX_TEXT = 256


def _calling_sensor(registry: Registry) -> str:
    """The calling sensor as "sensor/<name>", refreshing its last-seen time."""
    caller = current_caller()
    registry.seen(caller.identity.name)
    return str(caller.identity)


class LeaseServicer(lease_pb2_grpc.LeaseServiceServicer):
    """Leases for sensors; a sensor only ever sees and changes its own leases."""

    def __init__(self, registry: Registry, leases: LeaseManager) -> None:
        self._registry = registry
        self._leases = leases

    async def AcquireLease(
        self, request: lease_pb2.AcquireLeaseRequest, context: Any
    ) -> lease_pb2.AcquireLeaseResponse:
        """Place the session on a guest."""
        sensor = _calling_sensor(self._registry)
        # The caller's deadline bounds the wait, so it hears our answer, not its timeout.
        lease, credentials = await self._leases.acquire(
            sensor, request, context.time_remaining(), queued=queued_seconds(context)
        )
        ttl = Duration()
        ttl.FromMilliseconds(int(self._leases.ttl * 1000))
        return lease_pb2.AcquireLeaseResponse(
            lease=lease.to_proto(), credentials=credentials, ttl=ttl
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
