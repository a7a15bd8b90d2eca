"""Probes that show how a Telnet server negotiates, for comparing the sensor with telnetd.

A probe connects, reads until the server is quiet, answers every option command the
way its policy says, and repeats: the result is the server's rounds of option commands
and subnegotiations, named ("WILL SGA", "SB TTYPE 01"), and whether it showed any text.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from xml.etree import ElementTree

from telnetlib3.telopt import name_command

from tests.terminal import Terminal

IAC, SB, SE = 255, 250, 240
WILL, WONT, DO, DONT = 251, 252, 253, 254
COMMANDS = {WILL: "WILL", WONT: "WONT", DO: "DO", DONT: "DONT"}
# How a client answers a server's DO and WILL.
REFUSE = {DO: WONT, WILL: DONT}
AGREE = {DO: WILL, WILL: DO}


def option_name(option: int) -> str:
    """telnetlib3's name of an option, or its number."""
    name = name_command(bytes([option]))
    return str(option) if name.startswith("b'") else name


@dataclass(frozen=True)
class Negotiation:
    """What a server sent: option commands round by round, and its text."""

    rounds: list[list[str]]
    text: bytes


def parse(chunk: bytes) -> tuple[list[tuple[int, int]], list[str], bytes]:
    """(option commands, their names and subnegotiations in order, plain text) of a chunk."""
    commands: list[tuple[int, int]] = []
    names: list[str] = []
    text = bytearray()
    i = 0
    while i < len(chunk):
        if chunk[i] != IAC or i + 1 >= len(chunk):
            text.append(chunk[i])
            i += 1
        elif chunk[i + 1] in COMMANDS and i + 2 < len(chunk):
            commands.append((chunk[i + 1], chunk[i + 2]))
            names.append(f"{COMMANDS[chunk[i + 1]]} {option_name(chunk[i + 2])}")
            i += 3
        elif chunk[i + 1] == SB:
            end = chunk.find(bytes([IAC, SE]), i)
            end = len(chunk) if end < 0 else end
            names.append(f"SB {option_name(chunk[i + 2])} {chunk[i + 3 : end].hex()}".rstrip())
            i = end + 2
        else:
            i += 2
    return commands, names, bytes(text)


async def negotiate(
    port: int,
    answers: dict[int, int] | None,
    *,
    quiet: float = 0.8,
    settle: float = 3.0,
    max_rounds: int = 8,
    first: bytes = b"",
) -> Negotiation:
    """Connect, send ``first``, then read and answer (None: stay silent) round by round.

    A round ends when the server is quiet for ``quiet`` seconds; after the last one, what
    comes within ``settle`` seconds more (a server that gives up waiting) is one more.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    rounds: list[list[str]] = []
    text = b""
    writer.write(first)
    try:
        for _ in range(max_rounds):
            chunk = await _quiet_read(reader, quiet)
            if not chunk:
                break
            commands, names, shown = parse(chunk)
            rounds.append(names)
            text += shown
            if len(rounds) == max_rounds:
                break
            if answers is not None:
                writer.write(
                    b"".join(
                        bytes([IAC, answers[command], option])
                        for command, option in commands
                        if command in answers
                    )
                )
        if tail := await _quiet_read(reader, settle):
            _, names, shown = parse(tail)
            rounds.append(names)
            text += shown
    finally:
        writer.close()
    return Negotiation(rounds, text)


async def _quiet_read(reader: asyncio.StreamReader, quiet: float) -> bytes:
    """Bytes until the server is quiet for ``quiet`` seconds (or closes)."""
    out = b""
    try:
        while True:
            async with asyncio.timeout(quiet):
                chunk = await reader.read(65536)
            if not chunk:
                return out
            out += chunk
    except TimeoutError:
        return out


async def through_client(port: int, telnet: str, *, login: bytes = b"root\r") -> Negotiation:
    """What a server sends Debian's telnet client (on a pty) up to its password prompt.

    The client connects through a recording relay on loopback, and ``login`` is typed
    at the login prompt. The result is one round: every option command and
    subnegotiation the server sent, in order; the text is everything else it sent,
    NUL bytes and greeting included.
    """
    sent = bytearray()
    relayed: set[asyncio.Task[None]] = set()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", port)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: bool) -> None:
            while data := await src.read(65536):
                if record:
                    sent.extend(data)
                dst.write(data)
            dst.close()

        await asyncio.gather(pump(reader, server_writer, False), pump(server_reader, writer, True))

    def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(relay(reader, writer))
        relayed.add(task)

    proxy = await asyncio.start_server(accepted, "127.0.0.1", 0)
    proxy_port = proxy.sockets[0].getsockname()[1]
    term = await Terminal.spawn(telnet, "127.0.0.1", str(proxy_port))
    try:
        await term.expect(rb"login: ")
        term.send(login)
        await term.expect(rb"Password: ")
    finally:
        await term.close()
        proxy.close()
        for task in relayed:
            task.cancel()
        await asyncio.gather(*relayed, return_exceptions=True)
    _, names, text = parse(bytes(sent))
    return Negotiation([names], text)


async def first_read(port: int) -> bytes:
    """What one read returns as soon as the server sends anything after the connection.

    A blocking read in a thread wakes at the first segment, as nmap's does: a server
    that writes a round in pieces shows only its first piece here.
    """

    def read() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5.0) as sock:
            return sock.recv(65536)

    return await asyncio.to_thread(read)


async def nmap_service(port: int, nmap: str) -> dict[str, str]:
    """What ``nmap -sV`` (default intensity) makes of a port: its <service> attributes."""
    process = await asyncio.create_subprocess_exec(
        nmap, "-sV", "-Pn", "-n", "-p", str(port), "-oX", "-", "127.0.0.1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    out, _ = await process.communicate()
    # nmap's own report of a scan of our own port, not untrusted input.
    service = ElementTree.fromstring(out).find("host/ports/port/service")  # noqa: S314
    assert service is not None, out
    # The fingerprint nmap would ask to have submitted differs by time and port.
    return {k: v for k, v in service.attrib.items() if k not in ("servicefp", "conf")}
