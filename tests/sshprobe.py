"""Probes that show what an SSH server says, for comparing the sensor with OpenSSH.

Each probe is what a scanner sends (a version line, a KEXINIT request, an ``ssh -v``
login, repeated wrong passwords and keys, a right password, malformed first lines, DH group exchange
requests, an early NEWKEYS, a connection that never logs in, connections past the
server's limit) and returns what the server sent back, in a form two servers can be
compared by.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from sensor.ssh.cleartext import kexinit_lists
from tests.conftest import require_tool

MSG_KEXINIT = 20
MSG_NEWKEYS = 21
MSG_KEX_DH_GEX_GROUP = 31
MSG_KEX_DH_GEX_REQUEST = 34
CLIENT_VERSION = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u10\r\n"
READ_TIMEOUT = 5.0


async def exchange(port: int, send: bytes, *, quiet_for: float = 1.0) -> bytes:
    """What the server sends after ``send``, until it closes or is quiet for ``quiet_for``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(send)
    out = b""
    try:
        while True:
            async with asyncio.timeout(quiet_for):
                chunk = await reader.read(65536)
            if not chunk:
                break
            out += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    finally:
        writer.close()
    return out


@dataclass(frozen=True)
class ServerHello:
    """The server's identification line and its KEXINIT's ten name-lists, in order."""

    banner: str
    kex: list[str]
    host_key: list[str]
    encryption_c2s: list[str]
    encryption_s2c: list[str]
    mac_c2s: list[str]
    mac_s2c: list[str]
    compression_c2s: list[str]
    compression_s2c: list[str]
    languages_c2s: list[str]
    languages_s2c: list[str]

    @property
    def hassh_server(self) -> str:
        """hasshServer: md5 of "kex;encryption;mac;compression" (server to client)."""
        lists = (self.kex, self.encryption_s2c, self.mac_s2c, self.compression_s2c)
        text = ";".join(",".join(names) for names in lists)
        return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


async def hello(port: int) -> ServerHello:
    """The banner and first KEXINIT the server answers an OpenSSH version line with."""
    data = await exchange(port, CLIENT_VERSION)
    banner, _, packet = data.partition(b"\r\n")
    length = int.from_bytes(packet[:4], "big")
    padding = packet[4]
    lists = kexinit_lists(packet[5 : 4 + length - padding])
    assert lists is not None, data
    return ServerHello(banner.decode(), *lists)


@dataclass(frozen=True)
class VerboseLogin:
    """What ``ssh -v`` reports of a password login that fails."""

    ext_info: list[str]
    auth_methods: list[str]
    # The key exchange OpenSSH's client settled on with the server.
    kex: str


