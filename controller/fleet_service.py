"""FleetService: the operators' read and drain API."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from controller.leases import LeaseManager
from controller.models import LeaseState, NodeState
from controller.paging import decode_token, encode_token, page_size
from controller.registry import Registry
from controller.statestore import StateStore
from honeyfleet.errors import InvalidArgument
from honeyfleet.v1 import common_pb2, fleet_pb2, fleet_pb2_grpc, lease_pb2

T = TypeVar("T")


def _page(
    items: Sequence[T], key: Callable[[T], str], kind: str, request: Any
) -> tuple[list[T], str]:
    """One page of ``items`` (sorted by ``key``) after the request's page token."""
    size = page_size(request.page_size)
    after = decode_token(kind, request.page_token)
    ordered = sorted(items, key=key)
    if after is not None:
        ordered = [item for item in ordered if key(item) > after]
    page = ordered[:size]
    token = encode_token(kind, key(page[-1])) if len(ordered) > size else ""
    return page, token


class FleetServicer(fleet_pb2_grpc.FleetServiceServicer):
    """Fleet state for admins."""

    def __init__(self, registry: Registry, leases: LeaseManager, store: StateStore) -> None:
        self._registry = registry
        self._leases = leases
        self._store = store

    def _node_proto(self, name: str) -> fleet_pb2.PoolNode:
        return self._registry.get_node(name).to_proto(self._leases.count_by("pool_node")[name])

    async def ListPoolNodes(
        self, request: fleet_pb2.ListPoolNodesRequest, context: Any
    ) -> fleet_pb2.ListPoolNodesResponse:
        """Pool nodes by name, optionally only those in one state."""
        nodes = [
            n
            for n in self._registry.nodes.values()
            if request.state == fleet_pb2.POOL_NODE_STATE_UNSPECIFIED
            or n.state.value == request.state
        ]
        page, token = _page(nodes, lambda n: n.name, "nodes", request)
        counts = self._leases.count_by("pool_node")
        return fleet_pb2.ListPoolNodesResponse(
            pool_nodes=[n.to_proto(counts[n.name]) for n in page], next_page_token=token
        )

    async def GetPoolNode(
        self, request: fleet_pb2.GetPoolNodeRequest, context: Any
    ) -> fleet_pb2.GetPoolNodeResponse:
        """One pool node."""
        return fleet_pb2.GetPoolNodeResponse(pool_node=self._node_proto(request.name))

    async def DrainPoolNode(
        self, request: fleet_pb2.DrainPoolNodeRequest, context: Any
    ) -> fleet_pb2.DrainPoolNodeResponse:
        """Stop new leases on a node."""
        await self._registry.set_draining(request.name, True)
        return fleet_pb2.DrainPoolNodeResponse(pool_node=self._node_proto(request.name))

    async def ResumePoolNode(
        self, request: fleet_pb2.ResumePoolNodeRequest, context: Any
    ) -> fleet_pb2.ResumePoolNodeResponse:
        """Let a drained node take leases again."""
        await self._registry.set_draining(request.name, False)
        return fleet_pb2.ResumePoolNodeResponse(pool_node=self._node_proto(request.name))

    async def RemovePoolNode(
        self, request: fleet_pb2.RemovePoolNodeRequest, context: Any
    ) -> fleet_pb2.RemovePoolNodeResponse:
        """Forget a dead node; leases it still had fail."""
        removed = self._node_proto(request.name)
        await self._registry.remove_node(request.name)
        self._leases.fail_node(request.name, "pool node removed by an operator")
        return fleet_pb2.RemovePoolNodeResponse(pool_node=removed)

    async def ListSensors(
        self, request: fleet_pb2.ListSensorsRequest, context: Any
    ) -> fleet_pb2.ListSensorsResponse:
        """Sensors by name."""
        page, token = _page(
            list(self._registry.sensors.values()), lambda s: s.name, "sensors", request
        )
        counts = self._leases.count_by("sensor")
        return fleet_pb2.ListSensorsResponse(
            sensors=[s.to_proto(counts[f"sensor/{s.name}"]) for s in page],
            next_page_token=token,
        )

    async def ListLeases(
        self, request: fleet_pb2.ListLeasesRequest, context: Any
    ) -> fleet_pb2.ListLeasesResponse:
        """Leases newest first, filtered by node, sensor, address and state."""
        size = page_size(request.page_size)
        position = decode_token("leases", request.page_token)
        try:
            before = int(position) if position is not None else None
        except ValueError:
            raise InvalidArgument("page_token is malformed") from None
        filters: dict[str, Any] = {}
        if request.pool_node:
            filters["pool_node"] = request.pool_node
        if request.sensor:
            # Accept both "edge1" and "sensor/edge1".
            filters["sensor"] = (
                request.sensor if "/" in request.sensor else f"sensor/{request.sensor}"
            )
        if request.src_ip:
            filters["src_ip"] = request.src_ip
        if request.state != lease_pb2.LEASE_STATE_UNSPECIFIED:
            try:
                filters["state"] = LeaseState(request.state).value
            except ValueError:
                raise InvalidArgument(
                    f"state {request.state} is not a LeaseState (LEASE_STATE_ACTIVE, ...)"
                ) from None
        rows = await self._store.list_leases(before_seq=before, limit=size + 1, filters=filters)
        token = encode_token("leases", str(rows[size - 1][0])) if len(rows) > size else ""
        return fleet_pb2.ListLeasesResponse(
            leases=[lease.to_proto() for _, lease in rows[:size]], next_page_token=token
        )

    async def ListGuests(
        self, request: fleet_pb2.ListGuestsRequest, context: Any
    ) -> fleet_pb2.ListGuestsResponse:
        """Guests of live nodes, as of their last heartbeat."""
        guests = [
            g
            for node in self._registry.nodes.values()
            if node.state is NodeState.ALIVE
            and (not request.pool_node or node.name == request.pool_node)
            for g in node.guests
            if (request.state == common_pb2.GUEST_STATE_UNSPECIFIED or g.state == request.state)
            and (not request.src_ip or request.src_ip in g.src_ips)
        ]
        page, token = _page(guests, lambda g: f"{g.pool_node}/{g.id}", "guests", request)
        return fleet_pb2.ListGuestsResponse(guests=page, next_page_token=token)

    async def GetFleetStats(
        self, request: fleet_pb2.GetFleetStatsRequest, context: Any
    ) -> fleet_pb2.GetFleetStatsResponse:
        """Fleet-wide counts."""
        nodes = list(self._registry.nodes.values())
        alive = [n for n in nodes if n.state is NodeState.ALIVE]
        counts = common_pb2.GuestCounts()
        for node in alive:
            counts.booting += node.counts.booting
            counts.pristine += node.counts.pristine
            counts.leased += node.counts.leased
            counts.idle += node.counts.idle
        persisted = await self._store.counters()
        return fleet_pb2.GetFleetStatsResponse(
            pool_nodes_alive=len(alive),
            pool_nodes_dead=len(nodes) - len(alive),
            pool_nodes_draining=sum(n.draining for n in nodes),
            sensors=len(self._registry.sensors),
            guest_counts=counts,
            capacity=sum(n.capacity for n in alive),
            active_leases=len(self._leases.active),
            leases_issued=persisted.get("leases_issued", 0),
            leases_refused=persisted.get("leases_refused", 0),
        )
