"""Relaying one attacker session channel to a matching channel on the guest.

For each session channel the attacker opens, :class:`RelaySession` opens the same kind
on the guest (shell, exec or the sftp subsystem, with the attacker's pty, environment
and terminal size), as a session the pool node runs on its own login into the guest
(:mod:`sensor.ssh.guest`), and relays data, EOF, window changes, signals, breaks and the exit
status or signal. Observers watch the data as it passes: the command-line editor and
the recording for terminals, the SCP and SFTP parsers for uploads, the stdin capture
for a command run without a terminal (whose output is recorded).

Flow control: when the attacker's write buffer is full, the guest's channel grants the
pool node no more output credit; when the node's input credit is spent, the attacker's
channel stops reading (and so stops opening its SSH window). Pauses are tracked by
reason, so a channel resumes only when nothing holds it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from enum import Enum
from typing import Any, Protocol

import asyncssh

from sensor.capture import Capture, SessionFiles
from sensor.events import SessionEvents
from sensor.lineinput import LineEditor
from sensor.recording import Recorder
from sensor.ssh.guest import GuestChannel, GuestSessions, Pty
from sensor.ssh.scp import ScpObserver, is_scp_upload, scp_target
from sensor.ssh.sftp import SftpObserver
from sensor.ssh.stdin import STDIN, StdinObserver
from sensor.tunnel import SessionRefused, TunnelFailed

log = logging.getLogger(__name__)

MAX_ENV = 32
MAX_ENV_VALUE = 1024
# asyncssh keeps every env request of a channel, at any time, with no limit of its own;
# past these the connection is ended (OpenSSH's sshd ignores more than 128 variables).
ENV_KEPT_MAX = 128
ENV_KEPT_MAX_BYTES = 64 * 1024
FORWARD_PEEK_BYTES = 4096
FORWARD_PEEK_SECONDS = 5.0

Observer = Callable[[bytes], None]


class Kind(Enum):
    """What a session channel runs."""

    SHELL = "shell"
    EXEC = "exec"
    SFTP = "sftp"


class ChannelHost(Protocol):
    """What a relayed channel needs from its connection."""

    events: SessionEvents
    files: SessionFiles
    write_buffer_high: int

    @property
    def guest(self) -> GuestSessions:
        """The guest's sessions."""

    def recorder(self, width: int, height: int, term: str) -> Recorder:
        """The connection's recording (made on first use)."""

    def channel_closed(self, relay: RelaySession) -> None:
        """A relayed channel ended."""

    def file_captured(self, how: str, name: str, capture: Capture) -> None:
        """A complete upload (``how`` is "SCP", "SFTP" or "stdin") to store and report."""


class Pausable(Protocol):
    """What :class:`Pauses` pauses: an asyncssh channel, or a guest channel."""

    def pause_reading(self) -> None:
        """Stop delivering data."""

    def resume_reading(self) -> None:
        """Deliver data again."""


class Pauses:
    """Pauses one channel's reading for any number of reasons at once."""

    # Two per held channel: slots, the channel itself rather than two bound methods, and
    # a tuple of the few reasons (at most one per direction's cause) rather than a dict
    # and a set, 0.6 KB less a session.
    __slots__ = ("_channel", "_reasons")

    def __init__(self, channel: Pausable) -> None:
        self._channel = channel
        self._reasons: tuple[str, ...] = ()

    def hold(self, reason: str) -> None:
        """Pause for this reason."""
        if not self._reasons:
            self._channel.pause_reading()
        if reason not in self._reasons:
            self._reasons += (reason,)

    def release(self, reason: str) -> None:
        """Drop this reason; resume if it was the last."""
        if reason in self._reasons:
            self._reasons = tuple(r for r in self._reasons if r != reason)
            if not self._reasons:
                self._channel.resume_reading()


