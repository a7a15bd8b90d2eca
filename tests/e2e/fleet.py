"""A fleet around real VMs: a controller in pytest, a pool node process in the namespace.

The controller runs in the test process on the root namespace's loopback; the pool
node runs exactly as an operator starts it (``honeyfleet poolnode --config FILE``)
inside the test namespace, next to libvirtd and its guests. Relays (vmhost.py) carry
the gRPC connections across, so sensors, tunnels and the controller dial the node at
a root-namespace loopback address, while every byte to and from a guest travels
only inside the namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncssh
import grpc

from controller.config import ControllerConfig
from controller.server import Controller
from honeyfleet.config import write_toml
from honeyfleet.pki.identity import Role
from honeyfleet.tls import Peer, secure_channel
from honeyfleet.v1 import common_pb2, lease_pb2, poolnode_pb2, poolnode_pb2_grpc
from poolnode.image import GuestImage
from tests.conftest import FleetPki
from tests.e2e.vmhost import (
    BRIDGE,
    LIBVIRT_URI,
    NETWORK,
    NETWORK_ADDRESS,
    TAG,
    Relay,
    VmHost,
    relay_into_netns,
    relay_out_of_netns,
)
from tests.integration.test_leases import Sensor
from tests.integration.test_tunnel import Tunnel

NODE = "vm1"
GUESTS = 2
GUEST_USER = "root"
GUEST_PASSWORD = "hf-e2e-guest"
NODE_START_WAIT = 240.0
NODE_STOP_WAIT = 90.0
POLL = 0.5
IAC = b"\xff"
# Telnet negotiation (RFC 854): WILL/WONT/DO/DONT and the option byte.
TELNET_OFFER = re.compile(rb"\xff([\xfb\xfd])(.)", re.DOTALL)
TELNET_REFUSAL = {b"\xfb": b"\xfe", b"\xfd": b"\xfc"}  # WILL -> DONT, DO -> WONT
BOOTED = re.compile(r"guest (\S+) pristine at (\S+) after ([0-9.]+)s")


def tcg_guests(image: GuestImage) -> dict[str, Any]:
    """A [poolnode]'s guest settings: libvirt, TCG, 128 MiB guests of the test image."""
    return {
        "backend": "libvirt",
        "backend_user": GUEST_USER,
        "backend_pass": GUEST_PASSWORD,
        "libvirt_uri": LIBVIRT_URI,
        "hypervisor": "qemu",
        "guest_memory": 128,
        "guest_vcpus": 1,
        "guest_image": str(image.disk),
        "guest_kernel": str(image.kernel),
        "guest_initrd": str(image.initrd),
        "guest_cmdline": image.cmdline,
    }


