"""The generic pool's life cycle rules, with the static backend over loopback servers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from honeyfleet.errors import NotFound, PermissionDenied, ResourceExhausted, Unavailable
from honeyfleet.pki.identity import Role
from honeyfleet.v1 import common_pb2, poolnode_pb2, registry_pb2
from poolnode.backends.static import StaticBackend, parse_hosts
from poolnode.config import PoolNodeConfig
from poolnode.controller_link import ControllerLink
from poolnode.guest import GuestState
from poolnode.pool import GuestPool
from poolnode.service import Allocation
from tests.conftest import (
    ControllerFactory,
    FleetPki,
    free_port,
    start_static_pool_node,
    until,
)
from tests.sshd import PASSWORD, Sshd


class Hosts:
    """Loopback "guests": SSH servers the pool logs into; each can be stopped."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.servers: dict[str, Sshd] = {}

    async def add(self, n: int) -> tuple[str, ...]:
        for _ in range(n):
            sshd = Sshd(self.home / f"guest{len(self.servers)}")
            self.servers[f"127.0.0.1:{await sshd.start()}"] = sshd
        return tuple(self.servers)

    async def kill(self, address: str) -> None:
        await self.servers.pop(address).stop()

    async def close(self) -> None:
        for server in self.servers.values():
            await server.stop()


@pytest.fixture
async def hosts(tmp_path: Path) -> AsyncIterator[Hosts]:
    h = Hosts(tmp_path / "hosts")
    yield h
    await h.close()