class RelaySession(asyncssh.SSHServerSession[bytes]):
    """The attacker's side of one session channel."""

    def __init__(self, host: ChannelHost) -> None:
        self._host = host
        self._chan: asyncssh.SSHServerChannel[bytes] | None = None
        self._guest: GuestChannel | None = None
        self._kind = Kind.SHELL
        self._command = ""
        self._pty: tuple[str, tuple[int, int, int, int], Any] | None = None
        self._from_client: list[Observer] = []
        self._from_guest: list[Observer] = []
        self._closers: list[Callable[[], None]] = []
        self._recorder: Recorder | None = None
        self.reading: Pauses | None = None
        self.guest_reading: Pauses | None = None
        self.exit_status: int | None = None
        self.exit_signal: tuple[str, bool, str, str] | None = None
        self._task: asyncio.Task[None] | None = None
        self._early: list[bytes] = []
        self._early_eof = False
        self._env: dict[bytes | str, bytes | str] | None = None

    # asyncssh callbacks, attacker side.

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        """Keep the channel and bound what it buffers for a slow reader."""
        self._chan = chan
        chan.set_write_buffer_limits(high=self._host.write_buffer_high)
        self.reading = Pauses(chan)

    def pty_requested(
        self, term_type: str, term_size: tuple[int, int, int, int], term_modes: Any
    ) -> bool:
        """Accept; the guest gets the same pty."""
        self._pty = (term_type, term_size, term_modes)
        self._host.events.emit(
            "cowrie.client.size",
            "Terminal Size: {width} {height}",
            width=term_size[0],
            height=term_size[1],
        )
        return True

    def shell_requested(self) -> bool:
        """Accept a shell."""
        self._kind = Kind.SHELL
        return True

    def exec_requested(self, command: str) -> bool:
        """Accept a command, and log it."""
        self._kind = Kind.EXEC
        self._command = command
        self._host.events.emit("cowrie.command.input", "CMD: {input}", input=command)
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        """Only sftp is relayed."""
        if subsystem != "sftp":
            self._host.events.log.info("refused subsystem %r", subsystem[:64])
            return False
        self._kind = Kind.SFTP
        return True

    def session_started(self) -> None:
        """Hold the attacker's input until the guest channel is open."""
        assert self.reading is not None
        self.reading.hold("opening")
        term_type, term_size, _ = self._pty or ("xterm", (80, 24, 0, 0), None)
        # Observers first: early data must be seen too.
        self._observe(term_type, term_size)
        self._task = asyncio.create_task(self._open_guest())

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        """Attacker -> guest."""
        for observe in self._from_client:
            observe(data)
        if self._guest is not None:
            self._guest.write(data)
        else:
            # asyncssh may deliver data queued before the pause took hold; it is bounded
            # by the channel's window, and goes to the guest once its channel is open.
            self._early.append(data)

    def eof_received(self) -> bool:
        """Pass the attacker's EOF on; keep the channel open for the guest's output."""
        if self._guest is not None:
            self._guest.write_eof()
        else:
            self._early_eof = True
        return True

    def terminal_size_changed(self, width: int, height: int, pixwidth: int, pixheight: int) -> None:
        """Pass a window change on, and record it."""
        if self._guest is not None:
            self._guest.change_terminal_size(width, height, pixwidth, pixheight)
        if self._recorder is not None:
            self._recorder.resize(width, height)

    def signal_received(self, signal: str) -> None:
        """Pass a signal on."""
        if self._guest is not None:
            self._guest.send_signal(signal)

    def break_received(self, msec: int) -> bool:
        """Pass a break on."""
        if self._guest is not None:
            self._guest.send_break(msec)
        return True

    def pause_writing(self) -> None:
        """The attacker's window is full: stop reading the guest."""
        if self.guest_reading is not None:
            self.guest_reading.hold("client window")

    def resume_writing(self) -> None:
        """The attacker's window opened again."""
        if self.guest_reading is not None:
            self.guest_reading.release("client window")

    def connection_lost(self, exc: BaseException | None) -> None:
        """The attacker's channel is gone: close the guest's, finish observers."""
        if self._task is not None:
            self._task.cancel()
        if self._guest is not None:
            self._guest.close()
        for close in self._closers:
            close()
        self._host.channel_closed(self)

    def environment_overflow(self) -> str | None:
        """Why what asyncssh keeps of this channel's env requests is past the bound, if it is."""
        if self._chan is None:
            return None
        env = self._chan.get_environment_bytes()  # a live view, not a copy
        if len(env) > ENV_KEPT_MAX:
            reason = f"more than {ENV_KEPT_MAX} environment variables"
        elif sum(len(k) + len(v) for k, v in env.items()) > ENV_KEPT_MAX_BYTES:
            reason = f"more than {ENV_KEPT_MAX_BYTES} bytes of environment variables"
        else:
            return None
        # The flood and the request it precedes can arrive in one read, and the
        # connection ends before the guest channel would log them: log them now.
        self._log_environment()
        return reason

    # Guest side, called by GuestSession.

    def guest_data(self, data: bytes, datatype: asyncssh.DataType) -> None:
        """Guest -> attacker."""
        for observe in self._from_guest:
            observe(data)
        if self._chan is None:
            return
        if datatype == asyncssh.EXTENDED_DATA_STDERR:
            self._chan.write_stderr(data)
        else:
            self._chan.write(data)

    def guest_eof(self) -> None:
        """The guest is done sending."""
        if self._chan is not None:
            self._chan.write_eof()

    def guest_closed(self) -> None:
        """The guest's channel ended: end the attacker's the same way."""
        if self._chan is None:
            return
        if self.exit_signal is not None:
            self._chan.exit_with_signal(*self.exit_signal)
        elif self.exit_status is not None:
            self._chan.exit(self.exit_status)
        else:
            self._chan.close()

    def pause_reading_client(self, hold: bool) -> None:
        """The guest's window is full (True) or open again (False)."""
        if self.reading is not None:
            (self.reading.hold if hold else self.reading.release)("guest window")

    # Opening the guest channel.

    async def _open_guest(self) -> None:
        """Open the matching guest channel, then let the attacker's input through."""
        assert self._chan is not None and self.reading is not None
        env = self._log_environment()
        pty = Pty(*self._pty) if self._pty else None
        try:
            guest = await self._host.guest.open(
                GuestSession(self),
                command=self._command if self._kind is Kind.EXEC else None,
                subsystem="sftp" if self._kind is Kind.SFTP else None,
                env=env,
                pty=pty,
            )
        except (SessionRefused, TunnelFailed, OSError) as e:
            self._host.events.log.warning("guest refused a %s channel: %s", self._kind.value, e)
            self._chan.exit(1)
            return
        finally:
            # Done: the finished task would be kept for the channel's life (0.6 KB).
            self._task = None
        self._guest = guest
        self.guest_reading = Pauses(guest)
        for data in self._early:
            guest.write(data)
        self._early.clear()
        if self._early_eof:
            guest.write_eof()
        self.reading.release("opening")

    def _log_environment(self) -> dict[bytes | str, bytes | str]:
        """The attacker's environment (bounded), each variable an event, once."""
        assert self._chan is not None
        if self._env is not None:
            return self._env
        self._env = {}
        for name, value in list(self._chan.get_environment().items())[:MAX_ENV]:
            value = value[:MAX_ENV_VALUE]
            self._env[name] = value
            self._host.events.emit(
                "cowrie.client.var", "request_env: {name}={value}", name=name, value=value
            )
        return self._env

    def _observe(self, term: str, size: tuple[int, int, int, int]) -> None:
        """Attach the observers this kind of channel gets."""
        host = self._host
        if self._kind is Kind.SFTP:
            sftp = SftpObserver(host.files, functools.partial(host.file_captured, "SFTP"))
            self._from_client.append(sftp.from_client)
            self._from_guest.append(sftp.from_guest)
            self._closers.append(sftp.close)
            return
        if self._kind is Kind.EXEC and is_scp_upload(self._command):
            scp = ScpObserver(
                host.files,
                functools.partial(host.file_captured, "SCP"),
                scp_target(self._command),
            )
            self._from_client.append(scp.feed)
            self._closers.append(scp.close)
            return
        recorder = self._recorder = host.recorder(size[0] or 80, size[1] or 24, term)
        self._from_guest.append(recorder.output)
        if self._kind is Kind.EXEC and self._pty is None:
            # Piped input, not typing: kept whole as a file (sensor.ssh.stdin).
            stdin = StdinObserver(host.files, functools.partial(host.file_captured, STDIN, STDIN))
            self._from_client.append(stdin.feed)
            self._closers.append(stdin.close)
            return
        self._from_client.append(recorder.input)
        if self._kind is Kind.SHELL:
            # A bound method, not a closure: held by every shell (0.1 KB less).
            self._from_client.append(LineEditor(self._typed).feed)

    def _typed(self, line: str) -> None:
        """A line the attacker typed into a shell."""
        self._host.events.emit("cowrie.command.input", "CMD: {input}", input=line)


