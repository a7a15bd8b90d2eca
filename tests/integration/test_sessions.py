"""TunnelService.Sessions: SSH session channels on the pool node's warm guest login,
multiplexed on one stream per sensor.

A real controller and pool node over mTLS on loopback; the guests are real SSH servers
(tests/sshd.py: /bin/sh under a real pty or pipes). The client here speaks the Sessions
frames directly, as the sensor's relay does.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from honeyfleet.pki.identity import Role
from honeyfleet.tls import Peer, TlsFiles, secure_channel
from honeyfleet.v1 import poolnode_pb2, poolnode_pb2_grpc
from poolnode.guest_login import SESSIONS_PER_LOGIN
from poolnode.server import PoolNode
from poolnode.sessions import MAX_DATA
from tests.conftest import ControllerFactory, FleetPki, start_one_guest_node, until
from tests.integration.leasing import Sensor
from tests.sshd import Sshd

WAIT = 30.0  # for any one answer of the pool node
Request = poolnode_pb2.SessionsRequest
Response = poolnode_pb2.SessionsResponse
Code = poolnode_pb2.SessionErrorCode


class Mux:
    """A Sessions call with an outbox, handing each session the frames of its id."""

    def __init__(self, files: TlsFiles, address: str) -> None:
        self.channel = secure_channel(address, files, Peer(Role.POOLNODE))
        self.outbox: asyncio.Queue[Request | None] = asyncio.Queue()
        self.call = poolnode_pb2_grpc.TunnelServiceStub(self.channel).Sessions(self._requests())
        self.sessions: dict[int, asyncio.Queue[Response | None]] = {}
        self.last_id = 0
        self.ended: grpc.aio.AioRpcError | None = None  # how the stream ended, once it has
        self._reader = asyncio.create_task(self._read())

    async def _requests(self) -> AsyncIterator[Request]:
        while (item := await self.outbox.get()) is not None:
            yield item

    async def _read(self) -> None:
        try:
            while isinstance(frame := await self.call.read(), Response):
                queue = self.sessions.get(frame.session_id)
                assert queue is not None, f"a frame for session {frame.session_id} never opened"
                queue.put_nowait(frame)
        except grpc.aio.AioRpcError as e:
            self.ended = e
        finally:
            for queue in self.sessions.values():
                queue.put_nowait(None)

    def session(self) -> Session:
        self.last_id += 1
        self.sessions[self.last_id] = asyncio.Queue()
        return Session(self, self.last_id)

    async def close(self) -> None:
        await self.outbox.put(None)
        async with asyncio.timeout(WAIT):
            await self._reader
        await self.channel.close()


class Refused(Exception):
    """The node answered an open with ``closed`` and an error."""

    def __init__(self, error: poolnode_pb2.SessionError) -> None:
        super().__init__(error.message)
        self.code = error.code


class Session:
    """One session of a Mux; keeps to the node's input window (a sender waiting for
    credit needs another task reading frames)."""

    def __init__(self, mux: Mux, session_id: int) -> None:
        self.mux = mux
        self.id = session_id
        self.input_window = 0
        self.credit = asyncio.Event()
        self.output: dict[int, bytearray] = {}
        self.frames: list[str] = []
        self.data_sizes: list[int] = []  # of each data frame
        self.exit_status: int | None = None
        self.exit_signal: str | None = None
        self.lost: str | None = None  # set by the closed frame
        self.error: poolnode_pb2.SessionError | None = None  # set by a closed frame's error
        self.granted = 0  # output credit given so far
        self.received = 0  # output bytes received

    async def put(self, **frame: object) -> None:
        """Send a frame of this session's."""
        await self.mux.outbox.put(Request(session_id=self.id, **frame))

    async def open(self, lease_id: str, window: int = 1 << 20, **run: object) -> None:
        """Open the session (``shell=...``, ``exec=b"..."`` or ``subsystem=...``, ``pty=``...);
        Refused if the node closes it instead."""
        self.granted = window
        await self.put(open=poolnode_pb2.SessionOpen(lease_id=lease_id, window=window, **run))
        async with asyncio.timeout(WAIT):
            first = await self.mux.sessions[self.id].get()
        assert first is not None, self.mux.ended
        if first.WhichOneof("frame") == "closed":
            raise Refused(first.closed.error)
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
            await self.put(data=poolnode_pb2.SessionData(data=part))

    async def next_frame(self) -> Response | None:
        """Read and apply one frame; None once the session (or the stream) ended."""
        if self.lost is not None or self.error is not None:
            return None
        async with asyncio.timeout(WAIT):
            frame = await self.mux.sessions[self.id].get()
        if frame is None:
            return None
        kind = frame.WhichOneof("frame")
        self.frames.append(kind)
        match kind:
            case "data":
                stream = frame.data.stream
                self.data_sizes.append(len(frame.data.data))
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
                if frame.closed.HasField("error"):
                    self.error = frame.closed.error
        return frame

    async def grant(self, count: int) -> None:
        self.granted += count
        await self.put(window_adjust=count)

    async def until_end(self, *, keep_granting: bool = True) -> None:
        """Read to the session's end, granting credit back as output arrives."""
        while (frame := await self.next_frame()) is not None:
            if keep_granting and frame.WhichOneof("frame") == "data":
                await self.grant(len(frame.data.data))

    async def seen(self, text: bytes) -> None:
        """Read until ``text`` is in the output (granting nothing back)."""
        while text not in self.stdout():
            frame = await self.next_frame()
            assert frame is not None, self.stdout()

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


