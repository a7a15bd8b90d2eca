"""Shared fixtures: a real fleet CA and certificates, controllers and pool nodes on loopback."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from controller.config import ControllerConfig
from controller.server import Controller
from honeyfleet.pki import CertificateAuthority, Identity, Role, init_ca
from honeyfleet.pki.certs import build_leaf_certificate, generate_key, private_key_pem
from honeyfleet.tls import TlsFiles
from poolnode.backends.static import StaticBackend, parse_hosts
from poolnode.config import PoolNodeConfig
from poolnode.server import PoolNode

# Re-exported: many test modules take the prerequisite helpers from here.
from tests.prereq import IN_CI as IN_CI
from tests.prereq import require_tool as require_tool
from tests.prereq import unmet as unmet
from tests.sshd import Sshd
from tests.tinydisk import TinyDisks


async def until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    """Wait until ``predicate()`` holds (polling), failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {timeout}s")
        await asyncio.sleep(0.05)


# Seconds any one teardown step may take before it fails the test instead of hanging the run.
TEARDOWN = 60.0


async def bounded(step: Callable[..., Awaitable[object]], *args: Any, **kwargs: Any) -> None:
    """Await one teardown step, failing (not hanging) if it takes over ``TEARDOWN`` seconds."""
    async with asyncio.timeout(TEARDOWN):
        await step(*args, **kwargs)


EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
# Above the ports well-known servers (PostgreSQL, sshd, ...) listen on.
FIRST_TEST_PORT = 10000


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing uses right now, below the ephemeral range.

    A port the kernel hands out for binding to port 0 may, once let go, become the local
    port of any outgoing connection, and then a server restarted on it (as the outage
    tests do) cannot bind it. Ports below the ephemeral range are only ever taken on
    purpose.
    """
    low = int(EPHEMERAL_RANGE.read_text().split()[0])
    for _ in range(1000):
        port = random.randrange(FIRST_TEST_PORT, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port on 127.0.0.1 in {FIRST_TEST_PORT}..{low - 1}")


@dataclass(frozen=True)
class FleetPki:
    """A fleet CA and a directory of issued identities."""

    ca: CertificateAuthority
    root: Path

    def files(self, role: Role, name: str) -> TlsFiles:
        """Issue (once) and return the TLS files of an identity, with loopback SANs."""
        out = self.root / f"{role}-{name}"
        if not (out / f"{name}.pem").exists():
            self.ca.issue(role, name, dns=["localhost"], ips=["127.0.0.1"], out_dir=out)
        return TlsFiles(ca=out / "ca.pem", cert=out / f"{name}.pem", key=out / f"{name}.key")

    def expired(self, role: Role, name: str) -> TlsFiles:
        """TLS files of a certificate that expired yesterday."""
        out = self.root / f"expired-{role}-{name}"
        out.mkdir(parents=True, exist_ok=True)
        key = generate_key()
        cert = build_leaf_certificate(
            ca_cert=self.ca.cert,
            ca_key=self.ca.key,
            identity=Identity(self.ca.fleet, role, name),
            public_key=key.public_key(),
            ips=["127.0.0.1"],
            validity_days=1,
            now=datetime.now(UTC) - timedelta(days=3),
        )
        (out / "key.pem").write_bytes(private_key_pem(key))
        pem = cert.public_bytes(serialization.Encoding.PEM) + self.ca.chain_pem
        (out / "cert.pem").write_bytes(pem)
        (out / "ca.pem").write_bytes(self.ca.cert_pem)
        return TlsFiles(ca=out / "ca.pem", cert=out / "cert.pem", key=out / "key.pem")


@pytest.fixture
def tiny_disks() -> Iterator[TinyDisks]:
    """Make tmpfs mounts; all unmounted afterwards (ask for it before fixtures that use them)."""
    disks = TinyDisks()
    try:
        yield disks
    finally:
        disks.unmount_all()


@pytest.fixture(scope="session")
def fleet_pki(tmp_path_factory: pytest.TempPathFactory) -> FleetPki:
    """One fleet CA for the whole run."""
    root = tmp_path_factory.mktemp("pki")
    ca = init_ca(root / "ca", "testfleet")
    return FleetPki(ca=ca, root=root / "issued")


@pytest.fixture(scope="session")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> FleetPki:
    """A second, unrelated CA (same fleet name) for negative tests."""
    root = tmp_path_factory.mktemp("otherpki")
    return FleetPki(ca=init_ca(root / "ca", "testfleet"), root=root / "issued")


ControllerFactory = Callable[..., Awaitable[tuple[Controller, str]]]


@pytest.fixture
async def start_controller(fleet_pki: FleetPki, tmp_path: Path) -> AsyncIterator[ControllerFactory]:
    """Start controllers on 127.0.0.1:0 (fast heartbeats); stops them all afterwards."""
    running: list[Controller] = []
    tls = fleet_pki.files(Role.CONTROLLER, "ctl")

    async def start(**overrides: Any) -> tuple[Controller, str]:
        config = ControllerConfig(
            listen="127.0.0.1:0",
            enroll_listen="127.0.0.1:0",
            state_dir=tmp_path / "controller",
            ca_dir=fleet_pki.ca.directory,
            tls_ca=tls.ca,
            tls_cert=tls.cert,
            tls_key=tls.key,
            heartbeat_interval=0.2,
            missed_heartbeats=3,
            lease_wait=1.0,
            # A loaded test machine must not make lease requests shed (tests that shed
            # by loop lag set their own).
            shed_loop_lag=30.0,
            # Tests run controllers side by side: no fixed metrics port.
            metrics_listen="",
        )
        controller = Controller(replace(config, **overrides))
        ports = await controller.start()
        running.append(controller)
        return controller, f"127.0.0.1:{ports.api}"

    yield start
    for controller in running:
        if controller._servers:
            await controller.stop(grace=0)


async def start_static_pool_node(
    fleet_pki: FleetPki,
    name: str,
    controller: str,
    hosts: tuple[str, ...],
    state_dir: Path,
    **overrides: Any,
) -> PoolNode:
    """Start a real pool node whose static-backend guests are ``hosts`` (the caller stops it)."""
    tls = fleet_pki.files(Role.POOLNODE, name)
    config = PoolNodeConfig(
        controller=controller,
        listen="127.0.0.1:0",
        state_dir=state_dir,
        tls_ca=tls.ca,
        tls_cert=tls.cert,
        tls_key=tls.key,
        backend="static",
        static_hosts=hosts,
        max_vms=len(hosts),
        max_parallel_boots=len(hosts),
        health_interval=1.0,
        backend_pass="guest-secret",
    )
    config = replace(config, **overrides)
    node = PoolNode(config, StaticBackend(parse_hosts(hosts)))
    await node.start()
    return node


async def start_one_guest_node(
    fleet_pki: FleetPki, controller: Controller, address: str, host: str, state_dir: Path, **kw: Any
) -> PoolNode:
    """A static pool node "pool-1" serving one guest at ``host``, registered and pristine."""
    node = await start_static_pool_node(
        fleet_pki, "pool-1", address, (host,), state_dir, share_guests=True, **kw
    )
    nodes = controller.registry.nodes
    await until(lambda: "pool-1" in nodes and nodes["pool-1"].counts.pristine == 1)
    return node


PoolNodeFactory = Callable[..., Awaitable[PoolNode]]
GuestHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def start_pool_node(fleet_pki: FleetPki, tmp_path: Path) -> AsyncIterator[PoolNodeFactory]:
    """Start real pool nodes whose static-backend guests are loopback SSH servers (the
    node logs into each) with, if asked, a Telnet port served by ``telnet``."""
    running: list[PoolNode] = []
    sshds: list[Sshd] = []
    servers: list[asyncio.Server] = []

    async def start(
        name: str,
        controller: str,
        *,
        guests: int = 3,
        share_guests: bool = False,
        labels: dict[str, str] | None = None,
        telnet: GuestHandler | None = None,
        **overrides: Any,
    ) -> PoolNode:
        hosts = []
        for i in range(guests):
            sshd = Sshd(tmp_path / name / f"guest{i}")
            sshds.append(sshd)
            host = f"127.0.0.1:{await sshd.start()}"
            if telnet is not None:
                server = await asyncio.start_server(telnet, "127.0.0.1", 0)
                servers.append(server)
                host += f":{server.sockets[0].getsockname()[1]}"
            hosts.append(host)
        node = await start_static_pool_node(
            fleet_pki,
            name,
            controller,
            tuple(hosts),
            tmp_path / name,
            labels=labels or {"image": "busybox"},
            share_guests=share_guests,
            max_vms=guests,
            max_parallel_boots=guests,
            **overrides,
        )
        running.append(node)
        return node

    yield start
    for node in running:
        await node.stop(grace=0)
    for sshd in sshds:
        await sshd.stop()
    for server in servers:
        server.close()
