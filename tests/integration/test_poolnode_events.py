"""A pool node's own events: spooled, streamed to the controller, and stored on the
attacker's session of the lease they are about (real controller, real pool node, real
certificates on loopback).

The pool node may add events to the sessions of its own leases and to no other: the
controller takes an event's session, sensor and address from the lease it names, drops
an event that names another pool node or a lease not on the node, and stores an event
without a lease as the node's own (session and sensor "-").
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Any

from controller.server import Controller
from honeyfleet.events import make_event, new_session_id
from honeyfleet.pki.identity import Role
from honeyfleet.v1 import ingest_pb2
from tests.conftest import ControllerFactory, FleetPki, PoolNodeFactory, until
from tests.integration.leasing import Sensor, fleet_with_nodes
from tests.integration.test_events_ingest import SensorStream, batches


def stored(controller: Controller, **where: str) -> list[dict[str, Any]]:
    """Events in the controller's SQLite store, oldest first (filtered on columns)."""
    return stored_in(controller.config.state_dir / "events.sqlite3", **where)


def stored_in(path: Path, **where: str) -> list[dict[str, Any]]:
    """Events in a SQLite event store, oldest first (filtered on columns)."""
    if not path.exists():
        return []
    clause = " AND ".join(f"{column} = ?" for column in where) or "1"
    with contextlib.closing(sqlite3.connect(path)) as db:
        rows = db.execute(
            f"SELECT json FROM events WHERE {clause} ORDER BY seq",  # noqa: S608 (test's names)
            tuple(where.values()),
        ).fetchall()
    return [json.loads(text) for (text,) in rows]


async def test_node_events_are_stored_on_the_session_of_their_lease(
    start_controller: ControllerFactory, start_pool_node: PoolNodeFactory, fleet_pki: FleetPki
) -> None:
    controller, address, nodes = await fleet_with_nodes(
        start_controller, start_pool_node, {"pool-1": 1}
    )
    node = nodes["pool-1"]
    assert node.events is not None
    session = new_session_id()
    sensor = Sensor(fleet_pki, "edge1", address)
    lease = (await sensor.acquire("198.51.100.7", session)).lease

    node.events.emit(
        lease.guest,
        "cowrie.session.file_download",
        "Downloaded URL ({url}) with SHA-256 {shasum} to {outfile}",
        url="http://192.0.2.1/x.sh",
        shasum="ab" * 32,
        outfile="var/lib/x",
    )
    node.events.emit(None, "honeyfleet.test.node", "About the node itself")
    await until(lambda: len(stored(controller, eventid="cowrie.session.file_download")) == 1)
    download = stored(controller, eventid="cowrie.session.file_download")[0]
    assert {k: download[k] for k in ("session", "src_ip", "sensor", "protocol")} == {
        "session": session,
        "src_ip": "198.51.100.7",
        "sensor": "edge1",
        "protocol": "ssh",
    }
    assert (download["lease"], download["guest"], download["pool_node"]) == (
        lease.id,
        lease.guest,
        "pool-1",
    )
    assert download["message"] == (
        f"Downloaded URL (http://192.0.2.1/x.sh) with SHA-256 {'ab' * 32} to var/lib/x"
    )
    await until(lambda: len(stored(controller, eventid="honeyfleet.test.node")) == 1)
    own = stored(controller, eventid="honeyfleet.test.node")[0]
    assert (own["session"], own["sensor"], own["pool_node"]) == ("-", "-", "pool-1")
    assert "lease" not in own
    metrics = node.pool.metrics.registry
    await until(lambda: metrics.get_sample_value("honeyfleet_poolnode_spool_events") == 0)
    assert metrics.get_sample_value("honeyfleet_poolnode_spool_near_full") == 0

    # The lease ends: the node says so on the session, and a destroyed guest's end too.
    await sensor.release(lease.id)
    await until(lambda: len(stored(controller, session=session)) == 2)
    released = stored(controller, session=session)[1]
    assert released["eventid"] == "honeyfleet.guest.released"
    assert released["lease"] == lease.id
    await sensor.channel.close()


def node_event(session: str, **fields: Any) -> dict[str, Any]:
    """An event as a pool node could write it (any claims the test likes)."""
    claims = {"sensor": "edge1", "src_ip": "203.0.113.9", "protocol": "ssh", **fields}
    return make_event(
        "honeyfleet.test.claim",
        "a claim",
        session=session,
        sensor_uuid="node-uuid",
        **claims,
    )


async def test_a_pool_node_writes_only_on_its_own_leases_sessions(
    start_controller: ControllerFactory, start_pool_node: PoolNodeFactory, fleet_pki: FleetPki
) -> None:
    controller, address, _ = await fleet_with_nodes(
        start_controller, start_pool_node, {"pool-1": 1, "pool-2": 1}
    )
    sensor = Sensor(fleet_pki, "edge1", address)
    ours = (await sensor.acquire("198.51.100.1", "s-ours")).lease
    other_session = "s-other"
    theirs = (await sensor.acquire("198.51.100.2", other_session)).lease
    if ours.pool_node != "pool-1":
        ours, theirs = theirs, ours
    assert (ours.pool_node, theirs.pool_node) == ("pool-1", "pool-2")

    events = [
        # Posing as pool-2 on pool-2's lease: dropped.
        node_event(theirs.session, lease=theirs.id, pool_node="pool-2", guest=theirs.guest),
        # Its own name on pool-2's lease: dropped.
        node_event(theirs.session, lease=theirs.id, pool_node="pool-1", guest=theirs.guest),
        # A lease never issued: dropped.
        node_event("s-made-up", lease="not-a-lease", pool_node="pool-1"),
        # Its own lease, claiming another session, sensor and address: stored on its own.
        node_event(other_session, lease=ours.id, pool_node="pool-1", sensor="edge9", guest="g-x"),
        # No lease, claiming a sensor's session: stored as the node's own.
        node_event(other_session, pool_node="pool-1"),
    ]
    stream = SensorStream(fleet_pki, "pool-1", address, role=Role.POOLNODE)
    try:
        ack: ingest_pb2.StreamEventsResponse = await stream.send(batches(events)[0])
    finally:
        await stream.close()
    assert ack.stored == 2
    rejected = controller.events.metrics_registry.get_sample_value(
        "honeyfleet_events_rejected_total", {"stage": "origin"}
    )
    assert rejected == 3
    assert stored(controller, session=other_session) == []
    placed = stored(controller, eventid="honeyfleet.test.claim")
    assert [(e["session"], e["sensor"], e["src_ip"], e["pool_node"]) for e in placed] == [
        (ours.session, "edge1", "198.51.100.1", "pool-1"),
        ("-", "-", "203.0.113.9", "pool-1"),
    ]
    assert placed[0]["guest"] == ours.guest
    await sensor.channel.close()