@pytest.fixture
async def muxes(guest_node: GuestNode, fleet_pki: FleetPki) -> AsyncIterator[MuxFactory]:
    """Sessions streams to the node, as sensor "s1" unless told; cut at the end."""
    made: list[Mux] = []

    def make(sensor: str = "s1") -> Mux:
        made.append(Mux(fleet_pki.files(Role.SENSOR, sensor), guest_node.node.address))
        return made[-1]

    yield make
    for mux in made:
        mux.call.cancel()
        await mux.channel.close()


MuxFactory = Callable[..., Mux]


def tunnels(node: PoolNode) -> float:
    """The node's gauge of open tunnels and sessions."""
    return node.pool.metrics.registry.get_sample_value("honeyfleet_poolnode_tunnels") or 0.0


async def opened(guest_node: GuestNode, mux: Mux, **run: object) -> Session:
    """A session on a new lease of 203.0.113.5, opened with ``run`` (see Session.open)."""
    lease = (await guest_node.sensor.acquire("203.0.113.5")).lease
    s = mux.session()
    await s.open(lease.id, **run)
    return s


async def test_exec_relays_output_streams_and_exit_status(
    guest_node: GuestNode, muxes: MuxFactory
) -> None:
    s = await opened(
        guest_node,
        muxes(),
        exec=b"cat; echo out-$GREETING; echo err >&2; exit 3",
        env=[poolnode_pb2.SessionEnv(name=b"GREETING", value=b"hello")],
    )
    await s.send(b"from stdin\n")
    await s.put(eof=poolnode_pb2.SessionEof())
    await s.until_end()
    assert s.stdout() == b"from stdin\nout-hello\n"
    assert s.stderr() == b"err\n"
    assert s.exit_status == 3 and s.lost == ""


async def test_pty_shell_with_window_change_and_interrupt(
    guest_node: GuestNode, muxes: MuxFactory
) -> None:
    pty = poolnode_pb2.SessionPty(term="xterm", width=80, height=24)
    s = await opened(guest_node, muxes(), shell=poolnode_pb2.SessionShell(), pty=pty)
    await s.put(window_change=poolnode_pb2.SessionWindowChange(width=132, height=43))
    await s.send(b"stty size; tty\n")
    await s.seen(b"43 132")
    await s.seen(b"/dev/pts/")
    # Interrupt only once `sleep` itself runs in the terminal's foreground: a ^C the
    # terminal sees while the line waits for the shell flushes it instead, and one that
    # comes while dash forks the command can reach the child before it resets its
    # handlers, which exec then forgets (sleep runs on; seen about once in 15 runs).
    await s.send(b"sleep 60\n")
    await until(lambda: foreground_sleep(b"60"))
    await s.send(b"\x03")  # ^C through the guest's terminal
    await s.send(b"echo after-$?\n")
    await s.seen(b"after-130")
    await s.send(b"exit 7\n")
    await s.until_end()
    assert s.exit_status == 7


def foreground_sleep(seconds: bytes) -> bool:
    """Whether a ``sleep <seconds>`` of this test's shells runs in its terminal's foreground."""
    for proc in Path("/proc").iterdir():
        try:
            if (proc / "cmdline").read_bytes() != b"sleep\0" + seconds + b"\0":
                continue
            # After the command's name: state ppid pgrp session tty_nr tpgid ...
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError):
            continue  # not a process, or gone meanwhile
        if fields[2] == fields[5] and _descends_from_us(int(fields[1])):
            return True
    return False


def _descends_from_us(pid: int) -> bool:
    """Whether ``pid`` is this process or one of its descendants."""
    while pid > 1:
        if pid == os.getpid():
            return True
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            return False
    return False


