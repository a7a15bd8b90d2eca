"""A loopback Telnet "guest" for fast tests: a small telnetd with a login and a real shell.

It negotiates like busybox telnetd (``DO ECHO, DO NAWS, WILL ECHO, WILL SGA``); with
``environ=True`` it also asks for the client's environment and, given ``USER``, skips to
the password prompt as Ubuntu's telnetd does. It prints its banner and
``<hostname> login: ``, reads the username (echoed) and the password (not echoed), and
either says ``Login incorrect`` and asks again (``tries`` times) or runs ``/bin/sh -i``
on a pty and relays it. ``newline`` is how its login lines end: ``\\r\\n``, ``\\r\\0``
(as the Ubuntu 18 telnetd in the seeds did) or a bare ``\\n``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import struct
import termios
from dataclasses import dataclass, field

PASSWORD = "guest-secret"
IAC, SB, SE, WILL, WONT, DO, DONT = 255, 250, 240, 251, 252, 253, 254
ECHO, SGA, NAWS, NEW_ENVIRON = 1, 3, 31, 39
IS, SEND, VAR, VALUE = 0, 1, 0, 1


@dataclass
class Telnetd:
    """A telnetd on 127.0.0.1 with one account; records what it was told."""

    username: str = "root"
    password: str = PASSWORD
    hostname: str = "srv04"
    banner: str = "Debian GNU/Linux 12"
    environ: bool = False
    newline: bytes = b"\r\n"
    tries: int = 3
    fail_delay: float = 0.0
    # What clients sent: every login attempt, USER values from NEW-ENVIRON, raw input.
    attempts: list[tuple[str, str]] = field(default_factory=list)
    users: list[str] = field(default_factory=list)
    received: bytearray = field(default_factory=bytearray)
    port: int = 0
    _server: asyncio.Server | None = None
    _clients: dict[asyncio.Task[None], _Connection] = field(default_factory=dict)

    @property
    def greeting(self) -> str:
        """What the sensor should show before a guest is leased, to look the same."""
        return f"{self.newline.decode()}{self.banner}{self.newline.decode()}{self.login_prompt}"

    @property
    def login_prompt(self) -> str:
        """The username prompt."""
        return f"{self.hostname} login: "

    async def start(self) -> int:
        """Listen on a free loopback port."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        """Stop listening and hang up on every client."""
        if self._server is not None:
            self._server.close()
        for conn in self._clients.values():
            conn.close()
        await asyncio.gather(*self._clients, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One client: negotiation, login, shell."""
        conn = _Connection(self, reader, writer)
        task = asyncio.current_task()
        assert task is not None
        self._clients[task] = conn
        try:
            await conn.run()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            conn.close()
            del self._clients[task]


