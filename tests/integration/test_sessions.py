"""TunnelService.Session: SSH session channels on the pool node's warm guest login.

A real controller and pool node over mTLS on loopback; the guests are real SSH servers
(tests/sshd.py: /bin/sh under a real pty or pipes). The client here speaks the Session
frames directly, as the sensor's relay does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from honeyfleet.pki.identity import Role
from honeyfleet.tls import Peer, TlsFiles, secure_channel
from honeyfleet.v1 import poolnode_pb2, poolnode_pb2_grpc
from poolnode.guest_login import SESSIONS_PER_LOGIN
from poolnode.server import PoolNode
from tests.conftest import ControllerFactory, FleetPki, start_one_guest_node, until
from tests.integration.leasing import Sensor
from tests.sshd import Sshd

WAIT = 30.0  # for any one answer of the pool node
Request = poolnode_pb2.SessionRequest


class Session:
    """A Session call with an outbox; keeps to the node's input window (a sender waiting
    for credit needs another task reading frames)."""

    def __init__(self, files: TlsFiles, address: str) -> None:
        self.channel = secure_channel(address, files, Peer(Role.POOLNODE))
        self.outbox: asyncio.Queue[Request | None] = asyncio.Queue()
        self.call = poolnode_pb2_grpc.TunnelServiceStub(self.channel).Session(self._requests())
        self.input_window = 0
        self.credit = asyncio.Event()
        self.output: dict[int, bytearray] = {}
        self.frames: list[str] = []
        self.exit_status: int | None = None
        self.exit_signal: str | None = None
        self.lost: str | None = None  # set by the closed frame
        self.granted = 0  # output credit given so far
        self.received = 0  # output bytes received

    async def _requests(self) -> AsyncIterator[Request]:
        while (item := await self.outbox.get()) is not None:
            yield item

    async def open(self, lease_id: str, window: int = 1 << 20, **run: object) -> None:
        """Open a session (``shell=...``, ``exec=b"..."`` or ``subsystem=...``, ``pty=``...)."""
        self.granted = window
        await self.outbox.put(
            Request(open=poolnode_pb2.SessionOpen(lease_id=lease_id, window=window, **run))
        )
        async with asyncio.timeout(WAIT):
            first = await self.call.read()
        assert first.WhichOneof("frame") == "opened", first
        self.input_window = first.opened.window

    async def send(self, data: bytes) -> None:
        """Input, waiting for credit as needed."""
        while data:
            while self.input_window == 0:
                self.credit.clear()
                async with asyncio.timeout(WAIT):
                    await self.credit.wait()
            part, data = data[: self.input_window], data[self.input_window :]
            self.input_window -= len(part)
            await self.outbox.put(Request(data=poolnode_pb2.SessionData(data=part)))

    async def next_frame(self) -> poolnode_pb2.SessionResponse | None:
        """Read and apply one frame; None at the end of the stream."""
        async with asyncio.timeout(WAIT):
            frame = await self.call.read()
        if frame is grpc.aio.EOF:
            return None
        kind = frame.WhichOneof("frame")
        self.frames.append(kind)
        match kind:
            case "data":
                stream = frame.data.stream
                self.output.setdefault(stream, bytearray()).extend(frame.data.data)
                self.received += len(frame.data.data)
                assert self.received <= self.granted, "the node sent past its credit"
            case "window_adjust":
                self.input_window += frame.window_adjust
                self.credit.set()
            case "exit_status":
                self.exit_status = frame.exit_status
            case "exit_signal":
                self.exit_signal = frame.exit_signal.signal
            case "closed":
                self.lost = frame.closed.lost
                await self.outbox.put(None)  # half-close: the node then ends the stream
        return frame

    async def grant(self, count: int) -> None:
        self.granted += count
        await self.outbox.put(Request(window_adjust=count))

    async def until_end(self, *, keep_granting: bool = True) -> None:
        """Read to the end of the stream, granting credit back as output arrives."""
        while (frame := await self.next_frame()) is not None:
            if keep_granting and frame.WhichOneof("frame") == "data":
                await self.grant(len(frame.data.data))

    def stdout(self) -> bytes:
        return bytes(self.output.get(poolnode_pb2.SESSION_STREAM_STDOUT, b""))

    def stderr(self) -> bytes:
        return bytes(self.output.get(poolnode_pb2.SESSION_STREAM_STDERR, b""))


@dataclass
class GuestNode:
    """A pool node with one guest, and a sensor's lease client."""

    node: PoolNode
    sshd: Sshd
    sensor: Sensor