async def verbose_login(port: int) -> VerboseLogin:
    """Run ``ssh -vvv`` with no key and no password; collect the kex, ext-info and auth
    methods."""
    ssh = require_tool("ssh", "openssh-client")
    process = await asyncio.create_subprocess_exec(
        ssh, "-vvv", "-p", str(port), "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "PubkeyAuthentication=no", "-F", "/dev/null", "nobody@127.0.0.1", "true",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(30):
        _, err = await process.communicate()
    text = err.decode(errors="replace")
    ext_info = re.findall(r"kex_input_ext_info: (\S+)", text)
    methods = re.findall(r"Authentications that can continue: ([^\s]+)", text)
    kex = re.findall(r"kex: algorithm: (\S+)", text)
    return VerboseLogin(ext_info, methods[0].split(",") if methods else [], kex[0] if kex else "")


@dataclass(frozen=True)
class Refusal:
    """How a server ends a connection that keeps failing passwords."""

    failures: int
    code: int
    reason: str
    # Seconds each wrong password took to be refused (the last: to the disconnect).
    waits: list[float]

    @property
    def seconds_per_failure(self) -> float:
        """The mean wait."""
        return sum(self.waits) / len(self.waits)


async def wrong_passwords(port: int, limit: int = 10) -> Refusal:
    """Try wrong passwords (at most ``limit``) until the server disconnects."""
    asked: list[float] = []

    class Persistent(asyncssh.SSHClient):
        def password_auth_requested(self) -> str:
            asked.append(time.monotonic())
            return "wrong-password" if len(asked) <= limit else ""

    return await until_disconnected(port, asked, Persistent, "password", client_keys=None)


async def wrong_keys(port: int, limit: int = 10) -> Refusal:
    """Offer fresh Ed25519 keys (at most ``limit``) until the server disconnects."""
    asked: list[float] = []

    class Persistent(asyncssh.SSHClient):
        def public_key_auth_requested(self) -> asyncssh.SSHKey | None:
            asked.append(time.monotonic())
            return asyncssh.generate_private_key("ssh-ed25519") if len(asked) <= limit else None

    return await until_disconnected(port, asked, Persistent, "publickey")


async def until_disconnected(
    port: int,
    asked: list[float],
    client: type[asyncssh.SSHClient],
    method: str,
    **options: object,
) -> Refusal:
    """Log in as nobody with ``method``, ``client`` noting in ``asked`` when each try was
    made; how the server's disconnect came."""
    try:
        async with asyncio.timeout(60):
            await asyncssh.connect(
                "127.0.0.1", port, username="nobody", known_hosts=None, agent_path=None,
                client_factory=client, preferred_auth=method, **options,
            )  # fmt: skip
    except asyncssh.DisconnectError as e:
        asked.append(time.monotonic())
        waits = [later - earlier for earlier, later in itertools.pairwise(asked)]
        return Refusal(len(asked) - 1, e.code, e.reason, waits)
    raise AssertionError(f"logged in by {method} without the right credentials")


def cleartext_packet(payload: bytes) -> bytes:
    """A cleartext binary packet around ``payload`` (block size 8, no MAC)."""
    padding = 8 - (len(payload) + 5) % 8
    if padding < 4:
        padding += 8
    return struct.pack(">IB", len(payload) + padding + 1, padding) + payload + bytes(padding)


def _string(data: bytes) -> bytes:
    """An SSH string."""
    return struct.pack(">I", len(data)) + data


# A client's KEXINIT offering only DH group exchange (then: no guessed packet follows, and
# the reserved 0).
GEX_LISTS = (
    b"diffie-hellman-group-exchange-sha256",
    b"rsa-sha2-512,rsa-sha2-256,ecdsa-sha2-nistp256,ssh-ed25519",
    b"aes128-ctr",
    b"aes128-ctr",
    b"hmac-sha2-256",
    b"hmac-sha2-256",
    b"none",
    b"none",
    b"",
    b"",
)
GEX_KEXINIT = bytes([MSG_KEXINIT]) + os.urandom(16) + b"".join(map(_string, GEX_LISTS)) + bytes(5)


async def gex_group(port: int, minimum: int, preferred: int, maximum: int) -> int | None:
    """The size in bits of the group a server picks for a DH group exchange request, or
    None if it closes instead."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = bytes([MSG_KEX_DH_GEX_REQUEST]) + struct.pack(">III", minimum, preferred, maximum)
    writer.write(CLIENT_VERSION + cleartext_packet(GEX_KEXINIT) + cleartext_packet(request))
    try:
        async with asyncio.timeout(READ_TIMEOUT):
            await reader.readline()
            while True:
                length, padding = struct.unpack(">IB", await reader.readexactly(5))
                payload = (await reader.readexactly(length - 1))[: length - 1 - padding]
                if payload[0] == MSG_KEX_DH_GEX_GROUP:
                    size = int.from_bytes(payload[1:5], "big")
                    return int.from_bytes(payload[5 : 5 + size], "big").bit_length()
                if payload[0] != MSG_KEXINIT:
                    return None
    except (asyncio.IncompleteReadError, ConnectionResetError):
        return None
    finally:
        writer.close()


async def early_newkeys(port: int) -> tuple[list[int], bool]:
    """Send NEWKEYS before any key exchange: the message numbers of the packets the server
    answers with, and whether it kept the connection open."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(CLIENT_VERSION + cleartext_packet(bytes([MSG_NEWKEYS])))
    messages: list[int] = []
    try:
        await reader.readline()
        while True:
            async with asyncio.timeout(1.0):
                length, _ = struct.unpack(">IB", await reader.readexactly(5))
                payload = await reader.readexactly(length - 1)
            messages.append(payload[0])
    except TimeoutError:
        return messages, True
    except (asyncio.IncompleteReadError, ConnectionResetError):
        return messages, False
    finally:
        writer.close()


@dataclass(frozen=True)
class Login:
    """What a server says around a password login that succeeds."""

    # The algorithms of the keys in its hostkeys-00@openssh.com after login, in its order
    # ("new ..." for one not among the keys the probe was told of).
    host_keys: list[str]
    # From connecting to logged in.
    seconds: float


async def password_login(port: int, username: str, password: str, host_keys: list[Path]) -> Login:
    """Log in with the right password, trusting ``host_keys``; what the server announces."""
    announced: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()

    def report(
        added: list[asyncssh.SSHKey],
        removed: list[asyncssh.SSHKey],
        retained: list[asyncssh.SSHKey],
        revoked: list[asyncssh.SSHKey],
    ) -> None:
        names = [key.get_algorithm() for key in retained]
        announced.set_result(names + [f"new {key.get_algorithm()}" for key in added])

    trusted = [asyncssh.read_public_key(path) for path in host_keys]
    started = time.monotonic()
    async with asyncio.timeout(60):
        conn = await asyncssh.connect(
            "127.0.0.1", port, username=username, password=password,
            known_hosts=(trusted, [], []), server_host_keys_handler=report,
            client_keys=None, agent_path=None, preferred_auth="password",
        )  # fmt: skip
    seconds = time.monotonic() - started
    try:
        async with asyncio.timeout(READ_TIMEOUT):
            names = await announced
    except TimeoutError:
        names = []
    finally:
        conn.close()
    return Login(names, seconds)


async def ending(reader: asyncio.StreamReader) -> tuple[bytes, str]:
    """The rest of what the server sends, and how it ends: "FIN" or "RST"."""
    rest = b""
    try:
        while chunk := await reader.read(65536):
            rest += chunk
    except ConnectionResetError:
        return rest, "RST"
    return rest, "FIN"


@dataclass(frozen=True)
class OverLimit:
    """How a server refuses a connection past its limit of unauthenticated ones."""

    reply: bytes
    ending: str


async def over_limit(port: int, limit: int = 150) -> OverLimit:
    """Open connections that never log in (at most ``limit``) until one is refused."""
    writers: list[asyncio.StreamWriter] = []
    try:
        for _ in range(limit):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writers.append(writer)
            try:
                async with asyncio.timeout(READ_TIMEOUT):
                    first = await reader.read(256)
            except ConnectionResetError:
                return OverLimit(b"", "RST")
            if first.startswith(b"SSH-"):
                continue  # admitted: it holds its place while the next one tries
            rest, end = await ending(reader)
            return OverLimit(first + rest, end)
        raise AssertionError(f"{limit} unauthenticated connections and none refused")
    finally:
        for writer in writers:
            writer.close()


@dataclass(frozen=True)
class Grace:
    """How a server ends a connection that does not log in."""

    # Whole seconds from connecting to the end.
    seconds: int
    # Message numbers of the (cleartext) packets the server sent after its banner.
    messages: list[int]
    ending: str


async def login_grace(port: int, bound: float = 300.0) -> Grace:
    """Connect, send a version line and nothing more; wait (at most ``bound`` seconds)."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(CLIENT_VERSION)
    try:
        async with asyncio.timeout(bound):
            await reader.readline()
            data, end = await ending(reader)
    finally:
        writer.close()
    messages = []
    while len(data) >= 5:
        length = int.from_bytes(data[:4], "big")
        messages.append(data[5])
        data = data[4 + length :]
    return Grace(int(time.monotonic() - started), messages, end)


async def first_refused(port: int, count: int = 8) -> int | None:
    """Connect ``count`` times, one after another, each trying one wrong password (as a
    brute-forcer does): the number of the first connection turned away before its banner,
    or None."""
    for number in range(1, count + 1):
        try:
            async with asyncio.timeout(60):
                await asyncssh.connect(
                    "127.0.0.1", port, username="nobody", password="wrong-password",
                    known_hosts=None, client_keys=None, agent_path=None,
                    preferred_auth="password",
                )  # fmt: skip
        except asyncssh.PermissionDenied:
            continue  # refused after a try: the server heard it
        except (asyncssh.Error, OSError):
            return number
        raise AssertionError("logged in with a wrong password")
    return None
