"""Probes that show what an SSH server says, for comparing the sensor with OpenSSH.

Each probe is what a scanner sends (a version line, a KEXINIT request, an ``ssh -v``
login, repeated wrong passwords, malformed first lines, DH group exchange requests, an
early NEWKEYS) and returns what the server sent back, in a form two servers can be
compared by.
"""

from __future__ import annotations

import asyncio
import os
import re
import struct
import time
from dataclasses import dataclass

import asyncssh

from sensor.ssh.cleartext import parse_kexinit
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
    """The server's identification line and its KEXINIT lists (server to client)."""

    banner: str
    kex: list[str]
    host_key: list[str]
    encryption: list[str]
    mac: list[str]
    compression: list[str]


async def hello(port: int) -> ServerHello:
    """The banner and first KEXINIT the server answers an OpenSSH version line with."""
    data = await exchange(port, CLIENT_VERSION)
    banner, _, packet = data.partition(b"\r\n")
    length = int.from_bytes(packet[:4], "big")
    padding = packet[4]
    kexinit = parse_kexinit(packet[5 : 4 + length - padding])
    assert kexinit is not None, data
    return ServerHello(
        banner.decode(),
        kexinit.kex,
        kexinit.host_key,
        kexinit.encryption,
        kexinit.mac,
        kexinit.compression,
    )


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
    seconds_per_failure: float


async def wrong_passwords(port: int, limit: int = 10) -> Refusal:
    """Try wrong passwords (at most ``limit``) until the server disconnects."""
    tries = 0

    class Persistent(asyncssh.SSHClient):
        def password_auth_requested(self) -> str:
            nonlocal tries
            tries += 1
            return "wrong-password" if tries <= limit else ""

    started = time.monotonic()
    try:
        async with asyncio.timeout(60):
            await asyncssh.connect(
                "127.0.0.1", port, username="nobody", known_hosts=None, client_keys=None,
                agent_path=None, client_factory=Persistent, preferred_auth="password",
            )  # fmt: skip
    except asyncssh.DisconnectError as e:
        elapsed = time.monotonic() - started
        return Refusal(tries, e.code, e.reason, elapsed / max(tries, 1))
    raise AssertionError("logged in with a wrong password")


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
