"""The libvirt pool with real QEMU guests (TCG), inside the run's network namespace.

One pool node of two guests serves every test here, in file order; a test that
needs other settings restarts it (``ensure_node``). Guests are reached only through
Tunnels, as a sensor reaches them.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import time
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from honeyfleet.v1 import common_pb2, poolnode_pb2
from poolnode.backends.libvirt_xml import DomainSpec, render_domain
from tests.conftest import until
from tests.e2e.fleet import GUESTS, VmFleet, run
from tests.e2e.vmhost import BRIDGE, GATEWAY, NETWORK, TAG, VmHost, namespace_pids

# The node boots guests on first use (bounded by NODE_START_WAIT) before a test proper.
pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]

# IPv6 addresses for the egress test (unique local, only ever inside the namespace).
GATEWAY6 = "fd77::1"
GUEST6 = "fd77::2"
# The recycle tests' node: recycle soon, never time out an idle guest first.
RECYCLING: dict[str, Any] = {
    "recycle_period": 15.0,
    "unused_timeout": 600.0,
    "save_snapshots": False,
}


async def test_ssh_and_telnet_through_tunnels(vm_fleet: VmFleet) -> None:
    await vm_fleet.ensure_node()
    status = await vm_fleet.status()
    assert status.guest_counts.pristine == GUESTS
    lease = await vm_fleet.lease("203.0.113.10")
    async with vm_fleet.shell(lease.id) as conn:
        result = await run(conn, "id -un; hostname; cat /etc/os-release | head -1")
    assert result.exit_status == 0, result.stderr
    user, hostname, os_release = str(result.stdout).splitlines()
    assert user == "root" and hostname == "srv04" and "Debian" in os_release

    seen = await vm_fleet.telnet_prompt(lease.id)
    assert b"srv04 login:" in seen
    await vm_fleet.sensor().release(lease.id)


async def test_tunnels_need_the_sensors_own_live_lease(vm_fleet: VmFleet) -> None:
    await vm_fleet.ensure_node(pristine=1)
    sensor = vm_fleet.sensor("s1")
    lease = await vm_fleet.lease("203.0.113.10", sensor="s1")
    refused = {
        "another sensor's lease": (lease.id, "s2", grpc.StatusCode.PERMISSION_DENIED),
        "an unknown lease": ("no-such-lease", "s1", grpc.StatusCode.NOT_FOUND),
    }
    for what, (lease_id, who, code) in refused.items():
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async with vm_fleet.guest_socket(lease_id, sensor=who):
                pass
        assert e.value.code() == code, what
    await sensor.release(lease.id)
    # The controller tells the node of an end on its heartbeat stream within END_LINGER
    # (sooner with an allocation); from then on the released lease opens nothing.
    assert await tunnel_refusal(vm_fleet, lease.id) == grpc.StatusCode.NOT_FOUND


async def tunnel_refusal(
    vm_fleet: VmFleet, lease_id: str, timeout: float = 20.0
) -> grpc.StatusCode:
    """The code a Tunnel for ``lease_id`` is refused with, retried while the node still opens it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with vm_fleet.guest_socket(lease_id, sensor="s1"):
                pass
        except grpc.aio.AioRpcError as e:
            return e.code()
        assert time.monotonic() < deadline, f"lease {lease_id} still opens tunnels after {timeout}s"
        await asyncio.sleep(0.1)


