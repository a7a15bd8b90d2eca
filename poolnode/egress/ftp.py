"""FTP as the sinkhole speaks it: enough of RFC 959 for wget, curl and busybox ftpget.

A guest's connection to port 21 anywhere gets a server greeting, any login is taken
(user and password are reported: they are the attacker's, for the attacker's server),
and a RETR names the file: ``ftp://HOST/PATH``. Under ``sinkhole`` the answer is
``550``; under ``fetch`` the node fetches the URL through the operator's proxy and sends
it over a passive data connection. That connection is redirected to the sinkhole like
any other; the sinkhole hands it over here by the port this dialogue announced.
Commands, line lengths and waits are bounded.
"""

from __future__ import annotations

import asyncio
import posixpath
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from poolnode.egress.fetch import Download

MAX_COMMANDS = 32
MAX_LINE = 512
DATA_WAIT = 10.0
"""Seconds a RETR waits for the guest's passive data connection."""

Fetch = Callable[[str], Awaitable[Download | None]]
"""Fetch a URL (reporting the download or its failure); None when not fetched."""


@dataclass
class FtpSeen:
    """What the guest did on the control connection."""

    username: str = ""
    password: str = ""
    urls: list[str] = field(default_factory=list)


class FtpDialogue:
    """One control connection's dialogue.

    ``host`` is the address the guest connected to (passive mode points there),
    ``server`` the name its URLs get; ``open_data`` announces a passive data port and
    gives an awaitable of the guest's connection to it; ``fetch`` (None under
    ``sinkhole``) gets a RETR's file.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        host: str,
        server: str,
        timeout: float,
        open_data: Callable[[], tuple[int, Awaitable[asyncio.StreamWriter]]],
        fetch: Fetch | None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._host = host
        self._server = server
        self._timeout = timeout
        self._open_data = open_data
        self._fetch = fetch
        self._cwd = "/"
        self._data: Awaitable[asyncio.StreamWriter] | None = None
        self.seen = FtpSeen()
        self._commands: dict[str, Callable[[str], Awaitable[bool]]] = {
            "USER": self._user,
            "PASS": self._pass,
            "PASV": self._pasv,
            "EPSV": self._epsv,
            "CWD": self._cwd_to,
            "RETR": self._retr,
            "SIZE": self._size,
            "QUIT": self._quit,
        }
        self._simple = {
            "SYST": "215 UNIX Type: L8",
            "TYPE": "200 Type set",
            "PWD": '257 "/" is the current directory',
            "FEAT": "211 End",
            "NOOP": "200 OK",
            "OPTS": "200 OK",
            "MODE": "200 OK",
            "STRU": "200 OK",
        }

    async def run(self) -> FtpSeen:
        """Greet, then answer commands until QUIT, EOF, a wait runs out or the bound."""
        await self._say("220 FTP server ready")
        for _ in range(MAX_COMMANDS):
            try:
                line = await asyncio.wait_for(self._reader.readline(), self._timeout)
            except (TimeoutError, ValueError):  # ValueError: a line over the stream limit
                break
            if not line:
                break
            verb, _, argument = line[:MAX_LINE].decode("latin-1").strip().partition(" ")
            handler = self._commands.get(verb.upper())
            if handler is not None:
                if not await handler(argument):
                    break
            else:
                await self._say(self._simple.get(verb.upper(), "502 Command not implemented"))
        return self.seen

    async def _say(self, reply: str) -> None:
        self._writer.write(reply.encode("latin-1") + b"\r\n")
        await self._writer.drain()

    async def _user(self, name: str) -> bool:
        self.seen.username = name
        await self._say("331 Password required")
        return True

    async def _pass(self, password: str) -> bool:
        self.seen.password = password
        await self._say("230 Logged in")
        return True

    async def _pasv(self, _: str) -> bool:
        port, self._data = self._open_data()
        numbers = self._host.replace(".", ",")
        await self._say(f"227 Entering Passive Mode ({numbers},{port >> 8},{port & 0xFF})")
        return True

    async def _epsv(self, _: str) -> bool:
        port, self._data = self._open_data()
        await self._say(f"229 Entering Extended Passive Mode (|||{port}|)")
        return True

    async def _cwd_to(self, path: str) -> bool:
        self._cwd = posixpath.normpath(posixpath.join(self._cwd, path))
        await self._say("250 Directory changed")
        return True

    async def _size(self, _: str) -> bool:
        await self._say("550 Could not get file size")
        return True

    async def _quit(self, _: str) -> bool:
        await self._say("221 Goodbye")
        return False

    async def _retr(self, name: str) -> bool:
        path = posixpath.normpath(posixpath.join(self._cwd, name))
        url = f"ftp://{self._server}{path}"
        self.seen.urls.append(url)
        download = await self._fetch(url) if self._fetch is not None else None
        data, self._data = self._data, None
        if download is None or data is None:
            await self._say("550 No such file or directory")
            return True
        try:
            channel = await asyncio.wait_for(data, DATA_WAIT)
        except TimeoutError:
            await self._say("425 No data connection")
            return True
        await self._say("150 Opening BINARY mode data connection")
        channel.write(download.body)
        await channel.drain()
        channel.close()
        await self._say("226 Transfer complete")
        return True