def config(tmp_path: Path, hosts: tuple[str, ...], **kw: object) -> PoolNodeConfig:
    base = PoolNodeConfig(
        state_dir=tmp_path,
        backend="static",
        static_hosts=hosts,
        max_vms=len(hosts),
        max_parallel_boots=len(hosts),
        health_interval=0.2,
        backend_pass=PASSWORD,
        boot_timeout=5,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


async def running_pool(cfg: PoolNodeConfig) -> GuestPool:
    pool = GuestPool(cfg, StaticBackend(parse_hosts(cfg.static_hosts)))
    await pool.start()
    await until(lambda: pool.snapshot().guest_counts.pristine == cfg.max_vms)
    return pool


async def test_allocation_rules(tmp_path: Path, hosts: Hosts) -> None:
    pool = await running_pool(config(tmp_path, await hosts.add(2)))
    try:
        a = await pool.allocate("L1", "10.0.0.1", "sensor/a", allow_shared=False)
        again = await pool.allocate("L2", "10.0.0.1", "sensor/b", allow_shared=False)
        assert again.guest.id == a.guest.id and not again.shared
        b = await pool.allocate("L3", "10.0.0.2", "sensor/a", allow_shared=False, protocol="telnet")
        assert b.guest.id != a.guest.id
        # The guest's credentials go to Telnet clients only: SSH runs on the node's login.
        assert b.credentials.password == PASSWORD and not a.credentials.password
        # No pristine guest left and the node does not share: refused even if allowed.
        with pytest.raises(ResourceExhausted):
            await pool.allocate("L4", "10.0.0.3", "sensor/a", allow_shared=True)
        await pool.release("L1", "done")
        await pool.release("L1", "again")  # unknown now: ignored
        states = {g.id: g.state for g in pool.snapshot().guests}
        assert states[a.guest.id] == common_pb2.GUEST_STATE_LEASED  # L2 still holds it
        await pool.release("L2", "done")
        assert {g.id: g.state for g in pool.snapshot().guests}[
            a.guest.id
        ] == common_pb2.GUEST_STATE_IDLE
        # The same address gets its idle guest back.
        back = await pool.allocate("L5", "10.0.0.1", "sensor/c", allow_shared=False)
        assert back.guest.id == a.guest.id
    finally:
        await pool.stop()


async def test_shared_guest_is_least_loaded(tmp_path: Path, hosts: Hosts) -> None:
    pool = await running_pool(config(tmp_path, await hosts.add(2), share_guests=True))
    try:
        a = await pool.allocate("L1", "10.0.0.1", "sensor/a", allow_shared=False)
        await pool.allocate("L2", "10.0.0.1", "sensor/a", allow_shared=False)
        b = await pool.allocate("L3", "10.0.0.2", "sensor/a", allow_shared=False)
        with pytest.raises(ResourceExhausted):
            await pool.allocate("L4", "10.0.0.3", "sensor/a", allow_shared=False)
        shared = await pool.allocate("L4", "10.0.0.3", "sensor/a", allow_shared=True)
        assert shared.guest.id == b.guest.id != a.guest.id and shared.shared
    finally:
        await pool.stop()


async def test_tunnel_target_checks_the_sensor(tmp_path: Path, hosts: Hosts) -> None:
    pool = await running_pool(config(tmp_path, await hosts.add(1)))
    try:
        await pool.allocate("L1", "10.0.0.1", "sensor/a", allow_shared=False)
        host, port = pool.tunnel_target("L1", "sensor/a", common_pb2.GUEST_PORT_SSH)
        assert f"{host}:{port}" in hosts.servers
        with pytest.raises(PermissionDenied):
            pool.tunnel_target("L1", "sensor/b", common_pb2.GUEST_PORT_SSH)
        with pytest.raises(NotFound):
            pool.tunnel_target("nope", "sensor/a", common_pb2.GUEST_PORT_SSH)
    finally:
        await pool.stop()


async def test_unused_timeout_destroys_and_replaces(tmp_path: Path, hosts: Hosts) -> None:
    pool = await running_pool(config(tmp_path, await hosts.add(1), unused_timeout=0.3))
    try:
        first = await pool.allocate("L1", "10.0.0.1", "sensor/a", allow_shared=False)
        await pool.release("L1", "done")
        await until(lambda: first.guest.id not in pool.guests)
        await until(lambda: pool.snapshot().guest_counts.pristine == 1)
        fresh = await pool.allocate("L2", "10.0.0.1", "sensor/a", allow_shared=False)
        assert fresh.guest.id != first.guest.id and fresh.guest.src_ips == ["10.0.0.1"]
    finally:
        await pool.stop()


async def test_dead_guest_is_replaced(tmp_path: Path, hosts: Hosts) -> None:
    addresses = await hosts.add(2)
    pool = await running_pool(config(tmp_path, addresses, max_vms=1))
    try:
        (guest,) = pool.guests.values()
        assert guest.address is not None
        port = pool._backend.ports(guest.handle)[0]
        await hosts.kill(f"{guest.address}:{port}")
        await until(lambda: guest.id not in pool.guests)
        await until(lambda: pool.snapshot().guest_counts.pristine == 1)
        (replacement,) = pool.guests.values()
        assert replacement.id != guest.id
        assert pool.metrics.health_failures.labels("ssh")._value.get() >= 1
    finally:
        await pool.stop()


async def test_the_node_keeps_one_warm_login_per_guest(tmp_path: Path, hosts: Hosts) -> None:
    pool = await running_pool(config(tmp_path, await hosts.add(2)))
    try:
        await pool.allocate("L1", "10.0.0.1", "sensor/a", allow_shared=False)
        await pool.release("L1", "done")
        await pool.allocate("L2", "10.0.0.1", "sensor/a", allow_shared=False)
        # Upkeep runs every 0.2 s: several health checks pass on the same logins.
        await asyncio.sleep(1.0)
        assert [sshd.connections for sshd in hosts.servers.values()] == [1, 1]
        assert all(g.login is not None and g.login.lost is None for g in pool.guests.values())
    finally:
        await pool.stop()


async def test_refused_credentials_never_make_a_guest_pristine(
    tmp_path: Path, hosts: Hosts, caplog: pytest.LogCaptureFixture
) -> None:
    pool = GuestPool(
        config(tmp_path, await hosts.add(1), backend_pass="wrong"),
        StaticBackend(parse_hosts(tuple(hosts.servers))),
    )
    destroyed = "honeyfleet_poolnode_guests_destroyed_total"
    caplog.set_level(logging.INFO, "poolnode")
    await pool.start()
    try:
        await until(
            lambda: bool(
                pool.metrics.registry.get_sample_value(destroyed, {"reason": "login refused"})
            )
        )
        assert pool.snapshot().guest_counts.pristine == 0
        assert "check backend_user and backend_pass" in caplog.text
    finally:
        await pool.stop()


async def test_a_leased_guest_whose_login_is_lost_is_replaced(tmp_path: Path, hosts: Hosts) -> None:
    pool = await running_pool(config(tmp_path, await hosts.add(1)))
    try:
        leased = await pool.allocate("L1", "10.0.0.1", "sensor/a", allow_shared=False)
        (sshd,) = hosts.servers.values()
        sshd.disconnect()
        await until(lambda: leased.guest.id not in pool.guests)
        assert pool.lease_sensor("L1") is None
        # The static host still answers: a new guest on it, with a login of its own.
        await until(lambda: pool.snapshot().guest_counts.pristine == 1)
        assert sshd.connections == 2
        failures = pool.metrics.registry.get_sample_value(
            "honeyfleet_poolnode_health_failures_total", {"check": "ssh"}
        )
        assert failures == 1
    finally:
        await pool.stop()


class Freezer:
    """A TCP relay in front of a guest that can stop passing anything on, as a hung
    guest whose connections stay open."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.frozen = False
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    if not self.frozen:
                        sink.write(data)
            sink.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))


async def test_a_hung_guest_loses_its_login_and_is_replaced(
    tmp_path: Path, hosts: Hosts, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "poolnode")
    (address,) = await hosts.add(1)
    freezer = Freezer(int(address.rpartition(":")[2]))
    pool = await running_pool(config(tmp_path, (await freezer.start(),)))
    try:
        (hung,) = pool.guests
        freezer.frozen = True
        # Keepalives every health_interval (0.2 s) go unanswered.
        await until(lambda: hung not in pool.guests)
        assert "not responding to keepalive" in caplog.text
        freezer.frozen = False
        await until(lambda: pool.snapshot().guest_counts.pristine == 1)
    finally:
        await pool.stop()
        freezer.close()


async def test_recycle_replaces_idle_never_leased(tmp_path: Path, hosts: Hosts) -> None:
    addresses = await hosts.add(3)
    pool = await running_pool(config(tmp_path, addresses, max_vms=2, recycle_period=0.5))
    try:
        leased = await pool.allocate("L1", "10.0.0.1", "sensor/a", allow_shared=False)
        idle = await pool.allocate("L2", "10.0.0.2", "sensor/a", allow_shared=False)
        await pool.release("L2", "done")
        await until(lambda: idle.guest.id not in pool.guests, timeout=15)
        await until(lambda: pool.snapshot().guest_counts.pristine == 1)
        assert leased.guest.id in pool.guests
        assert pool.guests[leased.guest.id].state is GuestState.LEASED
    finally:
        await pool.stop()


async def test_pristine_capacity_never_drops_during_recycle(tmp_path: Path, hosts: Hosts) -> None:
    # One pristine guest and a spare host: the replacement boots before the old one goes.
    addresses = await hosts.add(2)
    pool = await running_pool(config(tmp_path, addresses, max_vms=1, recycle_period=0.5))
    seen: list[int] = []
    pool.set_on_change(lambda: seen.append(pool.snapshot().guest_counts.pristine))
    try:
        (old,) = pool.guests
        await until(lambda: old not in pool.guests, timeout=15)
        assert min(seen) >= 1
    finally:
        await pool.stop()


async def test_snapshots_keep_metadata_of_used_guests(tmp_path: Path, hosts: Hosts) -> None:
    pool = await running_pool(config(tmp_path, await hosts.add(1), save_snapshots=True))
    try:
        await pool.allocate("L1", "10.0.0.9", "sensor/a", allow_shared=False)
    finally:
        await pool.stop()
    (meta,) = (tmp_path / "snapshots").glob("*.json")
    data = json.loads(meta.read_text())
    assert data["src_ips"] == ["10.0.0.9"]
    assert data["leases"][0]["lease"] == "L1" and data["reason"] == "pool node stopping"


def allocate_now(pool: GuestPool, lease_id: str, src_ip: str) -> Allocation:
    """Run an allocation to its end right now, as one already queued on the loop would.

    ``allocate`` never awaits, so a request handled in the same loop turn runs before
    anything the pool schedules at this point.
    """
    coro = pool.allocate(lease_id, src_ip, "sensor/a", allow_shared=False)
    try:
        coro.send(None)
    except StopIteration as done:
        allocation: Allocation = done.value
        return allocation
    coro.close()
    raise AssertionError("allocate awaited")


async def test_recycled_guest_is_never_destroyed_once_leased(tmp_path: Path, hosts: Hosts) -> None:
    # The replacement turns pristine and, before anything else runs, the recycled
    # guest (the oldest pristine one, so the one allocation picks) is leased.
    pool = await running_pool(config(tmp_path, await hosts.add(2), max_vms=1, recycle_period=0.5))
    (old,) = pool.guests
    leases: list[Allocation] = []

    def on_change() -> None:
        pristine = [g for g in pool.guests.values() if g.state is GuestState.PRISTINE]
        if not leases and len(pristine) > 1 and any(g.retiring for g in pristine):
            leases.append(allocate_now(pool, "L1", "10.0.0.1"))

    pool.set_on_change(on_change)
    try:
        await until(lambda: bool(leases), timeout=15)
        assert leases[0].guest.id == old
        # The surplus replacement is recycled in its turn, never the leased guest.
        await until(lambda: len(pool.guests) == 1, timeout=15)
        assert pool.guests[old].state is GuestState.LEASED
        assert pool.lease_sensor("L1") == "sensor/a"
    finally:
        await pool.stop()


async def test_recycling_goes_on_when_the_retiring_guest_gets_leased(
    tmp_path: Path, hosts: Hosts
) -> None:
    # The guest being recycled is leased while its replacement boots: the node then
    # has one guest too many, which must not stop the next guest being recycled.
    pool = await running_pool(config(tmp_path, await hosts.add(3), max_vms=2, recycle_period=0.5))
    leases: list[Allocation] = []

    def on_change() -> None:
        guests = pool.guests.values()
        booting = any(g.state is GuestState.BOOTING for g in guests)
        if not leases and booting and any(g.retiring for g in guests):
            leases.append(allocate_now(pool, "L1", "10.0.0.1"))

    first, second = sorted(pool.guests.values(), key=lambda g: g.created)
    pool.set_on_change(on_change)
    try:
        await until(lambda: bool(leases), timeout=15)
        assert leases[0].guest.id == first.id
        await until(lambda: second.id not in pool.guests, timeout=15)
        assert pool.guests[first.id].state is GuestState.LEASED
        await until(lambda: len(pool.guests) == pool.capacity, timeout=15)
    finally:
        await pool.stop()


class FlakyBackend(StaticBackend):
    """A static backend whose first address lookup fails, as libvirt does when it goes away."""

    failed = False

    async def address(self, handle: object) -> str | None:
        if not self.failed:
            self.failed = True
            raise Unavailable("cannot connect to libvirt at qemu:///system")
        return await super().address(handle)


async def test_backend_failure_while_booting_frees_the_guests_place(
    tmp_path: Path, hosts: Hosts
) -> None:
    cfg = config(tmp_path, await hosts.add(1))
    backend = FlakyBackend(parse_hosts(cfg.static_hosts))
    pool = GuestPool(cfg, backend)
    await pool.start()
    try:
        await until(lambda: pool.snapshot().guest_counts.pristine == 1)
        assert backend.failed
        assert pool.metrics.destroyed.labels("boot failed")._value.get() == 1
    finally:
        await pool.stop()


async def test_tunnel_for_a_lease_that_ended_while_it_connected_is_cut(
    tmp_path: Path, hosts: Hosts
) -> None:
    pool = await running_pool(config(tmp_path, await hosts.add(1)))
    try:
        await pool.allocate("L1", "10.0.0.1", "sensor/a", allow_shared=False)
        host, port = pool.tunnel_target("L1", "sensor/a", common_pb2.GUEST_PORT_SSH)
        # TunnelService connects to the guest now; the lease ends meanwhile.
        _, writer = await asyncio.open_connection(host, port)
        await pool.release("L1", "released while the tunnel connected")
        with pytest.raises(NotFound):
            pool.track_tunnel("L1", writer)
        assert writer.is_closing()
        assert pool.metrics.tunnels._value.get() == 0
        assert "L1" not in pool._tunnels
    finally:
        await pool.stop()


async def no_guest(
    request: poolnode_pb2.AllocateGuestRequest,
) -> poolnode_pb2.AllocateGuestResponse:
    """A link's allocations where the test places no lease."""
    raise ResourceExhausted("this test's node has no guest")


async def test_controller_link_survives_a_reply_it_cannot_apply(
    start_controller: ControllerFactory, fleet_pki: FleetPki
) -> None:
    controller, address = await start_controller()
    registrations: list[float] = []
    replies: list[registry_pb2.HeartbeatResponse] = []

    def registration() -> registry_pb2.RegisterPoolNodeRequest:
        registrations.append(asyncio.get_running_loop().time())
        return registry_pb2.RegisterPoolNodeRequest(address="127.0.0.1:1", capacity=1)

    async def on_response(reply: registry_pb2.HeartbeatResponse) -> None:
        replies.append(reply)
        if len(replies) == 1:
            int("not-a-serial", 16)  # a reply this node cannot apply: ValueError

    link = ControllerLink(
        address,
        fleet_pki.files(Role.POOLNODE, "n1"),
        registration=registration,
        snapshot=registry_pb2.HeartbeatRequest,
        table_version=lambda: 1,
        on_response=on_response,
        allocate=no_guest,
    )
    task = asyncio.create_task(link.run())
    try:
        await until(lambda: (len(registrations) >= 2 and len(replies) >= 2) or task.done())
        assert not task.done()
        assert "n1" in controller.registry.nodes
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_heartbeats_carry_the_guest_table_only_when_it_changed(
    start_controller: ControllerFactory, fleet_pki: FleetPki
) -> None:
    controller, address = await start_controller()
    version = 1
    tables: list[int] = []
    replies: list[registry_pb2.HeartbeatResponse] = []

    def snapshot() -> registry_pb2.HeartbeatRequest:
        tables.append(version)
        return registry_pb2.HeartbeatRequest(table_version=version)

    async def on_response(reply: registry_pb2.HeartbeatResponse) -> None:
        replies.append(reply)

    link = ControllerLink(
        address,
        fleet_pki.files(Role.POOLNODE, "n1"),
        registration=lambda: registry_pb2.RegisterPoolNodeRequest(
            address="127.0.0.1:1", capacity=1
        ),
        snapshot=snapshot,
        table_version=lambda: version,
        on_response=on_response,
        allocate=no_guest,
    )
    task = asyncio.create_task(link.run())
    try:
        await until(lambda: len(replies) >= 5)
        assert tables == [1]  # one table, then versions only
        version = 2
        await until(lambda: len(tables) == 2)
        seen = len(replies)
        await until(lambda: len(replies) >= seen + 3)
        assert tables == [1, 2]
        assert controller.registry.nodes["n1"].view.table_version == 2
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_stopped_node_closes_its_metrics_port(fleet_pki: FleetPki, tmp_path: Path) -> None:
    port = free_port()
    node = await start_static_pool_node(
        fleet_pki,
        "n1",
        f"127.0.0.1:{free_port()}",  # no controller: the node keeps retrying
        (f"127.0.0.1:{free_port()}",),
        tmp_path,
        metrics_listen=f"127.0.0.1:{port}",
    )
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
    finally:
        await node.stop(grace=0)
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)