class CountingListener:
    """A TCP listener in the test namespace that counts the connections it accepts."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def serve(self, sock: socket.socket) -> int:
        self.server = await asyncio.start_server(self._accept, sock=sock)
        return int(sock.getsockname()[1])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(b"hello\n")
        writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def test_guest_egress_is_locked(vm_fleet: VmFleet, vm_host: VmHost) -> None:
    await vm_fleet.ensure_node(pristine=1)
    # IPv6 on the bridge (libvirt leaves it off), so there is something to reach.
    vm_host.ns("sysctl", "-q", "-w", f"net.ipv6.conf.{BRIDGE}.disable_ipv6=0")
    vm_host.ns("ip", "-6", "addr", "replace", f"{GATEWAY6}/64", "dev", BRIDGE, "nodad")
    v4, v6 = CountingListener(), CountingListener()
    port4 = await v4.serve(await vm_host.sockets.listen(GATEWAY))
    port6 = await v6.serve(await vm_host.sockets.listen(GATEWAY6))
    try:
        # Controls: both listeners answer from inside the namespace itself.
        for host, port in ((GATEWAY, port4), (GATEWAY6, port6)):
            (await vm_host.sockets.connect(host, port)).close()
        await until(lambda: v4.connections == 1 and v6.connections == 1)
        lease = await vm_fleet.lease("203.0.113.10")
        async with vm_fleet.shell(lease.id) as conn:
            # The IPv6 address first: its duplicate detection runs during the IPv4 checks.
            setup6 = await run(conn, f"ip -6 addr add {GUEST6}/64 dev eth0")
            ping = await run(conn, f"ping -c 1 -W 5 {GATEWAY}")
            dns = await run(conn, f"nslookup srv04 {GATEWAY}")
            tcp = await run(conn, f"nc -w 4 {GATEWAY} {port4} </dev/null")
            ping6 = await run(conn, f"ping6 -c 1 -W 3 {GATEWAY6}")
            tcp6 = await run(conn, f"nc -w 4 {GATEWAY6} {port6} </dev/null")
        await vm_fleet.sensor().release(lease.id)
    finally:
        v4.close()
        v6.close()
    assert ping.exit_status == 0, f"ICMP to the gateway must pass: {ping}"
    # The node's DNS server answers (under the default policy, sinkhole, with itself).
    assert "Name:\tsrv04" in str(dns.stdout), f"DNS to the pool's resolver must pass: {dns}"
    # TCP meets the node's sinkhole (tests/e2e/test_egress.py), never the listener.
    assert "hello" not in str(tcp.stdout)
    assert setup6.exit_status == 0, setup6.stderr
    assert ping6.exit_status != 0 and tcp6.exit_status != 0 and "hello" not in str(tcp6.stdout)
    assert (v4.connections, v6.connections) == (1, 1), "only the controls got through"


async def test_same_address_same_guest_until_unused_timeout(vm_fleet: VmFleet) -> None:
    await vm_fleet.ensure_node()
    sensor = vm_fleet.sensor()
    first = await vm_fleet.lease("198.51.100.1")
    other = await vm_fleet.lease("198.51.100.2")
    assert other.guest != first.guest
    await sensor.release(first.id)
    again = await vm_fleet.lease("198.51.100.1")
    assert again.guest == first.guest, "within unused_timeout the address keeps its guest"
    for lease in (again, other):
        await sensor.release(lease.id)
    # Idle for unused_timeout: destroyed, and replaced by a fresh guest.
    await vm_fleet.wait_for(
        "both idle guests to be destroyed and replaced",
        lambda s: (
            not guest_ids(s) & {first.guest, other.guest} and s.guest_counts.pristine == GUESTS
        ),
    )
    fresh = await vm_fleet.lease("198.51.100.1")
    assert fresh.guest not in (first.guest, other.guest)
    await sensor.release(fresh.id)


async def test_saved_overlay_keeps_what_the_attacker_wrote(
    vm_fleet: VmFleet, tmp_path: Path
) -> None:
    await vm_fleet.ensure_node(pristine=1)
    attacker = "198.51.100.50"
    marker = secrets.token_hex(8)
    lease = await vm_fleet.lease(attacker)
    async with vm_fleet.shell(lease.id) as conn:
        wrote = await run(conn, f"echo {marker} > /root/evidence.txt && sync")
    assert wrote.exit_status == 0, wrote.stderr
    await vm_fleet.sensor().release(lease.id)
    await vm_fleet.wait_for(
        "the used guest to be destroyed", lambda s: lease.guest not in guest_ids(s)
    )

    # The pool takes the guest out at once; its overlay is moved once the VM is gone.
    snapshots = vm_fleet.state_dir / "snapshots"
    await until(lambda: any(snapshots.glob(f"{lease.guest}-*.qcow2")), timeout=60)
    (overlay,) = snapshots.glob(f"{lease.guest}-*.qcow2")
    meta = json.loads(overlay.with_suffix(".json").read_text())
    assert meta["src_ips"] == [attacker] and meta["leases"][0]["lease"] == lease.id
    assert await read_guest_file(overlay, "/root/evidence.txt", tmp_path) == marker

    # The same attacker, back after the guest was destroyed, gets a fresh guest.
    await vm_fleet.wait_pristine(1)
    fresh = await vm_fleet.lease(attacker)
    assert fresh.guest != lease.guest
    async with vm_fleet.shell(fresh.id) as conn:
        looked = await run(conn, "cat /root/evidence.txt")
    assert looked.exit_status != 0 and marker not in str(looked.stdout)
    await vm_fleet.sensor().release(fresh.id)


async def test_killed_guest_is_replaced(vm_fleet: VmFleet) -> None:
    status = await vm_fleet.ensure_node(pristine=1)
    victim = next(g.id for g in status.guests if g.state == common_pb2.GUEST_STATE_PRISTINE)
    kill_qemu(victim)
    await vm_fleet.wait_for(
        "the killed guest to be replaced",
        lambda s: victim not in guest_ids(s) and s.guest_counts.pristine == GUESTS,
    )
    assert f"guest {victim} destroyed: health check" in vm_fleet.log_tail(400)


async def test_restart_after_a_crash_removes_leftovers(vm_fleet: VmFleet, vm_host: VmHost) -> None:
    crashed = guest_ids(await vm_fleet.ensure_node(pristine=0))
    await vm_fleet.crash_node()
    guests = vm_fleet.state_dir / "guests"
    assert {p.name.split(".")[0] for p in guests.glob("*.qcow2")} >= crashed
    # A guest libvirt kept defined (ours: it has our metadata), and a stranger's
    # domain that only shares the name prefix.
    conn = vm_host.libvirt()
    leftover, stranger = f"{TAG}-leftover", f"{TAG}-stranger"
    for name, ours in ((leftover, True), (stranger, False)):
        domain = ET.fromstring(render_domain(replace(LEFTOVER, name=name)))  # noqa: S314
        if not ours:
            domain.remove(domain.find("metadata"))  # type: ignore[arg-type]
        conn.defineXML(ET.tostring(domain, encoding="unicode"))
    try:
        await vm_fleet.ensure_node(**RECYCLING)
        names = {d.name() for d in conn.listAllDomains(0)}
        assert leftover not in names and stranger in names
        assert not {p.name.split(".")[0] for p in guests.iterdir()} & crashed
    finally:
        conn.lookupByName(stranger).undefine()
        conn.close()


async def test_recycle_replaces_idle_guest_never_a_leased_one(vm_fleet: VmFleet) -> None:
    await vm_fleet.ensure_node(**RECYCLING)
    sensor = vm_fleet.sensor()
    leased = await vm_fleet.lease("192.0.2.1")
    idle = await vm_fleet.lease("192.0.2.2")
    await sensor.release(idle.id)
    status = await vm_fleet.wait_for(
        "the idle guest to be recycled", lambda s: idle.guest not in guest_ids(s)
    )
    states = {g.id: g.state for g in status.guests}
    assert states[leased.guest] == common_pb2.GUEST_STATE_LEASED
    assert status.guest_counts.pristine >= 1, "its replacement was ready before it went"
    assert f"guest {idle.guest} destroyed: recycled" in vm_fleet.log_tail(400)
    await sensor.release(leased.id)


async def test_stopping_the_node_leaves_nothing_behind(vm_fleet: VmFleet, vm_host: VmHost) -> None:
    status = await vm_fleet.ensure_node(pristine=1, **RECYCLING)
    # Stop with one guest leased and another one booting.
    victim = next(g.id for g in status.guests if g.state == common_pb2.GUEST_STATE_PRISTINE)
    await vm_fleet.lease("192.0.2.3")
    kill_qemu(victim)
    await vm_fleet.wait_for("a replacement to boot", lambda s: s.guest_counts.booting >= 1)
    assert await vm_fleet.stop_node() == 0, vm_fleet.log_tail()
    conn = vm_host.libvirt()
    try:
        domains = [d.name() for d in conn.listAllDomains(0) if d.name().startswith(f"{TAG}-")]
    finally:
        conn.close()
    assert domains == []
    assert list((vm_fleet.state_dir / "guests").iterdir()) == []
    commands = [Path(f"/proc/{pid}/comm").read_text() for pid in namespace_pids(vm_host.netns)]
    assert not [c for c in commands if c.startswith("qemu")]


# A domain as a crashed node's libvirtd might have kept it (never started here).
LEFTOVER = DomainSpec(
    name=f"{TAG}-leftover",
    hypervisor="qemu",
    memory_mib=128,
    vcpus=1,
    disk=Path("/nonexistent/leftover.qcow2"),
    mac="52:54:00:ff:ff:01",
    network=NETWORK,
    nwfilter=f"{TAG}-guest",
    dns_server=GATEWAY,
    console_log=Path("/nonexistent/leftover.console.log"),
    kernel=None,
    initrd=None,
    cmdline="",
    tag=TAG,
)


def kill_qemu(guest: str) -> None:
    """Kill a guest's QEMU process behind libvirt's back, as a crash would."""
    os.kill(int(Path(f"/run/libvirt/qemu/{guest}.pid").read_text().strip()), signal.SIGKILL)


def guest_ids(status: poolnode_pb2.GetPoolStatusResponse) -> set[str]:
    """The ids of the node's live guests."""
    return {g.id for g in status.guests}


async def read_guest_file(overlay: Path, path: str, scratch: Path) -> str:
    """A file from a guest's disk overlay, read on the host (no guest, no libguestfs)."""
    raw = scratch / "disk.raw"

    def read() -> str:
        subprocess.run(["qemu-img", "convert", "-O", "raw", overlay, raw], check=True, timeout=120)
        # The guest's last writes may sit in the ext4 journal: replay it first.
        subprocess.run(["e2fsck", "-fy", raw], capture_output=True, timeout=120, check=False)
        out = subprocess.run(
            ["debugfs", "-R", f"cat {path}", raw],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return out.stdout.strip()

    try:
        return await asyncio.to_thread(read)
    finally:
        raw.unlink(missing_ok=True)
