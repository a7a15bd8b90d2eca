"""The real controller stopped while sessions run and started again: every event the sensor
wrote reaches the controller's event store, each exactly once."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tests.conftest import ControllerFactory, until
from tests.integration.ssh_fleet import FleetFactory, connect, ssh


def stored_uuids(state_dir: Path, sensor: str) -> list[str]:
    """Every event uuid of one sensor in a controller's SQLite event store."""
    with sqlite3.connect(state_dir / "events.sqlite3") as db:
        rows = db.execute("SELECT hf_event_id FROM events WHERE sensor = ?", (sensor,))
        return [row[0] for row in rows]


async def test_controller_outage_loses_no_event_and_stores_each_once(
    make_fleet: FleetFactory, start_controller: ControllerFactory, tmp_path: Path
) -> None:
    fleet = await make_fleet()
    spool = fleet.sensor.spool
    assert spool is not None
    session = await connect(fleet)
    await session.run("echo before", check=True)
    await until(lambda: spool.count == 0)  # delivered so far
    port = fleet.address.rsplit(":", 1)[1]
    await fleet.controller.stop(grace=0)

    # While the controller is away the session goes on, and a new attacker logs in but
    # gets no guest: every one of these events waits in the spool.
    for n in range(3):
        result = await session.run(f"echo during {n}", check=True)
        assert result.stdout == f"during {n}\n"
    code, _, _ = await ssh(fleet, "true", source="127.0.0.2")
    assert code == 255
    await until(lambda: bool(fleet.events("honeyfleet.lease.failed")))
    await spool.flush()
    assert spool.count > 0

    await start_controller(listen=f"127.0.0.1:{port}")
    result = await session.run("echo after", check=True)
    assert result.stdout == "after\n"
    session.close()
    await session.wait_closed()
    await until(lambda: len(fleet.closed_reasons()) == 2)
    await until(lambda: spool.count == 0, timeout=60)

    sent = [e["hf_event_id"] for e in fleet.events()]
    stored = stored_uuids(tmp_path / "controller", "sensor-1")
    assert len(stored) == len(set(stored)) == len(sent)
    assert set(stored) == set(sent)
    assert {e["input"] for e in fleet.events("cowrie.command.input")} >= {
        "echo during 0",
        "echo after",
    }


async def test_a_lease_whose_session_ended_in_an_outage_is_released_afterwards(
    make_fleet: FleetFactory, start_controller: ControllerFactory
) -> None:
    fleet = await make_fleet()
    session = await connect(fleet)
    await session.run("echo hello", check=True)
    # Events reach the local file once committed, not when the command has run.
    await until(lambda: bool(fleet.events("cowrie.command.input")))
    (typed,) = fleet.events("cowrie.command.input")
    port = fleet.address.rsplit(":", 1)[1]
    await fleet.controller.stop(grace=0)
    session.close()
    await session.wait_closed()
    await until(lambda: bool(fleet.closed_reasons()))

    # Back within the lease's TTL: the sensor's retried release lands, so the lease
    # ends as released with the session's reason, not as expired.
    restarted, _ = await start_controller(listen=f"127.0.0.1:{port}")
    await until(lambda: typed["lease"] not in restarted.leases.active, timeout=30)
    lease = await restarted.store.get_lease(typed["lease"])
    assert lease is not None
    assert (lease.state.name, lease.end_reason) == ("RELEASED", fleet.closed_reasons()[0])
