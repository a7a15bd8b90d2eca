"""A pool node's events reach the store exactly once across restarts of the node and of
the controller: both run as real processes (`honeyfleet controller|poolnode --config`),
with real certificates on loopback.

The node's guest is an SSH server of the test (static backend) the node logs into. An
attacker's lease is released while all is up (``honeyfleet.guest.released`` is delivered);
then the controller is killed with SIGKILL and the guest stops answering, so the node
destroys it and spools ``honeyfleet.guest.destroyed`` with no controller to take it. The
node is stopped and started again (the event waits in its spool), then the controller is
started again: the event arrives, on the attacker's session, and every event of the
session is stored once.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
from collections.abc import Callable
from pathlib import Path

import grpc

from honeyfleet.pki.identity import Role
from tests.conftest import FleetPki, free_port
from tests.integration.leasing import Sensor
from tests.integration.test_events_crash import (
    start_process,
    stop_process,
    wait_ingest_serving,
    write_config,
)
from tests.integration.test_fleet_tools import BIN
from tests.integration.test_poolnode_events import stored_in
from tests.sshd import Sshd

POLL = 0.2
WAIT = 60.0  # seconds any one step may take on a loaded machine


def write_node_config(
    path: Path, fleet_pki: FleetPki, controller: str, guest: str, state: Path
) -> None:
    """A static pool node "pool-1" with one guest, checked often."""
    tls = fleet_pki.files(Role.POOLNODE, "pool-1")
    lines = [
        "[poolnode]",
        f'controller = "{controller}"',
        f'listen = "127.0.0.1:{free_port()}"',
        f'state_dir = "{state}"',
        f'tls_ca = "{tls.ca}"',
        f'tls_cert = "{tls.cert}"',
        f'tls_key = "{tls.key}"',
        'backend = "static"',
        f'static_hosts = ["{guest}"]',
        "max_vms = 1",
        "health_interval = 0.5",
        'backend_pass = "guest-secret"',
        "upload_linger = 0.0",
    ]
    path.write_text("\n".join(lines) + "\n")


async def start_node(config: Path, log: Path) -> asyncio.subprocess.Process:
    """Start `honeyfleet poolnode` with its output appended to ``log``."""
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            str(BIN / "honeyfleet"), "poolnode", "--config", str(config), stdout=out, stderr=out
        )


def spooled(state: Path) -> int:
    """Events waiting in the node's spool (read from another process, as its files are)."""
    path = state / "spool.sqlite3"
    if not path.exists():
        return 0
    with contextlib.closing(sqlite3.connect(path)) as db:
        return int(db.execute("SELECT count(*) FROM events").fetchone()[0])


async def eventually(check: Callable[[], bool], what: str, logs: list[Path]) -> None:
    """Poll ``check()`` until true, at most WAIT seconds; fail with the processes' logs."""
    deadline = asyncio.get_running_loop().time() + WAIT
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            text = "\n".join(f"--- {log.name}\n{log.read_text()[-4000:]}" for log in logs)
            raise AssertionError(f"never: {what}\n{text}")
        await asyncio.sleep(POLL)


async def test_node_events_reach_the_store_once_across_node_and_controller_restarts(
    fleet_pki: FleetPki, tmp_path: Path
) -> None:
    guest = Sshd(tmp_path / "guest")
    guest_address = f"127.0.0.1:{await guest.start()}"
    port = free_port()
    address = f"127.0.0.1:{port}"
    ctl_config, ctl_log, ctl_state = tmp_path / "ctl.toml", tmp_path / "ctl.log", tmp_path / "ctl"
    node_config, node_log, node_state = (
        tmp_path / "node.toml",
        tmp_path / "node.log",
        tmp_path / "n",
    )
    logs = [ctl_log, node_log]
    write_config(ctl_config, fleet_pki, port, ctl_state, {"store": "sqlite"})
    write_node_config(node_config, fleet_pki, address, guest_address, node_state)
    events = ctl_state / "events.sqlite3"
    processes: list[asyncio.subprocess.Process] = []
    sensor = Sensor(fleet_pki, "edge1", address)
    try:
        processes.append(await start_process(ctl_config, ctl_log))
        await wait_ingest_serving(address, fleet_pki, ctl_log)
        processes.append(await start_node(node_config, node_log))

        lease = None
        deadline = asyncio.get_running_loop().time() + WAIT
        while lease is None:
            try:
                lease = (await sensor.acquire("198.51.100.7", "s-restarts", timeout=5)).lease
            except grpc.aio.AioRpcError:
                assert asyncio.get_running_loop().time() < deadline, node_log.read_text()
                await asyncio.sleep(POLL)
        await sensor.release(lease.id)
        await eventually(
            lambda: len(stored_in(events, session="s-restarts")) == 1, "released stored", logs
        )

        # The controller dies; the guest stops answering, so the node destroys it.
        processes[0].send_signal(signal.SIGKILL)
        await processes[0].wait()
        await guest.stop()
        await eventually(lambda: spooled(node_state) == 1, "destroyed spooled", logs)

        # The node restarts with the event in its spool, then the controller comes back.
        await stop_process(processes[1])
        assert spooled(node_state) == 1
        processes[1] = await start_node(node_config, node_log)
        processes[0] = await start_process(ctl_config, ctl_log)
        await eventually(lambda: spooled(node_state) == 0, "spool delivered", logs)
    finally:
        for process in processes:
            await stop_process(process)
        await guest.stop()
        await sensor.channel.close()

    session = stored_in(events, session="s-restarts")
    assert [e["eventid"] for e in session] == [
        "honeyfleet.guest.released",
        "honeyfleet.guest.destroyed",
    ]
    for event in session:
        assert (event["sensor"], event["src_ip"], event["protocol"]) == (
            "edge1",
            "198.51.100.7",
            "ssh",
        )
        assert (event["lease"], event["guest"], event["pool_node"]) == (
            lease.id,
            lease.guest,
            "pool-1",
        )
    assert "SSH login was lost" in session[1]["reason"]
    # One instance identity across the node's restart; each event stored once.
    assert session[0]["uuid"] == session[1]["uuid"]
    with contextlib.closing(sqlite3.connect(events)) as db:
        rows, distinct = db.execute(
            "SELECT count(*), count(DISTINCT hf_event_id) FROM events"
        ).fetchone()
    assert rows == distinct == 2