@pytest.fixture
async def guest_node(
    start_controller: ControllerFactory, fleet_pki: FleetPki, tmp_path: Path
) -> AsyncIterator[GuestNode]:
    controller, address = await start_controller()
    sshd = Sshd(tmp_path / "guest")
    port = await sshd.start()
    node = await start_one_guest_node(
        fleet_pki, controller, address, f"127.0.0.1:{port}", tmp_path / "n1"
    )
    yield GuestNode(node, sshd, Sensor(fleet_pki, "s1", address))
    await node.stop(grace=0)
    await sshd.stop()


def session(fleet_pki: FleetPki, node: PoolNode, sensor: str = "s1") -> Session:
    return Session(fleet_pki.files(Role.SENSOR, sensor), node.address)


async def opened(guest_node: GuestNode, fleet_pki: FleetPki, **run: object) -> Session:
    """A session on a new lease of 203.0.113.5, opened with ``run`` (see Session.open)."""
    lease = (await guest_node.sensor.acquire("203.0.113.5")).lease
    s = session(fleet_pki, guest_node.node)
    await s.open(lease.id, **run)
    return s


async def test_exec_relays_output_streams_and_exit_status(
    guest_node: GuestNode, fleet_pki: FleetPki
) -> None:
    s = await opened(
        guest_node,
        fleet_pki,
        exec=b"cat; echo out-$GREETING; echo err >&2; exit 3",
        env=[poolnode_pb2.SessionEnv(name=b"GREETING", value=b"hello")],
    )
    await s.send(b"from stdin\n")
    await s.outbox.put(Request(eof=poolnode_pb2.SessionEof()))
    await s.until_end()
    assert s.stdout() == b"from stdin\nout-hello\n"
    assert s.stderr() == b"err\n"
    assert s.exit_status == 3 and s.lost == ""


async def test_pty_shell_with_window_change_and_interrupt(
    guest_node: GuestNode, fleet_pki: FleetPki
) -> None:
    pty = poolnode_pb2.SessionPty(term="xterm", width=80, height=24)
    s = await opened(guest_node, fleet_pki, shell=poolnode_pb2.SessionShell(), pty=pty)
    await s.outbox.put(
        Request(window_change=poolnode_pb2.SessionWindowChange(width=132, height=43))
    )
    await s.send(b"stty size; tty\n")

    async def seen(text: bytes) -> None:
        while text not in s.stdout():
            frame = await s.next_frame()
            assert frame is not None, s.stdout()

    await seen(b"43 132")
    await seen(b"/dev/pts/")
    # Interrupt only once the command runs: a ^C that the terminal sees while the line
    # still waits for the shell flushes it instead (no time given would be long enough
    # on a loaded machine). The sum tells the output from the echoed line.
    await s.send(b"echo sleeping-$((6*7)); sleep 60\n")
    await seen(b"sleeping-42")
    await s.send(b"\x03")  # ^C through the guest's terminal
    await s.send(b"echo after-$?\n")
    await seen(b"after-130")
    await s.send(b"exit 7\n")
    await s.until_end()
    assert s.exit_status == 7


async def test_a_signal_ends_a_command_with_its_exit_signal(
    guest_node: GuestNode, fleet_pki: FleetPki
) -> None:
    s = await opened(guest_node, fleet_pki, exec=b"echo started; exec sleep 60")
    while b"started" not in s.stdout():
        assert await s.next_frame() is not None
    await s.outbox.put(Request(signal="TERM"))
    await s.until_end()
    assert s.exit_signal == "TERM" and s.exit_status is None