async def test_a_signal_ends_a_command_with_its_exit_signal(
    guest_node: GuestNode, muxes: MuxFactory
) -> None:
    s = await opened(guest_node, muxes(), exec=b"echo started; exec sleep 60")
    await s.seen(b"started")
    await s.put(signal="TERM")
    await s.until_end()
    assert s.exit_signal == "TERM" and s.exit_status is None


async def test_output_never_passes_the_sensors_credit_and_backpressure_reaches_the_guest(
    guest_node: GuestNode, muxes: MuxFactory
) -> None:
    size = 16 << 20
    s = await opened(
        guest_node, muxes(), window=256 * 1024, exec=f"head -c {size} /dev/zero".encode()
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


async def test_output_that_waited_for_credit_goes_out_in_large_frames(
    guest_node: GuestNode, muxes: MuxFactory
) -> None:
    size = 8 << 20
    window = 256 * 1024
    s = await opened(guest_node, muxes(), window=window, exec=f"head -c {size} /dev/zero".encode())
    while s.received < window:
        await s.next_frame()
    # The guest goes on sending into the node's channel window (asyncssh's 2 MiB).
    await until(lambda: guest_node.sshd.bytes_out >= window + (1 << 20))
    before = len(s.data_sizes)
    await s.grant(size)
    await s.until_end(keep_granting=False)
    assert s.received == size and s.exit_status == 0
    # What waited arrives joined into frames of the node's limit, not packet by packet.
    assert max(s.data_sizes) <= MAX_DATA
    assert all(part > MAX_DATA // 2 for part in s.data_sizes[before : before + 4])


async def test_input_is_taken_within_the_nodes_window(
    guest_node: GuestNode, muxes: MuxFactory
) -> None:
    s = await opened(guest_node, muxes(), exec=b"wc -c")
    payload = bytes(range(256)) * (32 * 1024)  # 8 MiB: eight times the node's window
    reading = asyncio.create_task(s.until_end())
    await s.send(payload)
    await s.put(eof=poolnode_pb2.SessionEof())
    await reading
    assert s.stdout().strip() == str(len(payload)).encode()
    assert s.frames.count("window_adjust") >= 7


async def test_sessions_of_one_lease_reuse_the_warm_login(
    guest_node: GuestNode, muxes: MuxFactory
) -> None:
    sensor = guest_node.sensor
    mux = muxes()
    first = (await sensor.acquire("203.0.113.5")).lease
    for _ in range(3):
        s = mux.session()
        await s.open(first.id, exec=b"true")
        await s.until_end()
        assert s.exit_status == 0
    await sensor.release(first.id)
    again = (await sensor.acquire("203.0.113.5")).lease  # the attacker comes back
    assert again.guest == first.guest
    s = muxes().session()  # another stream of the same sensor's: the same login too
    await s.open(again.id, exec=b"true")
    await s.until_end()
    assert guest_node.sshd.connections == 1


async def test_sessions_need_the_sensors_own_live_lease_and_a_refusal_ends_only_that_session(
    guest_node: GuestNode, muxes: MuxFactory
) -> None:
    sensor = guest_node.sensor
    lease = (await sensor.acquire("203.0.113.5")).lease
    mine, theirs = muxes(), muxes("s2")
    held = mine.session()
    await held.open(lease.id, exec=b"cat")
    refused = {
        "another sensor's lease": (theirs, lease.id, Code.SESSION_ERROR_CODE_PERMISSION_DENIED),
        "an unknown lease": (mine, "no-such-lease", Code.SESSION_ERROR_CODE_NOT_FOUND),
    }
    for what, (mux, lease_id, code) in refused.items():
        with pytest.raises(Refused) as e:
            await mux.session().open(lease_id, exec=b"true")
        assert e.value.code == code, what
    # Both streams go on, and the session held on one of them.
    await held.send(b"still here\n")
    await held.seen(b"still here\n")
    s = mine.session()
    await s.open(lease.id, shell=poolnode_pb2.SessionShell())
    await sensor.release(lease.id)
    await s.until_end()  # releasing the lease closes its sessions
    assert s.exit_status is None and s.lost == ""
    await held.until_end()
    assert mine.ended is None and theirs.ended is None


async def test_losing_the_guest_ends_its_sessions_saying_why(
    guest_node: GuestNode, muxes: MuxFactory
) -> None:
    s = await opened(guest_node, muxes(), shell=poolnode_pb2.SessionShell())
    guest_node.sshd.disconnect()
    await s.until_end()
    assert s.lost is not None and "lost its SSH login" in s.lost
    assert s.exit_status is None


async def test_a_lease_that_ends_as_its_guest_goes_ends_its_sessions_as_ended_not_lost(
    guest_node: GuestNode, muxes: MuxFactory
) -> None:
    lease = (await guest_node.sensor.acquire("203.0.113.5")).lease
    s = muxes().session()
    await s.open(lease.id, shell=poolnode_pb2.SessionShell())
    # The guest's login drops while the channel the lease's end closes is still closing,
    # as when a guest is reset right after its lease: the session ended with its lease.
    await guest_node.node.pool.release(lease.id, "test")
    guest_node.sshd.disconnect()
    await s.until_end()
    assert s.lost == "" and s.exit_status is None


async def test_input_past_the_window_ends_only_that_session(
    guest_node: GuestNode, muxes: MuxFactory
) -> None:
    mux = muxes()
    other = await opened(guest_node, mux, exec=b"cat")
    s = await opened(guest_node, mux, exec=b"cat")
    too_much = b"x" * (s.input_window + 1)
    await s.put(data=poolnode_pb2.SessionData(data=too_much))
    await s.until_end()
    assert s.error is not None
    assert s.error.code == poolnode_pb2.SESSION_ERROR_CODE_INVALID_ARGUMENT
    # The other session on the stream carries on, and frames of the ended one are dropped.
    await s.put(data=poolnode_pb2.SessionData(data=b"late\n"))
    await other.send(b"alive\n")
    await other.put(eof=poolnode_pb2.SessionEof())
    await other.until_end()
    assert (other.stdout(), other.exit_status) == (b"alive\n", 0)
    assert mux.ended is None


async def test_a_session_flooding_without_credit_holds_up_no_other_on_the_stream(
    guest_node: GuestNode, muxes: MuxFactory
) -> None:
    mux = muxes()
    size = 8 << 20
    flood = await opened(guest_node, mux, exec=f"head -c {size} /dev/zero".encode())
    # The flood is granted no credit back for now: its guest channel soon stops, the
    # stream does not.
    while flood.received < flood.granted:
        await flood.next_frame()
    shell = await opened(guest_node, mux, exec=b"cat")
    for n in range(20):
        await shell.send(b"line %d\n" % n)
        await shell.seen(b"line %d\n" % n)
    await shell.put(eof=poolnode_pb2.SessionEof())
    await shell.until_end()
    await flood.grant(flood.received)
    await flood.until_end()
    assert (flood.received, flood.exit_status) == (size, 0)
    assert shell.exit_status == 0 and mux.ended is None


async def test_session_ids_must_increase_on_a_stream(
    guest_node: GuestNode, muxes: MuxFactory
) -> None:
    mux = muxes()
    s = await opened(guest_node, mux, exec=b"cat")
    mux.last_id -= 1  # the next session takes the same id again
    again = mux.session()
    await mux.outbox.put(
        Request(session_id=again.id, open=poolnode_pb2.SessionOpen(lease_id="x", window=1))
    )
    await s.until_end()  # the stream ends, and every session on it
    assert mux.ended is not None
    assert mux.ended.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_stream_that_breaks_closes_all_its_sessions_on_the_guest(
    guest_node: GuestNode, muxes: MuxFactory
) -> None:
    mux = muxes()
    for _ in range(3):
        await opened(guest_node, mux, exec=b"cat")
    await until(lambda: guest_node.sshd.running() == 3)
    mux.call.cancel()  # the sensor went away
    await until(lambda: guest_node.sshd.running() == 0)
    await until(lambda: tunnels(guest_node.node) == 0)


async def test_sessions_past_openssh_maxsessions_get_a_further_login(
    guest_node: GuestNode, muxes: MuxFactory
) -> None:
    lease = (await guest_node.sensor.acquire("203.0.113.5")).lease
    mux = muxes()
    held = []
    for _ in range(SESSIONS_PER_LOGIN + 1):
        s = mux.session()
        await s.open(lease.id, exec=b"cat")
        held.append(s)
    assert guest_node.sshd.connections == 2  # the warm login and one more
    for s in held:
        await s.send(b"alive\n")
        await s.put(eof=poolnode_pb2.SessionEof())
        await s.until_end()
        assert (s.stdout(), s.exit_status) == (b"alive\n", 0)
    # The extra login went with its last session; the warm one stays.
    await until(lambda: len(guest_node.sshd.live()) == 1)
    await mux.close()  # the sensor half-closes an idle stream: the node ends it
    assert mux.ended is None
