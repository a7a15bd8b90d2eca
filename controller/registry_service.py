"""PoolNodeRegistryService: pool nodes register and heartbeat."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from google.protobuf.duration_pb2 import Duration

from controller.leases import LeaseManager
from controller.registry import Registry
from honeyfleet.authz import current_caller
from honeyfleet.v1 import registry_pb2, registry_pb2_grpc


class PoolNodeRegistryServicer(registry_pb2_grpc.PoolNodeRegistryServiceServicer):
    """Serves pool nodes; each acts only as the node named in its certificate."""

    def __init__(
        self,
        registry: Registry,
        leases: LeaseManager,
        *,
        heartbeat_interval: float,
        revoked_serials: Callable[[], frozenset[int]],
    ) -> None:
        self._registry = registry
        self._leases = leases
        self._interval = heartbeat_interval
        self._revoked = revoked_serials
        # The revocation list as sent, rebuilt only when the list changes.
        self._revoked_seen: frozenset[int] = frozenset()
        self._revoked_hex: list[str] = []

    async def RegisterPoolNode(
        self, request: registry_pb2.RegisterPoolNodeRequest, context: Any
    ) -> registry_pb2.RegisterPoolNodeResponse:
        """Record the calling node."""
        node = await self._registry.register_node(current_caller().identity.name, request)
        interval = Duration()
        interval.FromMilliseconds(int(self._interval * 1000))
        return registry_pb2.RegisterPoolNodeResponse(
            heartbeat_interval=interval, draining=node.draining
        )

    async def Heartbeat(
        self, request_iterator: AsyncIterator[registry_pb2.HeartbeatRequest], context: Any
    ) -> AsyncIterator[registry_pb2.HeartbeatResponse]:
        """Take heartbeats and answer each with revocations, drain state and stale leases.

        The arrival time is taken first thing, before any other work; leases are
        compared only when a new table was applied, and only with this node's.
        """
        name = current_caller().identity.name
        async for request in request_iterator:
            received = time.monotonic()
            node, applied = self._registry.heartbeat(name, request, received)
            stale = self._leases.reconcile(node) if applied else []
            yield registry_pb2.HeartbeatResponse(
                revoked_serials=self._revoked_serials(),
                draining=node.draining,
                stale_lease_ids=stale,
            )

    def _revoked_serials(self) -> list[str]:
        """Revoked serials in lower-case hex (formatted once per change of the list)."""
        revoked = self._revoked()
        if revoked is not self._revoked_seen:
            self._revoked_seen = revoked
            self._revoked_hex = [f"{s:x}" for s in sorted(revoked)]
        return self._revoked_hex
