"""A real SSH server on loopback for tests: the guest behind the sensor.

asyncssh on 127.0.0.1:0 with password login for one account. Shells and commands are
real: ``/bin/sh`` under a real pty (or pipes without one), commands through ``sh -c``,
run in a temporary home directory. SFTP (unless OpenSSH's ``sftp-server`` is asked for)
and SCP are asyncssh's servers rooted there;
SFTP ends with an exit status, as OpenSSH's does, so ``scp`` in its default SFTP mode
works.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import struct
import termios
from pathlib import Path

import asyncssh

USER = "root"
PASSWORD = "guest-secret"
READ = 64 * 1024


class Sshd:
    """The server; ``start`` then ``stop``. ``home`` is where commands run and files land."""

    def __init__(
        self,
        home: Path,
        *,
        user: str = USER,
        password: str = PASSWORD,
        sftp_server: str | None = None,
    ) -> None:
        self.home = home
        # A program to run for the sftp subsystem (OpenSSH's sftp-server) instead of
        # asyncssh's SFTP server; sessions then offer sftp and nothing else.
        self.sftp_server = sftp_server
        self.user = user
        self.password = password
        self.port = 0
        self.connections = 0
        # Output the SSH server has handed on (it stops growing when the client's
        # window is full): tests watch it to see backpressure reach the guest.
        self.bytes_out = 0
        self._server: asyncssh.SSHAcceptor | None = None
        self._procs: set[asyncio.subprocess.Process] = set()
        self._conns: set[asyncssh.SSHServerConnection] = set()

    async def start(self) -> int:
        """Listen on 127.0.0.1; returns the port."""
        self.home.mkdir(parents=True, exist_ok=True)
        sshd = self

        class Server(asyncssh.SSHServer):
            def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
                sshd.connections += 1
                sshd._conns.add(conn)

            def connection_lost(self, exc: Exception | None) -> None:
                sshd._conns = {c for c in sshd._conns if not c.is_closed()}

            def begin_auth(self, username: str) -> bool:
                return True

            def password_auth_supported(self) -> bool:
                return True

            def validate_password(self, username: str, password: str) -> bool:
                return username == sshd.user and password == sshd.password

            def session_requested(self) -> asyncssh.SSHServerSession[bytes] | bool:
                if sshd.sftp_server:
                    return ProgramSftp(sshd.sftp_server, sshd.home, sshd._procs)
                return True

        self._server = await asyncssh.create_server(
            Server,
            "127.0.0.1",
            0,
            server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
            server_version="OpenSSH_9.2p1 Debian-2+deb12u3",
            # With a program for sftp, sessions are ProgramSftp's (session_requested).
            process_factory=None if self.sftp_server else self._run,
            encoding=None,
            line_editor=False,
            sftp_factory=None
            if self.sftp_server
            else lambda chan: SftpServer(chan, chroot=str(self.home).encode()),
            allow_scp=True,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        """Stop listening, close every connection and kill what sessions left running."""
        if self._server is not None:
            self._server.close()
            # asyncssh's acceptor leaves connections open, and waiting for it to close
            # may wait for them.
            self.disconnect()
            await self._server.wait_closed()
        for proc in list(self._procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()

    def live(self) -> list[asyncssh.SSHServerConnection]:
        """The connections still open."""
        return [conn for conn in self._conns if not conn.is_closed()]

    def running(self) -> int:
        """Sessions whose command still runs."""
        return len(self._procs)

    def disconnect(self) -> None:
        """Close every connection (the server goes on listening)."""
        for conn in list(self._conns):
            conn.close()
        self._conns.clear()

    async def _run(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        """Run the shell or command of one session."""
        command = process.command
        argv = ["/bin/sh", "-i"] if command is None else ["/bin/sh", "-c", command]
        env = {"PATH": "/usr/bin:/bin", "HOME": str(self.home), "PS1": "guest$ "}
        env.update({k: v for k, v in process.env.items() if isinstance(k, str)})
        if process.term_type:
            code = await self._run_pty(process, argv, {**env, "TERM": process.term_type})
        else:
            code = await self._run_pipes(process, argv, env)
        if code < 0:
            process.exit_with_signal(signal.Signals(-code).name.removeprefix("SIG"))
        else:
            process.exit(code)

    async def _run_pipes(
        self, process: asyncssh.SSHServerProcess[bytes], argv: list[str], env: dict[str, str]
    ) -> int:
        """A command with pipes for stdin, stdout and stderr."""
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=self.home,
            env=env,
            start_new_session=True,
        )
        self._procs.add(proc)
        assert proc.stdin and proc.stdout and proc.stderr
        stdin = proc.stdin

        async def feed() -> None:
            while True:
                try:
                    data = await process.stdin.read(READ)
                except asyncssh.SignalReceived as e:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, getattr(signal, f"SIG{e.signal}", signal.SIGTERM))
                    continue
                except (asyncssh.BreakReceived, asyncssh.TerminalSizeChanged):
                    continue
                if not data:
                    break
                stdin.write(data)
                with contextlib.suppress(ConnectionError):
                    await stdin.drain()
            stdin.close()

        async def drain(source: asyncio.StreamReader, sink: asyncssh.SSHWriter[bytes]) -> None:
            while data := await source.read(READ):
                sink.write(data)
                await sink.drain()
                self.bytes_out += len(data)

        feeder = asyncio.create_task(feed())
        await asyncio.gather(drain(proc.stdout, process.stdout), drain(proc.stderr, process.stderr))
        code = await proc.wait()
        self._procs.discard(proc)
        feeder.cancel()
        return code

    async def _run_pty(
        self, process: asyncssh.SSHServerProcess[bytes], argv: list[str], env: dict[str, str]
    ) -> int:
        """A shell or command on a real pseudo-terminal."""
        master, slave = os.openpty()
        _set_size(slave, process.term_size)
        # setsid -c makes the pty the controlling terminal; a preexec_fn would need a
        # plain fork(), which gRPC's threads in this test process do not survive.
        proc = await asyncio.create_subprocess_exec(
            "setsid",
            "-c",
            *argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=self.home,
            env=env,
        )
        self._procs.add(proc)
        os.close(slave)
        loop = asyncio.get_running_loop()

        async def feed() -> None:
            while True:
                try:
                    data = await process.stdin.read(READ)
                except asyncssh.TerminalSizeChanged as e:
                    _set_size(master, (e.width, e.height, e.pixwidth, e.pixheight))
                    continue
                except asyncssh.SignalReceived as e:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, getattr(signal, f"SIG{e.signal}", signal.SIGTERM))
                    continue
                except asyncssh.BreakReceived:
                    continue
                if not data:
                    os.write(master, b"\x04")  # EOF on a terminal is ^D
                    return
                os.write(master, data)

        output: asyncio.Queue[bytes] = asyncio.Queue()

        def readable() -> None:
            # One chunk at a time: the reader comes back once the chunk is sent on.
            loop.remove_reader(master)
            try:
                data = os.read(master, READ)
            except OSError:  # EIO: the last process holding the terminal has exited
                data = b""
            output.put_nowait(data)

        loop.add_reader(master, readable)
        feeder = asyncio.create_task(feed())
        try:
            while data := await output.get():
                process.stdout.write(data)
                await process.stdout.drain()
                self.bytes_out += len(data)
                loop.add_reader(master, readable)
        finally:
            loop.remove_reader(master)
            feeder.cancel()
        code = await proc.wait()
        self._procs.discard(proc)
        os.close(master)
        return code


class SftpServer(asyncssh.SFTPServer):
    """asyncssh's SFTP server, ending its channel with an exit status as OpenSSH does.

    Without one, OpenSSH's ``scp`` (SFTP mode, its default) reports a failed copy.
    """

    def exit(self) -> None:
        """The client is done: exit status 0."""
        self.channel.exit(0)


class ProgramSftp(asyncssh.SSHServerSession[bytes]):
    """The sftp subsystem served by a program (OpenSSH's ``sftp-server``) on pipes."""

    def __init__(self, program: str, home: Path, procs: set[asyncio.subprocess.Process]) -> None:
        self._program = program
        self._home = home
        self._procs = procs
        self._chan: asyncssh.SSHServerChannel[bytes] | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._early: list[bytes] = []
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self._chan = chan

    def subsystem_requested(self, subsystem: str) -> bool:
        return subsystem == "sftp"

    def session_started(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        assert self._chan is not None
        proc = await asyncio.create_subprocess_exec(
            self._program,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=self._home,
            start_new_session=True,
        )
        self._procs.add(proc)
        self._proc = proc
        assert proc.stdin and proc.stdout
        for data in self._early:
            proc.stdin.write(data)
        while data := await proc.stdout.read(READ):
            self._chan.write(data)
        self._chan.exit(await proc.wait())

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if self._proc is not None and self._proc.stdin is not None:
            self._proc.stdin.write(data)
        else:
            self._early.append(data)

    def eof_received(self) -> bool:
        if self._proc is not None and self._proc.stdin is not None:
            self._proc.stdin.close()
        return True

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()


def _set_size(fd: int, size: tuple[int, int, int, int]) -> None:
    """Set a terminal's size (columns, rows, pixel width, pixel height)."""
    cols, rows, xpix, ypix = size
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows or 24, cols or 80, xpix, ypix))
