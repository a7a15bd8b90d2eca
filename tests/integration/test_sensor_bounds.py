"""Every bound of an internet-facing sensor holds, and the sensor keeps serving others.

Each test starts a fleet (tests/integration/ssh_fleet.py) with one bound set small,
pushes a client past it, checks the refusal or disconnection and its event, and shows
another client being served meanwhile. Waits are bounded in count and time; nothing
asserts on wall-clock durations.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncssh
import pytest

from sensor.ssh.channels import ENV_KEPT_MAX, MAX_ENV
from sensor.ssh.guest import WINDOW as OUTPUT_CREDIT
from tests.conftest import until
from tests.integration.ssh_fleet import Fleet, FleetFactory, connect, ssh

BANNER = b"SSH-2.0-OpenSSH_9.2p1"
CLIENT_VERSION = b"SSH-2.0-scanner\r\n"
# What OpenSSH 9.2 writes to a connection it refuses, before its FIN.
REFUSAL = b"Exceeded MaxStartups\r\n"
# asyncio reads at most this much at once: a write-buffer bound can be overshot by one read.
READ_CHUNK = 256 * 1024

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def silent(fleet: Fleet, source: str = "127.0.0.1") -> Stream:
    """A TCP connection that reads the sensor's banner and then says nothing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", fleet.port, local_addr=(source, 0))
    async with asyncio.timeout(20):
        assert (await reader.readline()).startswith(BANNER)
    return reader, writer


async def until_closed(reader: asyncio.StreamReader, timeout: float = 30.0) -> bytes:
    """What the sensor sends until it closes the connection (a reset counts as closed)."""
    received = bytearray()
    async with asyncio.timeout(timeout):
        with contextlib.suppress(ConnectionResetError):
            while data := await reader.read(65536):
                received += data
    return bytes(received)


async def refused(fleet: Fleet, source: str) -> bool:
    """Whether a new connection from ``source`` is refused as OpenSSH refuses: no banner."""
    reader, writer = await asyncio.open_connection("127.0.0.1", fleet.port, local_addr=(source, 0))
    try:
        return await until_closed(reader) == REFUSAL
    finally:
        writer.close()


async def served(fleet: Fleet, source: str = "127.0.0.1") -> bool:
    """Whether a full OpenSSH session (login, guest, command) works from ``source``."""
    code, out, _ = await ssh(fleet, "echo served", source=source)
    return (code, out) == (0, b"served\n")


def refusal_reasons(fleet: Fleet) -> list[str]:
    """Reasons of the refusal events so far."""
    return [e["reason"] for e in fleet.events("honeyfleet.session.refused")]


def close_all(*streams: Stream) -> None:
    """Close raw test connections."""
    for _, writer in streams:
        writer.close()