async def test_output_never_passes_the_sensors_credit_and_backpressure_reaches_the_guest(
    guest_node: GuestNode, fleet_pki: FleetPki
) -> None:
    size = 16 << 20
    s = await opened(
        guest_node, fleet_pki, window=256 * 1024, exec=f"head -c {size} /dev/zero".encode()
    )
    # No credit granted back: the node stops at 256 KiB, and the guest soon stops too.
    while s.received < 256 * 1024:
        await s.next_frame()
    sshd = guest_node.sshd
    await asyncio.sleep(1.0)
    stalled = sshd.bytes_out
    await asyncio.sleep(1.0)
    assert sshd.bytes_out == stalled < size
    await s.grant(s.received)
    await s.until_end()
    assert s.received == size and s.exit_status == 0


async def test_input_is_taken_within_the_nodes_window(
    guest_node: GuestNode, fleet_pki: FleetPki
) -> None:
    s = await opened(guest_node, fleet_pki, exec=b"wc -c")
    payload = bytes(range(256)) * (32 * 1024)  # 8 MiB: eight times the node's window
    reading = asyncio.create_task(s.until_end())
    await s.send(payload)
    await s.outbox.put(Request(eof=poolnode_pb2.SessionEof()))
    await reading
    assert s.stdout().strip() == str(len(payload)).encode()
    assert s.frames.count("window_adjust") >= 7


async def test_sessions_of_one_lease_reuse_the_warm_login(
    guest_node: GuestNode, fleet_pki: FleetPki
) -> None:
    node, sensor = guest_node.node, guest_node.sensor
    first = (await sensor.acquire("203.0.113.5")).lease
    for _ in range(3):
        s = session(fleet_pki, node)
        await s.open(first.id, exec=b"true")
        await s.until_end()
        assert s.exit_status == 0
    await sensor.release(first.id)
    again = (await sensor.acquire("203.0.113.5")).lease  # the attacker comes back
    assert again.guest == first.guest
    s = session(fleet_pki, node)
    await s.open(again.id, exec=b"true")
    await s.until_end()
    assert guest_node.sshd.connections == 1


async def test_sessions_need_the_sensors_own_live_lease(
    guest_node: GuestNode, fleet_pki: FleetPki
) -> None:
    node, sensor = guest_node.node, guest_node.sensor
    lease = (await sensor.acquire("203.0.113.5")).lease
    refused = {
        "another sensor's lease": (lease.id, "s2", grpc.StatusCode.PERMISSION_DENIED),
        "an unknown lease": ("no-such-lease", "s1", grpc.StatusCode.NOT_FOUND),
    }
    for what, (lease_id, who, code) in refused.items():
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await session(fleet_pki, node, who).open(lease_id, exec=b"true")
        assert e.value.code() == code, what
    s = session(fleet_pki, node)
    await s.open(lease.id, shell=poolnode_pb2.SessionShell())
    await sensor.release(lease.id)
    await s.until_end()  # releasing the lease closes its sessions
    assert s.exit_status is None and s.lost == ""


async def test_losing_the_guest_ends_its_sessions_saying_why(
    guest_node: GuestNode, fleet_pki: FleetPki
) -> None:
    s = await opened(guest_node, fleet_pki, shell=poolnode_pb2.SessionShell())
    guest_node.sshd.disconnect()
    await s.until_end()
    assert s.lost is not None and "lost its SSH login" in s.lost
    assert s.exit_status is None


async def test_input_past_the_window_is_refused(guest_node: GuestNode, fleet_pki: FleetPki) -> None:
    s = await opened(guest_node, fleet_pki, exec=b"cat")
    too_much = b"x" * (s.input_window + 1)
    await s.outbox.put(Request(data=poolnode_pb2.SessionData(data=too_much)))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await s.until_end()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_sessions_past_openssh_maxsessions_get_a_further_login(
    guest_node: GuestNode, fleet_pki: FleetPki
) -> None:
    lease = (await guest_node.sensor.acquire("203.0.113.5")).lease
    held = []
    for _ in range(SESSIONS_PER_LOGIN + 1):
        s = session(fleet_pki, guest_node.node)
        await s.open(lease.id, exec=b"cat")
        held.append(s)
    assert guest_node.sshd.connections == 2  # the warm login and one more
    for s in held:
        await s.send(b"alive\n")
        await s.outbox.put(Request(eof=poolnode_pb2.SessionEof()))
        await s.until_end()
        assert (s.stdout(), s.exit_status) == (b"alive\n", 0)
    # The extra login went with its last session; the warm one stays.
    await until(lambda: len(guest_node.sshd.live()) == 1)
