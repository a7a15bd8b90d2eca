"""Driving interactive clients like expect(1): a transcript to wait on, and a pty program.

Real clients (Debian's telnet, OpenSSH) behave differently on a terminal, so the tests
run them on a pty and read what they show, as an attacker at a keyboard would see it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import struct
import termios


class Transcript:
    """What a client has shown so far, and waiting for a pattern to appear in it."""

    def __init__(self) -> None:
        self.output = bytearray()
        self.eof = False
        self._seen = 0
        self._more = asyncio.Event()

    def shown(self, chunk: bytes) -> None:
        """More output."""
        self.output += chunk
        self._more.set()

    def hung_up(self) -> None:
        """No more output will come."""
        self.eof = True
        self._more.set()

    async def expect(self, pattern: bytes, timeout: float = 20.0) -> re.Match[bytes]:
        """Wait for ``pattern`` in the output after the last match."""
        regex = re.compile(pattern)
        async with asyncio.timeout(timeout):
            while True:
                found = regex.search(self.output, self._seen)
                if found is not None:
                    self._seen = found.end()
                    return found
                if self.eof:
                    raise AssertionError(f"no {pattern!r} before EOF in {bytes(self.output)!r}")
                self._more.clear()
                await self._more.wait()

    async def ended(self, timeout: float = 20.0) -> None:
        """Wait until the other side has hung up."""
        async with asyncio.timeout(timeout):
            while not self.eof:
                self._more.clear()
                await self._more.wait()


class Terminal(Transcript):
    """A terminal program on a pty."""

    def __init__(self, proc: asyncio.subprocess.Process, master: int) -> None:
        super().__init__()
        self.proc = proc
        self.master = master
        asyncio.get_running_loop().add_reader(master, self._readable)

    @classmethod
    async def spawn(cls, *argv: str) -> Terminal:
        """Start ``argv`` on a fresh 80x24 pty, its controlling terminal (so ^C is SIGINT)."""
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        # setsid(1) makes a new session whose controlling terminal is the pty (-c);
        # the child is no group leader, so setsid execs in place: proc is the program.
        proc = await asyncio.create_subprocess_exec(
            "setsid",
            "-c",
            *argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env={**os.environ, "TERM": "xterm"},
        )
        os.close(slave)
        return cls(proc, master)

    def _readable(self) -> None:
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO once the program has closed the pty
            chunk = b""
        if chunk:
            self.shown(chunk)
        else:
            asyncio.get_running_loop().remove_reader(self.master)
            self.hung_up()

    def send(self, data: bytes) -> None:
        """Type."""
        os.write(self.master, data)

    async def close(self) -> None:
        """End the program."""
        with contextlib.suppress(OSError):
            asyncio.get_running_loop().remove_reader(self.master)
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()
        os.close(self.master)