async def test_connections_per_address_are_bounded(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet(max_connections_per_ip=2, refusal_event_interval=0.0)
    held = [await silent(fleet) for _ in range(2)]
    assert await refused(fleet, "127.0.0.1")
    await until(lambda: refusal_reasons(fleet) == ["max_connections_per_ip"])
    assert await served(fleet, source="127.0.0.2")
    close_all(*held)
    await until(lambda: len(fleet.closed_reasons()) == 3 and fleet.connections() == 0)
    assert await served(fleet)  # the address may connect again


async def test_connections_in_total_are_bounded(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet(
        max_connections=3, max_connections_per_ip=3, refusal_event_interval=0.0
    )
    session = await connect(fleet, source="127.0.0.2")
    held = [await silent(fleet, "127.0.0.3"), await silent(fleet, "127.0.0.4")]
    assert await refused(fleet, "127.0.0.5")
    await until(lambda: refusal_reasons(fleet) == ["max_connections"])
    # The sessions already in keep working.
    result = await session.run("echo still here", check=True)
    assert result.stdout == "still here\n"
    close_all(held[0])
    await until(lambda: len(fleet.closed_reasons()) == 1 and fleet.connections() == 2)
    assert await served(fleet, source="127.0.0.5")
    close_all(held[1])
    session.close()


async def test_unauthenticated_connections_are_bounded_like_maxstartups(
    make_fleet: FleetFactory,
) -> None:
    fleet = await make_fleet(max_startups="2:100:2", refusal_event_interval=0.0)
    # A logged-in session does not count against the limit.
    session = await connect(fleet, source="127.0.0.2")
    held = [await silent(fleet, "127.0.0.3"), await silent(fleet, "127.0.0.4")]
    # A source holding as much as the greediest is refused (one holding less would
    # evict the oldest of the greediest: tests/integration/test_sensor_admission.py).
    assert await refused(fleet, "127.0.0.3")
    await until(lambda: refusal_reasons(fleet) == ["max_startups"])
    result = await session.run("echo logged in", check=True)
    assert result.stdout == "logged in\n"
    close_all(held[0])
    await until(lambda: len(fleet.closed_reasons()) == 1 and fleet.connections() == 2)
    assert await served(fleet, source="127.0.0.3")
    close_all(held[1])
    session.close()


async def test_login_grace_time_ends_connections_that_never_log_in(
    make_fleet: FleetFactory,
) -> None:
    fleet = await make_fleet(lease_timeout=2.0, guest_login_timeout=3.0, login_grace_time=6.0)
    held = [await silent(fleet) for _ in range(2)]
    assert await served(fleet, source="127.0.0.2")  # while those two wait
    for reader, _ in held:
        await until_closed(reader)
    await until(lambda: len(fleet.closed_reasons()) == 3)
    assert fleet.closed_reasons().count("not logged in after 6s") == 2
    # Connections that never logged in never asked for a lease: one login, one lease.
    assert len(fleet.events("cowrie.login.success")) == 1
    assert len({e["lease"] for e in fleet.events() if "lease" in e}) == 1
    close_all(*held)


async def test_auth_attempts_per_connection_are_bounded(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet(max_auth_attempts=2)

    class Persistent(asyncssh.SSHClient):
        def password_auth_requested(self) -> str:
            return "root"  # root:x:!root, again and again

    with pytest.raises((asyncssh.Error, OSError)):
        async with asyncio.timeout(30):
            await asyncssh.connect(
                "127.0.0.1", fleet.port, username="root", known_hosts=None, client_keys=None,
                agent_path=None, client_factory=Persistent, preferred_auth="password",
            )  # fmt: skip
    await until(lambda: fleet.closed_reasons() == ["too many authentication failures"])
    assert len(fleet.events("cowrie.login.failed")) == 2
    assert await served(fleet)


async def test_declared_packet_length_is_bounded_before_anything_is_buffered(
    make_fleet: FleetFactory,
) -> None:
    fleet = await make_fleet(max_packet_size=8192)
    reader, writer = await asyncio.open_connection("127.0.0.1", fleet.port)
    writer.write(CLIENT_VERSION + (1_000_000).to_bytes(4, "big") + b"\x04")
    await until_closed(reader)
    await until(lambda: fleet.closed_reasons() == ["packet of 1000000 bytes declared"])
    assert await served(fleet)
    writer.close()


async def test_bytes_before_login_are_bounded(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet(max_preauth_bytes=20_000, max_packet_size=8192)
    reader, writer = await asyncio.open_connection("127.0.0.1", fleet.port)
    writer.write(CLIENT_VERSION)
    # SSH_MSG_IGNORE packets of a legal size (and block-aligned), more than the bound allows.
    payload = b"\x02" + (7985).to_bytes(4, "big") + bytes(7985)
    ignore = (1 + len(payload) + 5).to_bytes(4, "big") + b"\x05" + payload + bytes(5)
    assert len(ignore) % 8 == 0
    with contextlib.suppress(ConnectionError):
        for _ in range(5):
            writer.write(ignore)
            await writer.drain()
    await until_closed(reader)
    await until(lambda: fleet.closed_reasons() == ["more than 20000 bytes before login"])
    assert await served(fleet)
    writer.close()


class StallingProxy:
    """A loopback TCP relay to the sensor whose sensor-to-client direction can be stopped.

    Stopped, it reads nothing from the sensor, like an attacker that never reads: the
    kernel's buffers fill and whatever more the sensor sends stays in the sensor.
    """

    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self.flowing = asyncio.Event()
        self.flowing.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        """Listen on 127.0.0.1; the port."""
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop relaying."""
        for task in self._tasks:
            task.cancel()
        if self._server is not None:
            self._server.close()

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        """Relay one connection both ways."""
        sensor_r, sensor_w = await asyncio.open_connection("127.0.0.1", self._target)
        for task in (
            asyncio.create_task(self._pipe(client_r, sensor_w, gated=False)),
            asyncio.create_task(self._pipe(sensor_r, client_w, gated=True)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, gated: bool
    ) -> None:
        """Copy until EOF; the gated direction waits while the proxy is stopped."""
        with contextlib.suppress(ConnectionError):
            while True:
                if gated:
                    await self.flowing.wait()
                data = await source.read(65536)
                if not data:
                    break
                sink.write(data)
                await sink.drain()
        sink.close()


async def test_a_client_that_never_reads_holds_at_most_the_write_buffer(
    make_fleet: FleetFactory,
) -> None:
    high = 256 * 1024
    total = 32 * 1024 * 1024
    fleet = await make_fleet(write_buffer_high=high, idle_timeout=300.0)
    proxy = StallingProxy(fleet.port)
    port = await proxy.start()
    try:
        conn = await asyncssh.connect(
            "127.0.0.1", port, username="root", password="toor", known_hosts=None,
            client_keys=None, agent_path=None, preferred_auth="password",
        )  # fmt: skip
        # A window larger than the whole output: only the sensor's own bound can stop it.
        process = await conn.create_process(
            f"head -c {total} /dev/zero", encoding=None, window=2 * total
        )
        proxy.flowing.clear()
        (attacker,) = fleet.sensor.admission.connections  # type: ignore[union-attr]
        backlog: list[int] = []

        def backed_up() -> bool:
            backlog.append(attacker.client_backlog)
            return backlog[-1] >= high

        # The backlog crossing its high-water mark is what pauses the guest's output.
        await until(backed_up, 60)
        # Held from then on: while another client is served, the backlog stays within the
        # mark plus what was in flight when it was crossed (one read, and the output credit
        # the pool node held: asyncssh writes straight into the attacker's transport) and
        # the guest does not finish.
        assert await served(fleet, source="127.0.0.2")
        backlog.append(attacker.client_backlog)
        out = fleet.guest.bytes_out
        assert out < total, "the guest finished: the client's stall did not reach it"
        assert high <= max(backlog) <= high + READ_CHUNK + OUTPUT_CREDIT
        # The client reads again: every byte arrives, none was dropped.
        proxy.flowing.set()
        received = 0
        async with asyncio.timeout(120):
            while data := await process.stdout.read(1 << 20):
                received += len(data)
        assert received == total
        conn.close()
    finally:
        await proxy.stop()


async def test_idle_sessions_are_closed(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet(idle_timeout=1.0)
    code, out, _ = await ssh(fleet, "echo started; sleep 60; echo finished")
    assert out == b"started\n" and code != 0
    assert await served(fleet, source="127.0.0.2")
    await until(lambda: len(fleet.closed_reasons()) == 2)
    assert "idle for 1s" in fleet.closed_reasons()


async def test_session_time_is_bounded(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet(session_timeout=6.0)
    session = await connect(fleet)
    process = await session.create_process("echo started; sleep 60; echo finished")
    assert await served(fleet, source="127.0.0.2")  # meanwhile
    async with asyncio.timeout(30):
        output = await process.stdout.read()
        await session.wait_closed()
    assert output == "started\n"
    await until(lambda: "session time limit reached" in fleet.closed_reasons())


async def test_channels_per_connection_are_bounded(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet(max_channels=2)
    session = await connect(fleet)
    first = await session.create_process("cat")
    second = await session.create_process("cat")
    with pytest.raises(asyncssh.ChannelOpenError):
        await session.create_process("cat")
    # The open channels keep working, and so does another connection.
    first.stdin.write("one\n")
    second.stdin.write("two\n")
    async with asyncio.timeout(20):
        assert await first.stdout.readline() == "one\n"
        assert await second.stdout.readline() == "two\n"
    assert await served(fleet, source="127.0.0.2")
    # A closed channel makes room for a new one (once the sensor has seen it close).
    first.stdin.write_eof()
    async with asyncio.timeout(20):
        await first.wait_closed()
    for _ in range(50):
        try:
            third = await session.create_process("echo third")
            break
        except asyncssh.ChannelOpenError:
            await asyncio.sleep(0.1)
    else:
        pytest.fail("no channel could be opened after one was closed")
    async with asyncio.timeout(20):
        assert await third.stdout.read() == "third\n"
    session.close()


# Just past the bound, and a flood so long that the bound is crossed reads before the
# command's request arrives: either way the first variables are events.
@pytest.mark.parametrize("extra", [50, 3000])
async def test_environment_requests_kept_by_asyncssh_are_bounded(
    make_fleet: FleetFactory, extra: int
) -> None:
    fleet = await make_fleet()
    session = await connect(fleet)
    env = {f"VAR{n}": "x" * 100 for n in range(ENV_KEPT_MAX + extra)}
    # The sensor checks as input arrives: keep typing until it hangs up (after a long
    # flood, before the command even starts).
    with contextlib.suppress(asyncssh.Error, OSError, BrokenPipeError):
        async with asyncio.timeout(30):
            process = await session.create_process("cat", env=env)
            for _ in range(100):
                process.stdin.write("more input\n")
                await process.stdout.readline()
                await asyncio.sleep(0.05)
    await until(
        lambda: fleet.closed_reasons() == [f"more than {ENV_KEPT_MAX} environment variables"]
    )
    # Only the first few became events; the guest got no more than those either.
    assert len(fleet.events("cowrie.client.var")) == MAX_ENV
    assert await served(fleet)


async def test_a_spool_near_its_bound_refuses_new_sessions_and_keeps_running_ones(
    make_fleet: FleetFactory,
) -> None:
    fleet = await make_fleet(
        spool_max_bytes=60_000, spool_near_full=0.5, refusal_event_interval=0.0
    )
    spool = fleet.sensor.spool
    assert spool is not None
    session = await connect(fleet)
    await fleet.controller.stop(grace=0)  # from now on nothing leaves the spool
    for n in range(500):  # bounded: each command adds at least one event
        if spool.near_full:
            break
        await session.run(f"echo {n}", check=True)
    assert spool.near_full
    assert await refused(fleet, "127.0.0.2")
    await until(lambda: refusal_reasons(fleet) == ["spool_near_full"])
    # The session already running keeps working, and none of its events is dropped.
    result = await session.run("echo still served", check=True)
    assert result.stdout == "still served\n"
    await until(lambda: fleet.events("cowrie.command.input")[-1]["input"] == "echo still served")
    assert spool.dropped == 0
    session.close()


async def test_what_an_attacker_sends_reaches_no_log_through_asyncssh(
    make_fleet: FleetFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # asyncssh logs at INFO, unbounded, what clients name: a forward's originator (up
    # to a packet, for every forward), usernames, commands. The events keep them, bounded.
    caplog.set_level(logging.INFO)
    fleet = await make_fleet()
    marker = "o" * 5000
    session = await connect(fleet)
    with contextlib.suppress(asyncssh.ChannelOpenError, OSError):
        _, writer = await session.open_connection("127.0.0.1", 9, orig_host=marker, orig_port=1)
        writer.close()
    await session.run("true")
    session.close()
    assert not [r.name for r in caplog.records if marker in r.getMessage()]


async def test_channels_refused_again_and_again_are_logged_once(
    make_fleet: FleetFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    fleet = await make_fleet(max_channels=1)
    session = await connect(fleet)
    held = await session.create_process("cat")
    for _ in range(20):
        with pytest.raises(asyncssh.ChannelOpenError):
            await session.create_process("cat")
    held.stdin.write_eof()
    session.close()
    assert len([r for r in caplog.records if "refused a channel" in r.getMessage()]) == 1