class VmFleet:
    """The controller, the pool node process and the relays between them."""

    def __init__(self, host: VmHost, pki: FleetPki, image: GuestImage, work: Path) -> None:
        self.host = host
        self.pki = pki
        self.image = image
        self.work = work
        self.state_dir = work / "poolnode"
        self.log_path = work / "poolnode.log"
        self.controller: Controller | None = None
        self.controller_address = ""
        self.node_address = ""
        self.node_config: dict[str, Any] = {}
        self._node_port = 0
        self._process: asyncio.subprocess.Process | None = None
        self._relays: list[Relay] = []
        self._channel: grpc.aio.Channel | None = None

    async def start(self) -> None:
        """Start the controller and the relays (the node starts on demand)."""
        tls = self.pki.files(Role.CONTROLLER, "ctl")
        self.controller = Controller(
            ControllerConfig(
                listen="127.0.0.1:0",
                enroll_listen="",
                state_dir=self.work / "controller",
                ca_dir=self.pki.ca.directory,
                tls_ca=tls.ca,
                tls_cert=tls.cert,
                tls_key=tls.key,
                heartbeat_interval=0.5,
                lease_ttl=600.0,
                lease_wait=5.0,
                metrics_listen="",
            )
        )
        ports = await self.controller.start()
        self.controller_address = f"127.0.0.1:{ports.api}"
        self._relays.append(await relay_out_of_netns(self.host.sockets, ports.api))
        # The node's port inside the namespace stays the same across node restarts, so
        # the address it advertises (this relay's) does too.
        probe = await self.host.sockets.listen("127.0.0.1")
        self._node_port = probe.getsockname()[1]
        probe.close()
        self._relays.append(await relay_into_netns(self.host.sockets, self._node_port))
        self.node_address = f"127.0.0.1:{self._relays[1].port}"
        self._channel = secure_channel(self.node_address, tls, Peer(Role.POOLNODE, NODE))

    def config(self, **overrides: Any) -> dict[str, Any]:
        """The pool node's [poolnode] section: two TCG guests of the test image."""
        tls = self.pki.files(Role.POOLNODE, NODE)
        base: dict[str, Any] = {
            "controller": f"127.0.0.1:{self._relays[0].port}",
            "listen": f"127.0.0.1:{self._node_port}",
            "advertise": self.node_address,
            "state_dir": str(self.state_dir),
            "tls_ca": str(tls.ca),
            "tls_cert": str(tls.cert),
            "tls_key": str(tls.key),
            **tcg_guests(self.image),
            "max_vms": GUESTS,
            "max_parallel_boots": GUESTS,
            "unused_timeout": 5.0,
            "recycle_period": 0.0,
            "save_snapshots": True,
            "boot_timeout": 150.0,
            "health_interval": 2.0,
            "guest_tag": TAG,
            "network_name": NETWORK,
            "network_bridge": BRIDGE,
            "network_address": NETWORK_ADDRESS,
            # This node outlives single tests; the fleets other tests start in the same
            # namespace read the default NFLOG group, which only one process may bind.
            "egress_log_group": 7709,
        }
        return base | overrides

    async def ensure_node(
        self, pristine: int = GUESTS, **overrides: Any
    ) -> poolnode_pb2.GetPoolStatusResponse:
        """Have a node running with this config and ``pristine`` guests ready; its status.

        A running node with the same config is kept (booting is the slow part).
        """
        wanted = self.config(**overrides)
        if self.running and wanted == self.node_config:
            return await self.wait_pristine(pristine)
        if self.running:
            await self.stop_node()
        path = self.work / "honeyfleet.toml"
        write_toml(path, {"poolnode": wanted})
        self.node_config = wanted
        honeyfleet = Path(sys.executable).with_name("honeyfleet")
        with self.log_path.open("ab") as log:
            log.write(f"---- pool node starting with {overrides}\n".encode())
            self._process = await asyncio.create_subprocess_exec(
                *self.host.ns_argv(str(honeyfleet), "poolnode", "--config", str(path)),
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )
        # A node boots its whole pool at start; wait for it, not only for ``pristine``.
        pool = int(wanted["max_vms"])
        return await self.wait_pristine(max(pristine, pool), timeout=NODE_START_WAIT)

    @property
    def running(self) -> bool:
        """Whether the node process runs."""
        return self._process is not None and self._process.returncode is None

    async def stop_node(self) -> int:
        """SIGTERM the node (it destroys its guests) and wait; its exit status."""
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return process.returncode if process and process.returncode is not None else 0
        process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(NODE_STOP_WAIT):
                return await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()
            raise AssertionError(f"the pool node ignored SIGTERM\n{self.log_tail()}") from None

    async def crash_node(self) -> None:
        """SIGKILL the node, as a crash would: no clean-up of its own."""
        process, self._process = self._process, None
        assert process is not None and process.returncode is None, "no node to crash"
        process.kill()
        await process.wait()

    async def close(self) -> None:
        """Stop the node, the relays and the controller."""
        try:
            await self.stop_node()
        finally:
            if self._channel is not None:
                await self._channel.close(None)
            for relay in self._relays:
                relay.close()
            if self.controller is not None:
                await self.controller.stop(grace=0)

    def log_tail(self, lines: int = 40) -> str:
        """The end of the node's log, for failure messages."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def boot_times(self) -> list[float]:
        """Seconds from create to SSH banner of every guest booted so far."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return [float(m.group(3)) for m in BOOTED.finditer(text)]

    # Pool state

    async def status(self) -> poolnode_pb2.GetPoolStatusResponse:
        """The node's guest table, asked as the controller."""
        assert self._channel is not None
        stub = poolnode_pb2_grpc.PoolNodeServiceStub(self._channel)
        return await stub.GetPoolStatus(poolnode_pb2.GetPoolStatusRequest(), timeout=10)

    async def wait_for(
        self,
        what: str,
        predicate: Callable[[poolnode_pb2.GetPoolStatusResponse], bool],
        timeout: float = NODE_START_WAIT,
    ) -> poolnode_pb2.GetPoolStatusResponse:
        """Poll the node's status until ``predicate`` holds (bounded in time)."""
        deadline = time.monotonic() + timeout
        while True:
            if self._process is not None and self._process.returncode is not None:
                raise AssertionError(
                    f"the pool node exited while waiting for {what}\n{self.log_tail()}"
                )
            with contextlib.suppress(grpc.aio.AioRpcError):
                status = await self.status()
                if predicate(status):
                    return status
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.log_tail()}")
            await asyncio.sleep(POLL)

    async def wait_pristine(
        self, count: int, timeout: float = NODE_START_WAIT
    ) -> poolnode_pb2.GetPoolStatusResponse:
        """Wait until at least ``count`` guests are pristine."""
        return await self.wait_for(
            f"{count} pristine guests", lambda s: s.guest_counts.pristine >= count, timeout
        )

    # Sensors' side

    def sensor(self, name: str = "s1") -> Sensor:
        """A sensor's lease client."""
        return Sensor(self.pki, name, self.controller_address)

    async def lease(self, src_ip: str, sensor: str = "s1") -> lease_pb2.Lease:
        """A lease for an attacker address, placed on the node."""
        response = await self.sensor(sensor).acquire(src_ip)
        assert response.lease.pool_node == NODE, response
        return response.lease

    @contextlib.asynccontextmanager
    async def guest_socket(
        self, lease_id: str, port: int = common_pb2.GUEST_PORT_SSH, sensor: str = "s1"
    ) -> AsyncIterator[socket.socket]:
        """A socket connected, through a Tunnel, to a leased guest's port."""
        tunnel = Tunnel(self.pki.files(Role.SENSOR, sensor), self.node_address)
        ours, theirs = socket.socketpair()
        pumps: list[asyncio.Task[None]] = []
        try:
            opened = await tunnel.open(lease_id, port)
            assert opened.WhichOneof("frame") == "opened", opened
            reader, writer = await asyncio.open_connection(sock=ours)

            async def to_guest() -> None:
                while data := await reader.read(65536):
                    await tunnel.send(data)
                await tunnel.eof()

            async def from_guest() -> None:
                while isinstance(frame := await tunnel.call.read(), poolnode_pb2.TunnelResponse):
                    if frame.WhichOneof("frame") == "eof":
                        break
                    writer.write(frame.data)
                    await writer.drain()
                if writer.can_write_eof():
                    writer.write_eof()

            pumps += [asyncio.create_task(to_guest()), asyncio.create_task(from_guest())]
            yield theirs
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            await tunnel.outbox.put(None)  # ends the request stream before the call goes
            tunnel.call.cancel()
            ours.close()
            theirs.close()
            await tunnel.channel.close(None)

    async def telnet_prompt(self, lease_id: str, sensor: str = "s1") -> bytes:
        """What a leased guest's Telnet port sends up to its login prompt (bounded).

        Every option the server offers or asks for is refused, as the plainest client
        does: inetutils telnetd (the Debian guest's) waits for those answers before it
        prompts, busybox telnetd does not care.
        """
        async with self.guest_socket(lease_id, common_pb2.GUEST_PORT_TELNET, sensor) as sock:
            reader, writer = await asyncio.open_connection(sock=sock)
            seen = b""
            answered = 0
            async with asyncio.timeout(60):
                while b"login:" not in seen:
                    chunk = await reader.read(1024)
                    assert chunk, f"telnet closed before the login prompt: {seen!r}"
                    seen += chunk
                    # Scanned over all that came, as an offer may straddle two reads.
                    offers = TELNET_OFFER.findall(seen)
                    for verb, option in offers[answered:]:
                        writer.write(IAC + TELNET_REFUSAL[verb] + option)
                    answered = len(offers)
            writer.close()
        return seen

    @contextlib.asynccontextmanager
    async def shell(
        self, lease_id: str, sensor: str = "s1"
    ) -> AsyncIterator[asyncssh.SSHClientConnection]:
        """An SSH login to a leased guest, through a Tunnel, as the backend account."""
        async with (
            self.guest_socket(lease_id, sensor=sensor) as sock,
            asyncssh.connect(
                "guest",
                sock=sock,
                username=GUEST_USER,
                password=GUEST_PASSWORD,
                known_hosts=None,
                connect_timeout=60,
            ) as conn,
        ):
            yield conn


async def run(
    conn: asyncssh.SSHClientConnection, command: str, timeout: float = 60
) -> asyncssh.SSHCompletedProcess:
    """Run a command in a guest (bounded in time), whatever its exit status."""
    return await conn.run(command, check=False, timeout=timeout)
