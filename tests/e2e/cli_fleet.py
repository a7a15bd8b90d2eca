"""A fleet as an operator runs it: every process started through the CLI.

A controller, two libvirt pool nodes and two sensors run as ``honeyfleet <role>
--config FILE`` inside the run's network namespace, enrolled with join tokens as
docs/deployment.md describes: ``pki init`` and ``pki issue`` for the controller and
the operator, ``pki token create`` then ``<role> join`` for every other host. Each
sensor listens at an address of its own (127.0.1.x), as sensors at many IPs would;
attackers reach them from other loopback addresses (127.0.0.x). The operator asks the
controller with ``buf curl`` and the admin certificate, as a grpcurl user would.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from honeyfleet.config import write_toml
from honeyfleet.pki import write_private
from poolnode.image import GuestImage
from tests.conftest import require_tool
from tests.e2e.fleet import tcg_guests
from tests.e2e.vmhost import VmHost

BIN = Path(sys.executable).parent
CONTROLLER = "127.0.0.1:7400"
ENROLL = "127.0.0.1:7401"
OPERATOR = "operator"  # the admin certificate's name
SSH_PORT = 2222
TELNET_PORT = 2223
GUESTS_PER_NODE = 2
START_WAIT = 300.0
STOP_WAIT = 90.0
COMMAND_WAIT = 60.0


@dataclass(frozen=True)
class NodePlan:
    """One pool node: its name, port and the libvirt objects only it owns."""

    name: str
    port: int
    tag: str
    network: str
    bridge: str
    subnet: str
    # Each node reads its own NFLOG group: the two share one host (network namespace).
    log_group: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass(frozen=True)
class SensorPlan:
    """One sensor and the address attackers find it at."""

    name: str
    address: str


NODES = (
    NodePlan("pool-a", 7410, "hfa", "hf-e2e-a", "hfe2ea0", "10.79.1.1/24", 7707),
    NodePlan("pool-b", 7411, "hfb", "hf-e2e-b", "hfe2eb0", "10.79.2.1/24", 7708),
)
SENSORS = (SensorPlan("sensor-1", "127.0.1.1"), SensorPlan("sensor-2", "127.0.1.2"))


class CommandFailed(AssertionError):
    """A CLI command the operator ran exited non-zero."""


class CliFleet:
    """The fleet's processes, their configs, and the operator's view of them."""

    def __init__(self, host: VmHost, image: GuestImage, work: Path) -> None:
        self.host = host
        self.image = image
        self.work = work
        self.pki_dir = work / "pki"
        self.processes: dict[str, asyncio.subprocess.Process] = {}
        self.roles: dict[str, str] = {}
        self.buf = require_tool("buf", "buf-bin (pip, dev extra)")

    # Running commands

    async def run(self, *argv: str, in_netns: bool = False, timeout: float = 120.0) -> str:
        """Run a command (inside the namespace if asked); its stdout, or a failure."""
        if in_netns:
            argv = tuple(self.host.ns_argv(*argv))
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(timeout):
                out, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise CommandFailed(f"{' '.join(argv)} did not finish in {timeout:.0f}s") from None
        if proc.returncode != 0:
            said = (out + err).decode(errors="replace")
            raise CommandFailed(f"{' '.join(argv)} exited {proc.returncode}:\n{said}")
        return out.decode()

    async def honeyfleet(self, *args: str, in_netns: bool = False) -> str:
        """The operator's CLI."""
        return await self.run(str(BIN / "honeyfleet"), *args, in_netns=in_netns)

    async def admin(self, *args: str) -> str:
        """An operator's command (``status``, ``node ...``) with the [admin] config."""
        config = str(self.config_path(OPERATOR))
        return await self.honeyfleet(*args, "--config", config, in_netns=True)

    async def query(self, method: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One RPC to the controller with buf curl and the admin certificate, as JSON."""
        tls = self._tls(OPERATOR)
        out = await self.run(
            self.buf,
            "curl",
            "--protocol",
            "grpc",
            "--cacert",
            tls["tls_ca"],
            "--cert",
            tls["tls_cert"],
            "--key",
            tls["tls_key"],
            "-d",
            json.dumps(body or {}),
            f"https://{CONTROLLER}/honeyfleet.v1.{method}",
            in_netns=True,
            timeout=30,
        )
        result: dict[str, Any] = json.loads(out)
        return result

    # Bringing it up

    async def start(self) -> None:
        """CA, controller, then every pool node and sensor enrolled with a token."""
        await self.honeyfleet("pki", "init", "--dir", str(self.pki_dir), "--fleet", "e2e")
        await self._issue("controller", "controller", self.work / "tls" / "controller")
        await self._issue("admin", OPERATOR, self.work / "tls" / OPERATOR)
        self._write_config("admin", OPERATOR, {"controller": CONTROLLER, **self._tls(OPERATOR)})
        self._write_config("controller", "controller", self._controller_section())
        await self._spawn("controller", "controller")
        await self._until_listening("controller", CONTROLLER)
        for node in NODES:
            await self._enrol("poolnode", node.name, self._node_section(node), "--ip", "127.0.0.1")
        for sensor in SENSORS:
            await self._enrol("sensor", sensor.name, self._sensor_section(sensor))
        await self.wait_ready()

    async def _issue(self, role: str, name: str, out: Path) -> None:
        await self.honeyfleet(
            "pki",
            "issue",
            "--dir",
            str(self.pki_dir),
            "--role",
            role,
            "--name",
            name,
            "--ip",
            "127.0.0.1",
            "--out",
            str(out),
        )

    def _tls(self, name: str) -> dict[str, str]:
        d = self.work / "tls" / name
        return {
            "tls_ca": str(d / "ca.pem"),
            "tls_cert": str(d / f"{name}.pem"),
            "tls_key": str(d / f"{name}.key"),
        }

    def config_path(self, name: str) -> Path:
        return self.work / f"{name}.toml"

    def log_path(self, name: str) -> Path:
        return self.work / f"{name}.log"

    def _controller_section(self) -> dict[str, Any]:
        return {
            "listen": CONTROLLER,
            "enroll_listen": ENROLL,
            "state_dir": str(self.work / "state" / "controller"),
            "ca_dir": str(self.pki_dir),
            **self._tls("controller"),
            "heartbeat_interval": 1.0,
            "missed_heartbeats": 3,
            "lease_wait": 10.0,
            "jsonlines_path": str(self.work / "cowrie.json"),
        }

    def _node_section(self, node: NodePlan) -> dict[str, Any]:
        return {
            "controller": CONTROLLER,
            "listen": node.address,
            "state_dir": str(self.work / "state" / node.name),
            **self._tls(node.name),
            **tcg_guests(self.image),
            "max_vms": GUESTS_PER_NODE,
            "max_parallel_boots": GUESTS_PER_NODE,
            # Long enough that an attacker's guest waits for their next session.
            "unused_timeout": 600.0,
            "boot_timeout": 200.0,
            "health_interval": 2.0,
            "guest_tag": node.tag,
            "network_name": node.network,
            "network_bridge": node.bridge,
            "network_address": node.subnet,
            "egress_log_group": node.log_group,
        }

    def _sensor_section(self, sensor: SensorPlan) -> dict[str, Any]:
        return {
            "controller": CONTROLLER,
            "state_dir": str(self.work / "state" / sensor.name),
            **self._tls(sensor.name),
            "ssh_listen": [f"{sensor.address}:{SSH_PORT}"],
            "telnet_listen": [f"{sensor.address}:{TELNET_PORT}"],
        }

    async def _enrol(self, role: str, name: str, section: dict[str, Any], *extra: str) -> None:
        """Token on the controller host (naming the member and its addresses), handed over
        as a 0600 file, ``join`` on the new host, then start it."""
        token = await self.honeyfleet(
            "pki",
            "token",
            "create",
            "--dir",
            str(self.pki_dir),
            "--role",
            role,
            "--name",
            name,
            *extra,
        )
        token_file = self.work / f"{name}.token"
        write_private(token_file, token.encode(), overwrite=True)
        self._write_config(role, name, section)
        await self.honeyfleet("config", "check", str(self.config_path(name)))
        await self.honeyfleet(
            role,
            "join",
            "--controller",
            ENROLL,
            "--token-file",
            str(token_file),
            "--config",
            str(self.config_path(name)),
            in_netns=True,
        )
        await self._spawn(role, name)

    def _write_config(self, role: str, name: str, section: dict[str, Any]) -> None:
        write_toml(self.config_path(name), {role: section})

    async def _spawn(self, role: str, name: str) -> None:
        """Start one process as ``honeyfleet <role> --config FILE`` in the namespace."""
        config = str(self.config_path(name))
        self.roles[name] = role
        with self.log_path(name).open("ab") as log:
            self.processes[name] = await asyncio.create_subprocess_exec(
                *self.host.ns_argv(str(BIN / "honeyfleet"), role, "--config", config),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )

    async def _until_listening(self, name: str, address: str) -> None:
        host, port = address.rsplit(":", 1)
        deadline = time.monotonic() + 60
        while True:
            self.check_alive(name)
            try:
                (await self.host.sockets.connect(host, int(port))).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{name} does not listen\n{self.log_tail(name)}") from None
                await asyncio.sleep(0.2)

    async def wait_ready(self) -> None:
        """Until both nodes have all their guests pristine and both sensors reported in."""
        deadline = time.monotonic() + START_WAIT
        while True:
            for name in self.processes:
                self.check_alive(name)
            nodes = await self.pool_nodes()
            listed = await self.query("FleetService/ListSensors")
            sensors = {s["name"] for s in listed.get("sensors", [])}  # none yet: no key
            pristine = {n: nodes[n].get("guestCounts", {}).get("pristine", 0) for n in nodes}
            if sensors == {s.name for s in SENSORS} and all(
                pristine.get(n.name, 0) >= GUESTS_PER_NODE for n in NODES
            ):
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"fleet not ready: pristine {pristine}, sensors {sensors}\n"
                    + "\n".join(f"--- {n}\n{self.log_tail(n)}" for n in self.processes)
                )
            await asyncio.sleep(1)

    # The operator's view

    async def pool_nodes(self) -> dict[str, dict[str, Any]]:
        """ListPoolNodes, by name."""
        listed = await self.query("FleetService/ListPoolNodes", {"page_size": 100})
        return {n["name"]: n for n in listed.get("poolNodes", [])}

    async def sessions(self, src_ip: str) -> list[dict[str, Any]]:
        """The stored sessions of one attacker address, oldest first."""
        listed = await self.query(
            "EventQueryService/ListSessions", {"src_ip": src_ip, "page_size": 100}
        )
        return sorted(listed.get("sessions", []), key=lambda s: s["startTime"])

    async def events(self, **filters: str) -> list[dict[str, Any]]:
        """Stored events matching ``filters`` (eventid, session, src_ip, sensor)."""
        listed = await self.query("EventQueryService/ListEvents", {**filters, "page_size": 1000})
        return [json.loads(e["json"]) for e in listed.get("events", [])]

    # Processes

    def check_alive(self, name: str) -> None:
        """Fail, with its log, if a process the test did not stop has exited."""
        proc = self.processes[name]
        if proc.returncode is not None:
            raise AssertionError(f"{name} exited ({proc.returncode})\n{self.log_tail(name)}")

    async def kill(self, name: str) -> None:
        """SIGKILL a process, as a crash or a pulled plug would: no clean-up of its own."""
        proc = self.processes.pop(name)
        proc.kill()
        await proc.wait()

    async def restart(self, name: str) -> None:
        """Start a killed process again, with the same config."""
        assert name not in self.processes, f"{name} is running"
        await self._spawn(self.roles[name], name)
        if name == "controller":
            await self._until_listening(name, CONTROLLER)

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.log_path(name)
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    async def close(self) -> None:
        """SIGTERM sensors, nodes, controller; then remove what a killed node left."""
        stuck = []
        order = ("sensor", "poolnode", "controller")
        try:
            for name in sorted(self.processes, key=lambda n: order.index(self.roles[n])):
                proc = self.processes.pop(name)
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
                try:
                    async with asyncio.timeout(STOP_WAIT):
                        await proc.wait()
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
                    stuck.append(f"{name} ignored SIGTERM\n{self.log_tail(name)}")
            assert not stuck, "\n".join(stuck)
        finally:
            for node in NODES:  # a killed node leaves its guests and network running
                await asyncio.to_thread(self.host.remove_libvirt_objects, node.tag, node.network)
