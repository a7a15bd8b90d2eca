"""PoolNodeRegistryService: pool nodes register and heartbeat."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from google.protobuf.duration_pb2 import Duration

from controller.leases import LeaseManager
from controller.nodeclient import NodeClients
from controller.registry import Registry
from honeyfleet.authz import current_caller
from honeyfleet.v1 import poolnode_pb2, registry_pb2, registry_pb2_grpc


@dataclass(frozen=True)
class _Arrival:
    """A heartbeat and when it arrived (monotonic); no request: the stream ended."""

    request: registry_pb2.HeartbeatRequest | None
    received: float


async def _read(
    requests: AsyncIterator[registry_pb2.HeartbeatRequest],
    inbox: asyncio.Queue[_Arrival | None],
    heard: Callable[[float], None],
    answered: Callable[[Iterable[registry_pb2.AllocationAnswer]], None],
) -> None:
    """Hand the node's heartbeats to the stream's handler as they arrive, then its end.

    Each message shows the node alive (``heard``) here, as it arrives: the handler may
    be held up sending to a slow node, and that must not let a heartbeating node die.
    Allocation answers are handed on here too (``answered``), so a message with
    nothing else (answers_only, one per allocation) never wakes the handler.
    """
    try:
        async for request in requests:
            received = time.monotonic()
            heard(received)
            if request.allocations:
                answered(request.allocations)
            if not request.answers_only:
                inbox.put_nowait(_Arrival(request, received))
    finally:
        inbox.put_nowait(_Arrival(None, time.monotonic()))


class PoolNodeRegistryServicer(registry_pb2_grpc.PoolNodeRegistryServiceServicer):
    """Serves pool nodes; each acts only as the node named in its certificate."""

    def __init__(
        self,
        registry: Registry,
        leases: LeaseManager,
        nodes: NodeClients,
        *,
        heartbeat_interval: float,
        revoked_serials: Callable[[], frozenset[int]],
    ) -> None:
        self._registry = registry
        self._leases = leases
        self._nodes = nodes
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
        """Answer each heartbeat with revocations, drain state, stale and ended leases
        (an early one only when there is something besides ends to tell); between
        heartbeats, send
        allocations (to nodes that take them here) as soon as they are asked, and leases
        that ended with them or shortly after they end.

        The arrival time is taken first thing, before any other work; leases are
        compared only when a new table was applied, and only with this node's.
        """
        name = current_caller().identity.name
        inbox: asyncio.Queue[_Arrival | None] = asyncio.Queue()
        reader = asyncio.create_task(
            _read(
                request_iterator,
                inbox,
                functools.partial(self._registry.heard_from, name),
                functools.partial(self._nodes.answered, name),
            )
        )
        node = self._registry.nodes.get(name)
        streams = node is not None and node.stream_allocations
        try:
            with contextlib.ExitStack() as attached:

                def wake() -> None:
                    inbox.put_nowait(None)

                attached.enter_context(self._leases.listen(name, wake))
                if streams:
                    attached.enter_context(self._nodes.stream(name, wake))
                while True:
                    arrival = await inbox.get()
                    if arrival is None:
                        ended = self._leases.take_ended(name)
                        allocate = self._nodes.take_requests(name)
                        if ended or allocate:
                            yield self._response(name, ended=ended, allocate=allocate, between=True)
                        continue
                    request = arrival.request
                    if request is None:
                        break
                    node, applied = self._registry.heartbeat(name, request, arrival.received)
                    stale = self._leases.reconcile(node) if applied else []
                    allocate = self._nodes.take_requests(name)
                    if request.early and not (stale or allocate or node.wants_table):
                        # A nudge: nothing urgent to tell, and no reply is waited for.
                        # Ends wait for a message that goes anyway, or their linger.
                        continue
                    ended = self._leases.take_ended(name)
                    yield self._response(
                        name, stale=stale, ended=ended, allocate=allocate, between=request.early
                    )
        finally:
            reader.cancel()
        await reader  # re-raises what ended the node's side of the stream

    def _response(
        self,
        name: str,
        *,
        stale: list[str] | None = None,
        ended: list[registry_pb2.EndedLease],
        allocate: list[poolnode_pb2.AllocateGuestRequest] | None = None,
        between: bool = False,
    ) -> registry_pb2.HeartbeatResponse:
        """Every message carries the whole of the node's instructions."""
        node = self._registry.nodes.get(name)
        return registry_pb2.HeartbeatResponse(
            revoked_serials=self._revoked_serials(),
            draining=node is not None and node.draining,
            stale_lease_ids=stale,
            ended_leases=ended,
            between_heartbeats=between,
            allocate=allocate,
            send_table=node is not None and node.wants_table,
        )

    def _revoked_serials(self) -> list[str]:
        """Revoked serials in lower-case hex (formatted once per change of the list)."""
        revoked = self._revoked()
        if revoked is not self._revoked_seen:
            self._revoked_seen = revoked
            self._revoked_hex = [f"{s:x}" for s in sorted(revoked)]
        return self._revoked_hex