class _Connection:
    """One client of the fake telnetd."""

    def __init__(
        self, daemon: Telnetd, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.d = daemon
        self.reader = reader
        self.writer = writer
        self.data = bytearray()
        self.user: str | None = None
        self.answered_environ = asyncio.Event()
        self.more = asyncio.Event()
        self.eof = False
        self.hangup = asyncio.Event()
        self.window = (80, 24)
        self.master: int | None = None
        self._state = "data"
        self._command = 0
        self._sb = bytearray()
        self._last_cr = False

    async def run(self) -> None:
        """Negotiate, log in, run the shell."""
        offer = [IAC, DO, ECHO, IAC, DO, NAWS, IAC, WILL, ECHO, IAC, WILL, SGA]
        if self.d.environ:
            offer += [IAC, DO, NEW_ENVIRON]
        self.writer.write(bytes(offer))
        reading = asyncio.create_task(self._read())
        try:
            if self.d.environ:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.answered_environ.wait(), 5)
            nl = self.d.newline
            self.writer.write(nl + self.d.banner.encode() + nl)
            for _ in range(self.d.tries):
                username = self.user
                self.user = None  # like login(1): the preset name is used once
                if not username:
                    self.writer.write(self.d.login_prompt.encode())
                    username = await self._line(echo=True)
                self.writer.write(b"Password: ")
                password = await self._line(echo=False)
                self.writer.write(nl)
                self.d.attempts.append((username, password))
                if (username, password) == (self.d.username, self.d.password):
                    await self._shell()
                    return
                await asyncio.sleep(self.d.fail_delay)
                self.writer.write(b"Login incorrect" + nl)
        finally:
            reading.cancel()

    async def _read(self) -> None:
        """Read the client: in-band bytes to ``data`` (or the shell), commands answered."""
        while chunk := await self.reader.read(4096):
            self.d.received += chunk
            inband = self._parse(chunk)
            if self.master is not None:
                os.write(self.master, inband)
            else:
                self.data += inband
                self.more.set()
        self.eof = True
        self.more.set()
        self.hangup.set()

    async def _line(self, *, echo: bool) -> str:
        """One line of login input, echoed or not."""
        line = bytearray()
        while True:
            while not self.data:
                if self.eof:
                    raise ConnectionError("client gone")
                self.more.clear()
                await self.more.wait()
            byte = self.data.pop(0)
            if byte == 0x0D:
                if echo:
                    self.writer.write(self.d.newline)
                return line.decode(errors="replace")
            if byte in (0x7F, 0x08):
                if line:
                    line.pop()
                    if echo:
                        self.writer.write(b"\b \b")
            elif byte >= 0x20:
                line.append(byte)
                if echo:
                    self.writer.write(bytes([byte]))

    def _parse(self, chunk: bytes) -> bytes:
        """Strip telnet commands; CR NUL and CR LF become CR, a bare LF too (as telnetd)."""
        out = bytearray()
        for byte in chunk:
            if self._state == "data":
                if byte == IAC:
                    self._state = "iac"
                elif self._last_cr and byte in (0x00, 0x0A):
                    pass
                else:
                    out.append(0x0D if byte == 0x0A else byte)
                self._last_cr = byte == 0x0D
            elif self._state == "iac":
                self._state = {SB: "sb", WILL: "opt", WONT: "opt", DO: "opt", DONT: "opt"}.get(
                    byte, "data"
                )
                self._command = byte
                self._sb.clear()
                if byte == IAC:
                    out.append(IAC)
            elif self._state == "opt":
                self._option(self._command, byte)
                self._state = "data"
            elif self._state == "sb":
                if byte == IAC:
                    self._state = "sb-iac"
                else:
                    self._sb.append(byte)
            else:  # sb-iac
                self._state = "sb" if byte == IAC else "data"
                if byte == IAC:
                    self._sb.append(IAC)
                else:
                    self._subnegotiation(bytes(self._sb))
        return bytes(out)

    def _option(self, command: int, option: int) -> None:
        """Answer the client's WILL NEW-ENVIRON with a request for USER."""
        if option == NEW_ENVIRON and command == WILL:
            request = [IAC, SB, NEW_ENVIRON, SEND, VAR, *b"USER", IAC, SE]
            self.writer.write(bytes(request))
        elif option == NEW_ENVIRON and command == WONT:
            self.answered_environ.set()

    def _subnegotiation(self, payload: bytes) -> None:
        """NAWS resizes the pty; NEW-ENVIRON IS gives USER."""
        if payload[:1] == bytes([NAWS]) and len(payload) >= 5:
            cols, rows = struct.unpack("!HH", payload[1:5])
            self.window = (cols, rows)
            self._resize()
        elif payload[:2] == bytes([NEW_ENVIRON, IS]):
            entries = payload[2:].split(bytes([VAR]))
            for entry in entries:
                name, _, value = entry.partition(bytes([VALUE]))
                if name == b"USER" and value:  # an empty value means "not set"
                    self.user = value.decode(errors="replace")
                    self.d.users.append(self.user)
            self.answered_environ.set()

    async def _shell(self) -> None:
        """/bin/sh on a pty, relayed until it exits."""
        master, slave = os.openpty()
        self.master = master
        self._resize()
        shell = await asyncio.create_subprocess_exec(
            "/bin/sh",
            "-i",
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            env={"PS1": f"{self.d.hostname}:~# ", "TERM": "xterm", "PATH": "/usr/bin:/bin"},
        )
        os.close(slave)
        if self.data:
            os.write(master, bytes(self.data))
            self.data.clear()
        loop = asyncio.get_running_loop()

        def output() -> None:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                chunk = b""
            if not chunk:
                loop.remove_reader(master)
                self.hangup.set()
                return
            self.writer.write(chunk.replace(bytes([IAC]), bytes([IAC, IAC])))

        loop.add_reader(master, output)
        try:
            await self.hangup.wait()
        finally:
            loop.remove_reader(master)
            self.master = None
            os.close(master)
            if shell.returncode is None:
                shell.kill()
            await shell.wait()

    def _resize(self) -> None:
        """Tell the pty the client's window size."""
        if self.master is not None:
            cols, rows = self.window
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def close(self) -> None:
        """Hang up (the shell, if any, is ended by its task)."""
        self.hangup.set()
        self.writer.close()
