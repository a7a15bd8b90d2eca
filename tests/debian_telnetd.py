"""Debian's inetutils telnetd on loopback, started per connection as inetd would.

``/usr/sbin/telnetd`` (package inetutils-telnetd) has no listening mode of its own: it
speaks on its standard input and output. :class:`DebianTelnetd` accepts on 127.0.0.1
and hands each accepted socket to a new telnetd, as inetd does. Needs root (telnetd
runs ``login``); a test without it or the package fails in CI and skips elsewhere.
"""

from __future__ import annotations

import asyncio
import os
import socket

from tests.conftest import require_tool, unmet


class DebianTelnetd:
    """inetd for one service on 127.0.0.1; ``start`` then ``stop``."""

    def __init__(self) -> None:
        self.port = 0
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._processes: set[asyncio.subprocess.Process] = set()

    async def start(self) -> int:
        """Listen; returns the port."""
        self._telnetd = require_tool("telnetd", "inetutils-telnetd")
        if os.geteuid() != 0:
            unmet("Debian's telnetd needs root here (it runs login)")
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._accepting = asyncio.create_task(self._accept())
        return self.port

    async def _accept(self) -> None:
        """One telnetd per connection, on the socket as its stdin and stdout."""
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._listener)
            with conn:
                process = await asyncio.create_subprocess_exec(
                    self._telnetd, stdin=conn.fileno(), stdout=conn.fileno(),
                    stderr=asyncio.subprocess.DEVNULL,
                )  # fmt: skip
            self._processes.add(process)

    async def stop(self) -> None:
        """Stop accepting and end every telnetd (and so their logins)."""
        if self._accepting is not None:
            self._accepting.cancel()
        if self._listener is not None:
            self._listener.close()
        for process in self._processes:
            if process.returncode is None:
                process.kill()
            await process.wait()
