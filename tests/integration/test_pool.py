"""The generic pool's life cycle rules, with the static backend over loopback servers."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from honeyfleet.errors import NotFound, PermissionDenied, ResourceExhausted
from honeyfleet.v1 import common_pb2
from poolnode.backends.static import StaticBackend, parse_hosts
from poolnode.config import PoolNodeConfig
from poolnode.guest import GuestState
from poolnode.pool import GuestPool
from tests.integration.test_leases import until


class Hosts:
    """Loopback "guests" that answer with an SSH banner; each can be stopped."""

    def __init__(self) -> None:
        self.servers: dict[str, asyncio.Server] = {}

    async def add(self, n: int) -> tuple[str, ...]:
        for _ in range(n):
            server = await asyncio.start_server(self._banner, "127.0.0.1", 0)
            self.servers[f"127.0.0.1:{server.sockets[0].getsockname()[1]}"] = server
        return tuple(self.servers)

    async def _banner(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-OpenSSH_9.2p1\r\n")
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()

    async def kill(self, address: str) -> None:
        server = self.servers.pop(address)
        server.close()
        await server.wait_closed()

    def close(self) -> None:
        for server in self.servers.values():
            server.close()


@pytest.fixture
async def hosts() -> AsyncIterator[Hosts]:
    h = Hosts()
    yield h
    h.close()


def config(tmp_path: Path, hosts: tuple[str, ...], **kw: object) -> PoolNodeConfig:
    base = PoolNodeConfig(
        state_dir=tmp_path,
        backend="static",
        static_hosts=hosts,
        max_vms=len(hosts),
        max_parallel_boots=len(hosts),
        health_interval=0.2,
        backend_pass="pw",
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
        b = await pool.allocate("L3", "10.0.0.2", "sensor/a", allow_shared=False)
        assert b.guest.id != a.guest.id
        assert b.credentials.password == "pw"
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
    await pool.allocate("L1", "10.0.0.9", "sensor/a", allow_shared=False)
    await pool.stop()
    (meta,) = (tmp_path / "snapshots").glob("*.json")
    data = json.loads(meta.read_text())
    assert data["src_ips"] == ["10.0.0.9"]
    assert data["leases"][0]["lease"] == "L1" and data["reason"] == "pool node stopping"
