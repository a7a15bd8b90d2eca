"""An SSH sensor fleet on loopback for the ``test_sensor_*`` modules: a real controller, a real
pool node (static backend, real TunnelService) whose one guest is a real SSH server
(tests/sshd.py), a sensor, and OpenSSH and asyncssh clients to drive it.

Every client is started with ``asyncio.create_subprocess_exec`` (no ``preexec_fn``: a
Python-level fork would run in a child of a process that has gRPC threads), and every
teardown step is bounded in time so a stuck step fails the test instead of hanging the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import asyncssh

from controller.server import Controller
from honeyfleet.pki.identity import Role
from poolnode.server import PoolNode
from sensor.config import SensorConfig
from sensor.service import Sensor
from tests.conftest import (
    ControllerFactory,
    FleetPki,
    bounded,
    require_tool,
    start_one_guest_node,
)
from tests.sshd import PASSWORD, Sshd

USERDB = "root:x:!root\nroot:x:*\nadmin:x:!*\nadmin:x:admin\n"


@dataclass
class Fleet:
    """A controller, a pool node whose one guest is an Sshd, and a sensor."""

    controller: Controller
    address: str
    node: PoolNode
    guest: Sshd
    sensor: Sensor
    port: int
    json_log: Path
    state_dir: Path
    teardown: contextlib.AsyncExitStack = field(repr=False)

    def events(self, eventid: str | None = None) -> list[dict[str, Any]]:
        """Events the sensor wrote to its JSON lines file."""
        if not self.json_log.exists():
            return []
        lines = [json.loads(line) for line in self.json_log.read_text().splitlines()]
        return [e for e in lines if eventid is None or e["eventid"] == eventid]

    def closed_reasons(self) -> list[str]:
        """The reason of every ``cowrie.session.closed`` so far."""
        return [e["reason"] for e in self.events("cowrie.session.closed")]

    def connections(self) -> int:
        """Connections the sensor still counts (a slot goes back the moment its
        connection ends, before the session's last events are written)."""
        assert self.sensor.admission is not None
        return len(self.sensor.admission.connections)

    def guest_pristine(self) -> bool:
        """Whether the pool's only guest was never leased."""
        return self.node.pool.snapshot().guest_counts.pristine == 1

    async def stop(self) -> None:
        """Stop sensor, pool node and guest: every step runs, each bounded in time."""
        await self.teardown.aclose()


async def start_fleet(
    fleet_pki: FleetPki,
    start_controller: ControllerFactory,
    tmp: Path,
    *,
    guest_sftp_server: str | None = None,
    **sensor: Any,
) -> Fleet:
    """Everything on loopback; the caller stops it with ``Fleet.stop`` (the controller stops
    with its fixture). A start that fails half-way stops what it had started.
    ``guest_sftp_server``: the guest runs this program (OpenSSH's) for sftp."""
    async with contextlib.AsyncExitStack() as teardown:
        guest = Sshd(tmp / "guest-home", sftp_server=guest_sftp_server)
        guest_port = await guest.start()
        teardown.push_async_callback(bounded, guest.stop)
        ctl, address = await start_controller()
        node = await start_one_guest_node(
            fleet_pki, ctl, address, f"127.0.0.1:{guest_port}", tmp / "pool", backend_pass=PASSWORD
        )
        teardown.push_async_callback(bounded, node.stop, grace=0)
        tls = fleet_pki.files(Role.SENSOR, "sensor-1")
        (tmp / "userdb.txt").write_text(USERDB)
        config = SensorConfig(
            controller=address,
            state_dir=tmp / "sensor",
            tls_ca=tls.ca,
            tls_cert=tls.cert,
            tls_key=tls.key,
            ssh_listen=("127.0.0.1:0",),
            telnet_listen=(),
            userdb=tmp / "userdb.txt",
            json_log=tmp / "cowrie.json",
            lease_timeout=5.0,
            guest_login_timeout=10.0,
            login_grace_time=20.0,
            ssh_auth_fail_delay=0.0,  # tests about the delay ask for it
            # Every client comes from 127.0.0.1: penalties are tested on their own (as
            # OpenSSH's regression tests set PerSourcePenalties no).
            per_source_penalties=False,
        )
        sensor_ = Sensor(replace(config, **sensor))
        ports = await sensor_.start()  # a start that fails undoes itself
        teardown.push_async_callback(bounded, sensor_.stop)
        return Fleet(
            ctl,
            address,
            node,
            guest,
            sensor_,
            ports[0],
            tmp / "cowrie.json",
            tmp / "sensor",
            teardown.pop_all(),
        )


FleetFactory = Callable[..., Awaitable[Fleet]]


SSH_OPTIONS = [
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "LogLevel=ERROR",
    "-o", "PubkeyAuthentication=no",
    "-o", "PreferredAuthentications=password",
    "-o", "NumberOfPasswordPrompts=1",
    "-o", "ConnectTimeout=10",
]  # fmt: skip


async def run(
    *argv: str, password: str, stdin: bytes = b"", timeout: float = 60.0
) -> tuple[int, bytes, bytes]:
    """Run an OpenSSH tool under sshpass; (exit code, stdout, stderr). Killed at ``timeout``."""
    sshpass = require_tool("sshpass", "sshpass")
    proc = await asyncio.create_subprocess_exec(
        sshpass,
        "-e",
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "SSHPASS": password},
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate(stdin)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out, err


async def ssh(
    fleet: Fleet,
    *command: str,
    user: str = "root",
    password: str = "toor",  # noqa: S107
    source: str = "127.0.0.1",
    **kw: Any,
) -> tuple[int, bytes, bytes]:
    """``ssh`` into the sensor (from ``source``, a loopback address)."""
    tool = require_tool("ssh", "openssh-client")
    return await run(
        tool, *SSH_OPTIONS, "-b", source, "-p", str(fleet.port), f"{user}@127.0.0.1", *command,
        password=password, **kw,
    )  # fmt: skip


async def connect(
    fleet: Fleet,
    *,
    source: str = "127.0.0.1",
    password: str = "toor",  # noqa: S107
    **options: Any,
) -> asyncssh.SSHClientConnection:
    """An asyncssh client logged into the sensor as root (for tests that hold sessions)."""
    return await asyncssh.connect(
        "127.0.0.1",
        fleet.port,
        local_addr=(source, 0),
        username="root",
        password=password,
        known_hosts=None,
        client_keys=None,
        agent_path=None,
        preferred_auth="password",
        **options,
    )
