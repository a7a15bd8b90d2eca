"""`honeyfleet status`: the fleet API as readable tables (or JSON)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.table import Table

from honeyfleet.errors import RPCError
from honeyfleet.termtext import cell
from honeyfleet.tls import TlsFiles, secure_channel
from honeyfleet.v1 import common_pb2, fleet_pb2, fleet_pb2_grpc, lease_pb2

CALL_TIMEOUT = 10.0


async def _all_pages(
    call: Callable[..., Awaitable[Any]], request: Any, field: str
) -> AsyncIterator[Any]:
    """Every item of a paged List RPC (each page bounded in time, like the stats call)."""
    while True:
        response = await call(request, timeout=CALL_TIMEOUT)
        for item in getattr(response, field):
            yield item
        if not response.next_page_token:
            return
        request.page_token = response.next_page_token


async def fetch(controller: str, tls: TlsFiles) -> dict[str, Any]:
    """Nodes, sensors, active leases and stats from the controller."""
    async with secure_channel(controller, tls) as channel:
        stub = fleet_pb2_grpc.FleetServiceStub(channel)
        try:
            return {
                "pool_nodes": [
                    n
                    async for n in _all_pages(
                        stub.ListPoolNodes, fleet_pb2.ListPoolNodesRequest(), "pool_nodes"
                    )
                ],
                "sensors": [
                    s
                    async for s in _all_pages(
                        stub.ListSensors, fleet_pb2.ListSensorsRequest(), "sensors"
                    )
                ],
                "leases": [
                    le
                    async for le in _all_pages(
                        stub.ListLeases,
                        fleet_pb2.ListLeasesRequest(state=lease_pb2.LEASE_STATE_ACTIVE),
                        "leases",
                    )
                ],
                "stats": await stub.GetFleetStats(
                    fleet_pb2.GetFleetStatsRequest(), timeout=CALL_TIMEOUT
                ),
            }
        except grpc.aio.AioRpcError as e:
            raise RPCError.wrap("FleetService", e) from None


def _ago(ts: Timestamp) -> str:
    """A timestamp as 'Ns ago' ('-' when unset)."""
    if not ts.seconds and not ts.nanos:
        return "-"
    seconds = (datetime.now(UTC) - ts.ToDatetime(tzinfo=UTC)).total_seconds()
    return f"{seconds:.0f}s ago"


def _counts(c: common_pb2.GuestCounts) -> str:
    return f"{c.booting}/{c.pristine}/{c.leased}/{c.idle}"


def render(state: dict[str, Any], console: Console) -> None:
    """Print the fleet state as tables."""
    nodes = Table(title="Pool nodes", title_justify="left")
    for col in (
        "name",
        "address",
        "state",
        "capacity",
        "boot/pristine/leased/idle",
        "leases",
        "labels",
        "heartbeat",
    ):
        nodes.add_column(col)
    for n in state["pool_nodes"]:
        status = fleet_pb2.PoolNodeState.Name(n.state).removeprefix("POOL_NODE_STATE_").lower()
        nodes.add_row(
            cell(n.name),
            cell(n.address),
            status + (" (draining)" if n.draining else ""),
            str(n.capacity),
            _counts(n.guest_counts),
            str(n.active_leases),
            cell(",".join(f"{k}={v}" for k, v in sorted(n.labels.items()))),
            _ago(n.last_heartbeat_time),
        )
    console.print(nodes)
    sensors = Table(title="Sensors", title_justify="left")
    for col in ("name", "version", "listening", "leases", "last seen"):
        sensors.add_column(col)
    for s in state["sensors"]:
        sensors.add_row(
            cell(s.name),
            cell(s.version),
            cell(" ".join(s.listen_addresses)),
            str(s.active_leases),
            _ago(s.last_seen_time),
        )
    console.print(sensors)
    leases = Table(title="Active leases", title_justify="left")
    for col in ("lease", "sensor", "src_ip", "protocol", "node/guest", "session", "expires"):
        leases.add_column(col)
    for le in state["leases"]:
        proto = common_pb2.Protocol.Name(le.protocol).removeprefix("PROTOCOL_").lower()
        leases.add_row(
            cell(le.id[:12]),
            cell(le.sensor),
            cell(le.src_ip),
            proto,
            cell(f"{le.pool_node}/{le.guest}"),
            cell(le.session),
            le.expire_time.ToDatetime(tzinfo=UTC).strftime("%H:%M:%S"),
        )
    console.print(leases)
    st = state["stats"]
    console.print(
        f"nodes alive {st.pool_nodes_alive}, dead {st.pool_nodes_dead}, draining "
        f"{st.pool_nodes_draining} | guests {_counts(st.guest_counts)} of {st.capacity} | "
        f"leases active {st.active_leases}, issued {st.leases_issued}, refused {st.leases_refused}"
    )


def to_json(state: dict[str, Any]) -> str:
    """The fleet state as JSON (proto3 JSON mapping)."""
    out = {
        key: [MessageToDict(m) for m in value] if isinstance(value, list) else MessageToDict(value)
        for key, value in state.items()
    }
    return json.dumps(out, indent=2)