class GuestSession:
    """The guest's side of one relayed channel (a :class:`sensor.ssh.guest.GuestReceiver`)."""

    __slots__ = ("_relay",)

    def __init__(self, relay: RelaySession) -> None:
        self._relay = relay

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        """Guest output."""
        self._relay.guest_data(data, datatype)

    def eof_received(self) -> None:
        """Guest EOF; the channel stays for the exit status."""
        self._relay.guest_eof()

    def exit_status_received(self, status: int) -> None:
        """Remember the exit status."""
        self._relay.exit_status = status

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        """Remember the exit signal."""
        self._relay.exit_signal = (signal, core_dumped, msg, lang)

    def pause_writing(self) -> None:
        """The guest takes no more input for now."""
        self._relay.pause_reading_client(True)

    def resume_writing(self) -> None:
        """The guest takes input again."""
        self._relay.pause_reading_client(False)

    def connection_lost(self, exc: BaseException | None) -> None:
        """The guest closed the channel."""
        self._relay.guest_closed()


class RefusedForward(asyncssh.SSHTCPSession[bytes]):
    """A direct-tcpip channel: log what the attacker sends first, then close it."""

    def __init__(
        self,
        events: SessionEvents,
        number: int,
        dst: tuple[str, int],
        on_close: Callable[[], None],
    ) -> None:
        self._events = events
        self._number = number
        self._dst = dst
        self._on_close = on_close
        self._chan: asyncssh.SSHTCPChannel[bytes] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        """Give the attacker a few seconds to send something worth logging."""
        self._chan = chan
        self._timer = asyncio.get_running_loop().call_later(FORWARD_PEEK_SECONDS, chan.close)

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        """Log the first bytes and refuse the connection."""
        if self._chan is None or self._chan.is_closing():
            return
        self._events.emit(
            "cowrie.direct-tcpip.data",
            "discarded direct-tcp forward request {id} to {dst_ip}:{dst_port} with data {data}",
            id=self._number,
            dst_ip=self._dst[0],
            dst_port=self._dst[1],
            data=repr(data[:FORWARD_PEEK_BYTES]),
        )
        self._chan.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        """Stop the timer; the channel no longer counts."""
        if self._timer is not None:
            self._timer.cancel()
        self._on_close()
