"""Sessions outlive a controller outage of twice the default ``lease_ttl``.

The controller runs as `honeyfleet controller --config FILE` (a real process, default
timers: ``lease_ttl`` 120 s, heartbeats every 5 s) and is killed with SIGKILL while an
OpenSSH session and a Telnet session run through a real sensor and a real pool node
(static backend) to real guests (tests/sshd.py, tests/telnetd.py). It stays down for
2 x ``lease_ttl``, then starts again on the same port and state. The sessions must carry
on, their leases be renewed (not expired at the first tick after the restart, as they
were), no guest be released, and every event reach the store exactly once.

This test runs for about five minutes of real time (the default timers are the point);
it is marked ``long`` and stays in the normal suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from controller.config import ControllerConfig
from honeyfleet.pki.identity import Role
from honeyfleet.tls import secure_channel
from honeyfleet.v1 import fleet_pb2, fleet_pb2_grpc, lease_pb2
from sensor.config import SensorConfig
from sensor.service import Sensor
from tests.conftest import (
    FleetPki,
    bounded,
    free_port,
    require_tool,
    start_static_pool_node,
    until,
)
from tests.integration.ssh_fleet import SSH_OPTIONS, USERDB
from tests.integration.test_events_crash import (
    start_process,
    stop_process,
    wait_ingest_serving,
    write_config,
)
from tests.sshd import PASSWORD, Sshd
from tests.telnetd import Telnetd
from tests.terminal import Terminal

pytestmark = [pytest.mark.long, pytest.mark.timeout(900)]
LEASE_TTL = ControllerConfig().lease_ttl  # the default: what the README's promise is about
OUTAGE = 2 * LEASE_TTL
# A bound (not a measure) on how long the fleet takes to find the restarted controller:
# gRPC reconnects within 5 s and the sensor retries a failed renewal within 5 s.
RETURN_WAIT = 60.0


class Admin:
    """FleetService as an operator sees it (a new channel per call: the controller restarts)."""

    def __init__(self, fleet_pki: FleetPki, address: str) -> None:
        self._files = fleet_pki.files(Role.ADMIN, "ops")
        self._address = address

    async def leases(self) -> dict[str, lease_pb2.Lease]:
        """Every lease the controller knows, by id."""
        async with secure_channel(self._address, self._files) as channel:
            stub = fleet_pb2_grpc.FleetServiceStub(channel)
            reply = await stub.ListLeases(fleet_pb2.ListLeasesRequest(page_size=100), timeout=10)
        return {lease.id: lease for lease in reply.leases}


def expiry(lease: lease_pb2.Lease) -> float:
    """A lease's expiry in Unix seconds."""
    stamp: Timestamp = lease.expire_time
    return float(stamp.ToNanoseconds()) / 1e9


async def shell_runs(term: Terminal, tag: str) -> None:
    """The session's shell (on the guest) still runs commands: ``echo`` computes a mark."""
    term.send(f"echo {tag}-$((6*7))\r".encode())
    await term.expect(f"{tag}-42".encode(), timeout=30)


def stored_inputs(state: Path) -> list[tuple[str, str]]:
    """(hf_event_id, typed input) of every command the controller's store holds."""
    with contextlib.closing(sqlite3.connect(state / "events.sqlite3")) as db:
        rows = db.execute(
            "SELECT hf_event_id, json_extract(json, '$.input') FROM events "
            "WHERE eventid = 'cowrie.command.input'"
        ).fetchall()
    return [(str(a), str(b)) for a, b in rows]


@contextlib.asynccontextmanager
async def guests(tmp: Path, count: int) -> AsyncIterator[tuple[str, ...]]:
    """Static guests ("host:ssh_port:telnet_port"), each an Sshd and a Telnetd on loopback."""
    async with contextlib.AsyncExitStack() as stack:
        hosts = []
        for i in range(count):
            sshd, telnetd = Sshd(tmp / f"guest{i}"), Telnetd()
            ssh_port = await sshd.start()
            stack.push_async_callback(bounded, sshd.stop)
            telnet_port = await telnetd.start()
            stack.push_async_callback(bounded, telnetd.stop)
            hosts.append(f"127.0.0.1:{ssh_port}:{telnet_port}")
        yield tuple(hosts)