class HungFirstBackend(StaticBackend):
    """A static backend whose first guest never shows a sign of life (as under a KVM
    that accepts guests but never runs them): no address, and `hung` says why."""

    creates = 0

    async def create(self, guest_id: str) -> object:
        self.creates += 1
        return await super().create(guest_id)

    async def address(self, handle: object) -> str | None:
        return None if self.creates == 1 else await super().address(handle)

    async def hung(self, handle: object) -> str | None:
        return 'no console output; set hypervisor = "qemu"' if self.creates == 1 else None


async def test_a_hung_guest_is_reported_and_replaced_before_boot_timeout(
    tmp_path: Path, hosts: Hosts, caplog: pytest.LogCaptureFixture
) -> None:
    # Without the silence check the hung guest would hold its place for boot_timeout.
    cfg = config(tmp_path, await hosts.add(1), boot_timeout=3600, boot_silence_timeout=0.5)
    pool = GuestPool(cfg, HungFirstBackend(parse_hosts(cfg.static_hosts)))
    await pool.start()
    try:
        await until(lambda: pool.snapshot().guest_counts.pristine == 1, timeout=30)
        destroyed = pool.metrics.registry.get_sample_value(
            "honeyfleet_poolnode_guests_destroyed_total", {"reason": "hung"}
        )
        assert destroyed == 1
        hung = [r for r in caplog.records if "is hung" in r.getMessage()]
        assert len(hung) == 1 and hung[0].levelname == "ERROR"
        assert 'set hypervisor = "qemu"' in hung[0].getMessage()
    finally:
        await pool.stop()