async def test_sessions_outlive_a_controller_outage_of_twice_the_lease_ttl(
    fleet_pki: FleetPki, tmp_path: Path
) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    config, log, state = tmp_path / "ctl.toml", tmp_path / "controller.log", tmp_path / "ctl"
    write_config(config, fleet_pki, port, state, {})
    admin = Admin(fleet_pki, address)
    proc = await start_process(config, log)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(lambda: stop_process(proc))
        await wait_ingest_serving(address, fleet_pki, log)
        hosts = await stack.enter_async_context(guests(tmp_path, 2))
        node = await start_static_pool_node(
            fleet_pki, "pool-1", address, hosts, tmp_path / "pool", backend_pass=PASSWORD
        )
        stack.push_async_callback(bounded, node.stop, grace=0)
        await until(lambda: node.pool.snapshot().guest_counts.pristine == 2, 120)

        tls = fleet_pki.files(Role.SENSOR, "sensor-1")
        (tmp_path / "userdb.txt").write_text(USERDB)
        sensor = Sensor(
            SensorConfig(
                controller=address,
                state_dir=tmp_path / "sensor",
                tls_ca=tls.ca,
                tls_cert=tls.cert,
                tls_key=tls.key,
                ssh_listen=("127.0.0.1:0",),
                telnet_listen=("127.0.0.1:0",),
                telnet_greeting=Telnetd().greeting,
                telnet_login_fail_delay=0.0,
                ssh_auth_fail_delay=0.0,
                userdb=tmp_path / "userdb.txt",
                json_log=tmp_path / "cowrie.json",
                per_source_penalties=False,
            )
        )
        ssh_port, *_ = await sensor.start()
        stack.push_async_callback(bounded, sensor.stop)

        # An OpenSSH session and a Telnet session from two addresses (a guest each),
        # logged into their guests' shells.
        term_ssh = await Terminal.spawn(
            require_tool("sshpass", "sshpass"), "-p", "toor",
            require_tool("ssh", "openssh-client"), "-tt", *SSH_OPTIONS, "-b", "127.0.0.2",
            "-p", str(ssh_port), "root@127.0.0.1",
        )  # fmt: skip
        stack.push_async_callback(term_ssh.close)
        await shell_runs(term_ssh, "ssh-before")
        term_telnet = await Terminal.spawn(
            require_tool("telnet", "telnet"),
            "-b",
            "127.0.0.3",
            "127.0.0.1",
            str(sensor.telnet_ports[0]),
        )
        stack.push_async_callback(term_telnet.close)
        await term_telnet.expect(rb"login: ")
        term_telnet.send(b"root\r")
        await term_telnet.expect(rb"Password: ")
        term_telnet.send(b"toor\r")
        await shell_runs(term_telnet, "telnet-before")

        before = await admin.leases()
        assert len(before) == 2
        assert {lease.state for lease in before.values()} == {lease_pb2.LEASE_STATE_ACTIVE}
        assert node.pool.snapshot().guest_counts.leased == 2

        # The outage: a crash, then twice the lease TTL without a controller.
        proc.send_signal(signal.SIGKILL)
        assert await proc.wait() == -signal.SIGKILL
        await asyncio.sleep(OUTAGE / 2)
        await shell_runs(term_ssh, "ssh-during")
        await shell_runs(term_telnet, "telnet-during")
        await asyncio.sleep(OUTAGE / 2)
        restarted = time.time()
        proc = await start_process(config, log)
        await wait_ingest_serving(address, fleet_pki, log)

        # Both leases are renewed after the restart, and none ended meanwhile.
        async def renewed() -> bool:
            leases = await admin.leases()
            return all(
                leases[i].state == lease_pb2.LEASE_STATE_ACTIVE
                and expiry(leases[i]) > restarted + LEASE_TTL
                for i in before
            )

        deadline = time.monotonic() + RETURN_WAIT
        while not await renewed():
            assert time.monotonic() < deadline, f"leases not renewed within {RETURN_WAIT}s"
            await asyncio.sleep(0.5)
        await asyncio.sleep(RETURN_WAIT / 4)  # the expiry job runs every 5 s: several passes
        after = await admin.leases()
        assert set(after) == set(before)
        for lease_id, lease in after.items():
            assert lease.state == lease_pb2.LEASE_STATE_ACTIVE, (lease_id, lease.end_reason)
            assert expiry(lease) > expiry(before[lease_id])
        # The node kept both guests for their leases.
        assert node.pool.snapshot().guest_counts.leased == 2
        assert all(node.pool.lease_sensor(i) == "sensor/sensor-1" for i in before)

        await shell_runs(term_ssh, "ssh-after")
        await shell_runs(term_telnet, "telnet-after")
        for term in (term_ssh, term_telnet):
            term.send(b"exit\r")
            await term.ended(timeout=30)

        # Every command typed before, during and after the outage is stored once.
        typed = {f"echo {t}-{w}-$((6*7))" for t in ("ssh", "telnet") for w in
                 ("before", "during", "after")} | {"exit"}  # fmt: skip
        await until(lambda: typed <= {i for _, i in stored_inputs(state)}, RETURN_WAIT)
        rows = stored_inputs(state)
        assert len(rows) == len({event_id for event_id, _ in rows})
        assert sorted(i for _, i in rows if i != "exit") == sorted(typed - {"exit"})
        await until(lambda: node.pool.snapshot().guest_counts.leased == 0, RETURN_WAIT)
        ended = await admin.leases()
        assert {ended[i].state for i in before} == {lease_pb2.LEASE_STATE_RELEASED}
