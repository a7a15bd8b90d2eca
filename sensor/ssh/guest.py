"""The leased guest's SSH sessions, run by the pool node on its warm login.

The sensor never logs into the guest (its credentials stay on the pool node): each
session channel the attacker opens becomes one session on the sensor's
``TunnelService.Sessions`` stream to the lease's pool node (:class:`sensor.tunnel.SessionMux`),
which the pool node runs as a channel on the login it keeps into the guest.
:class:`GuestChannel` is the sensor's end of one session: what the relay writes becomes
frames, the node's frames become the relay's callbacks (the names are asyncssh's, so
:mod:`sensor.ssh.channels` reads the same for either end). It has no task of its own:
the stream's writer takes its frames, the stream's reader hands it the node's.

Flow control is credit per session and asyncssh's windows on the attacker's side:
input beyond the node's credit is held and the attacker's channel paused until the node
grants more; output credit is granted only while the attacker's channel takes what is
written to it. Consecutive data frames are merged up to MAX_DATA.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import asyncssh

from honeyfleet.sessionwire import data_frame
from honeyfleet.v1 import poolnode_pb2
from sensor.session.guest import GuestLink
from sensor.tunnel import SessionMux, TunnelFailed

log = logging.getLogger(__name__)

# Output bytes the node may send before we grant more. With 1 MiB the node kept
# stopping and restarting its read of the guest's channel (pool node CPU per 64 MiB
# down 0.16 s, 0.13 s with 4 MiB); it is also what may land in a stalled attacker's buffer.
WINDOW = 4 * 1024 * 1024
# Output credit is granted back in steps of at least this much (fewer frames).
GRANT_STEP = WINDOW // 4
# Input bytes one frame carries at most.
MAX_DATA = 256 * 1024

Request = poolnode_pb2.SessionsRequest


class GuestReceiver(Protocol):
    """Who hears what happens on a guest channel (the relay's guest side)."""

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        """Guest output (datatype EXTENDED_DATA_STDERR for stderr)."""

    def eof_received(self) -> None:
        """The guest is done sending."""

    def exit_status_received(self, status: int) -> None:
        """The guest's command exited."""

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        """The guest's command died of a signal."""

    def pause_writing(self) -> None:
        """Input credit is spent: stop reading the attacker."""

    def resume_writing(self) -> None:
        """Input credit is back."""

    def connection_lost(self, exc: BaseException | None) -> None:
        """The guest's channel is closed."""


@dataclass(frozen=True)
class Pty:
    """The attacker's pseudo-terminal request."""

    term: str
    size: tuple[int, int, int, int]
    modes: Any
    """asyncssh's terminal modes (opcode to value)."""


class GuestSessions:
    """Opens session channels on the guest of one session's lease."""

    # One per held session: no __dict__, and a list for its few channels (a set is
    # 216 bytes empty).
    __slots__ = ("_channels", "_link", "_wait")

    def __init__(self, link: GuestLink, wait: float) -> None:
        self._link = link
        self._wait = wait
        self._channels: list[GuestChannel] = []

    async def open(
        self,
        receiver: GuestReceiver,
        *,
        command: str | None,
        subsystem: str | None,
        env: Mapping[str | bytes, str | bytes],
        pty: Pty | None,
    ) -> GuestChannel:
        """Open a channel running ``command``, ``subsystem`` or the shell.

        Raises SessionRefused (the guest said no), TunnelFailed (the node did not answer:
        the session ends).
        """
        lease = self._link.lease
        assert lease is not None
        request = poolnode_pb2.SessionOpen(
            lease_id=lease.id,
            env=[
                poolnode_pb2.SessionEnv(name=_raw(name), value=_raw(value))
                for name, value in env.items()
            ],
            window=WINDOW,
        )
        if command is not None:
            request.exec = _raw(command)
        elif subsystem is not None:
            request.subsystem = subsystem
        else:
            request.shell.SetInParent()
        if pty is not None:
            width, height, pixel_width, pixel_height = pty.size
            request.pty.term = pty.term
            request.pty.width, request.pty.height = width, height
            request.pty.pixel_width, request.pty.pixel_height = pixel_width, pixel_height
            request.pty.modes.update(dict(pty.modes or {}))
        channel = GuestChannel(self, receiver)
        try:
            await self._link.tunnels.open_session(lease, self._wait, request, channel)
        except TunnelFailed as e:
            self.channel_broken(f"tunnel broke: {e}")
            raise
        self._channels.append(channel)
        return channel

    def close(self) -> None:
        """Close every channel (the session is over)."""
        for channel in list(self._channels):
            channel.abort()

    def channel_broken(self, reason: str) -> None:
        """A stream broke: the guest (or its pool node) is gone, and the session with it."""
        self._link.lost(reason, report=True)

    def channel_done(self, channel: GuestChannel) -> None:
        """A channel ended."""
        if channel in self._channels:
            self._channels.remove(channel)


class GuestChannel:
    """The sensor's end of one session on its pool node's sessions stream."""

    # One per held channel: no __dict__, and the queues only while something waits.
    __slots__ = (
        "_blocked",
        "_closing",
        "_credit",
        "_held",
        "_mux",
        "_outbox",
        "_owed",
        "_paused",
        "_receiver",
        "_sessions",
        "scheduled",
        "session_id",
    )

    def __init__(self, sessions: GuestSessions, receiver: GuestReceiver) -> None:
        self._sessions: GuestSessions | None = sessions  # None once ended
        self._receiver = receiver
        self._mux: SessionMux | None = None
        self.session_id = 0
        self.scheduled = False
        self._credit = 0  # input bytes the node still takes
        # Input past the credit (raw bytes, as in the outbox), and an EOF behind it.
        self._held: deque[Request | bytes] | None = None
        self._blocked = False
        # Input stays raw bytes until the stream's writer merges it into one frame.
        self._outbox: deque[Request | bytes] | None = None
        self._paused = False  # the attacker is not taking output
        self._owed = 0  # output delivered, not yet granted back
        self._closing = False

    # The stream's side (sensor.tunnel.MuxSession).

    def opened(self, mux: SessionMux, window: int) -> None:
        """The node opened the session with ``window`` bytes of input credit."""
        self._mux = mux
        self._credit = window

    def has_frames(self) -> bool:
        """Whether frames wait for the stream."""
        return bool(self._outbox)

    def next_frame(self) -> Request | bytes:
        """The next frame: a request, or the input queued from here on (up to MAX_DATA)
        as one data frame, encoded already."""
        outbox = self._outbox
        assert outbox
        first = outbox.popleft()
        frame: Request | bytes
        if not isinstance(first, bytes):
            frame = first
        else:
            parts = [first]
            size = len(first)
            while outbox and isinstance(nxt := outbox[0], bytes):
                if size + len(nxt) > MAX_DATA:
                    break
                parts.append(nxt)
                outbox.popleft()
                size += len(nxt)
            frame = data_frame(self.session_id, 0, parts)
        if not outbox:
            self._outbox = None
        return frame

    def frame_received(self, frame: poolnode_pb2.SessionsResponse) -> None:
        """A frame of the node's, to the receiver."""
        receiver = self._receiver
        kind = frame.WhichOneof("frame")
        if kind == "data":
            stderr = frame.data.stream == poolnode_pb2.SESSION_STREAM_STDERR
            data = frame.data.data
            receiver.data_received(data, asyncssh.EXTENDED_DATA_STDERR if stderr else None)
            self._owed += len(data)
            self._grant()
        elif kind == "window_adjust":
            self._credit += frame.window_adjust
            self._flush_held()
        elif kind == "eof":
            receiver.eof_received()
        elif kind == "exit_status":
            receiver.exit_status_received(frame.exit_status)
        elif kind == "exit_signal":
            signal = frame.exit_signal
            receiver.exit_signal_received(
                signal.signal, signal.core_dumped, signal.message, signal.language
            )
        elif kind == "closed":
            closed = frame.closed
            if closed.lost:
                self._end(f"guest lost: {closed.lost}")
            elif closed.HasField("error"):
                code = poolnode_pb2.SessionErrorCode.Name(closed.error.code)
                self._end(f"session ended by the pool node: {code}: {closed.error.message}")
            else:
                self._end(None)

    def stream_lost(self, reason: str) -> None:
        """The stream broke under the session."""
        self._end(reason)

    # The relay's side (asyncssh's channel methods).

    def write(self, data: bytes) -> None:
        """Input for the guest, within the node's credit."""
        if self._held or len(data) > self._credit:
            self._hold(data)
            self._flush_held()
        else:
            self._credit -= len(data)
            self._post(data)

    def write_eof(self) -> None:
        """No more input (after what is held)."""
        frame = Request(session_id=self.session_id, eof=poolnode_pb2.SessionEof())
        if self._held:
            self._hold(frame)
        else:
            self._post(frame)

    def change_terminal_size(self, width: int, height: int, pixwidth: int, pixheight: int) -> None:
        """The attacker's terminal changed size."""
        size = poolnode_pb2.SessionWindowChange(
            width=width, height=height, pixel_width=pixwidth, pixel_height=pixheight
        )
        self._post(Request(session_id=self.session_id, window_change=size))

    def send_signal(self, signal: str) -> None:
        """A signal for the guest's command."""
        self._post(Request(session_id=self.session_id, signal=signal))

    def send_break(self, msec: int) -> None:
        """A break."""
        self._post(Request(session_id=self.session_id, break_ms=msec))

    def pause_reading(self) -> None:
        """The attacker is not taking output: grant no more credit."""
        self._paused = True

    def resume_reading(self) -> None:
        """The attacker takes output again."""
        self._paused = False
        self._grant(at_least=1)

    def close(self) -> None:
        """Close the guest's channel (the node says ``closed`` once it is)."""
        if not self._closing:
            self._closing = True
            self._held = None
            self._post(Request(session_id=self.session_id, close=poolnode_pb2.SessionClose()))

    def abort(self) -> None:
        """The session is over: close the guest's channel and hear no more of it."""
        if self._mux is not None and self._sessions is not None:
            self._outbox = self._held = None
            self._closing = True
            self._post(Request(session_id=self.session_id, close=poolnode_pb2.SessionClose()))
        self._end(None)

    def _end(self, broken: str | None) -> None:
        """The session is over (``broken``: the guest or its stream went away)."""
        sessions, self._sessions = self._sessions, None
        if sessions is None:
            return
        if self._mux is not None:
            self._mux.forget(self)
        if broken is not None:
            sessions.channel_broken(broken)
        sessions.channel_done(self)
        self._receiver.connection_lost(None)

    # Input credit.

    def _post(self, frame: Request | bytes) -> None:
        """Hand a frame to the stream (nothing once the session is over)."""
        if self._sessions is None or self._mux is None:
            return
        if self._outbox is None:
            self._outbox = deque()
        self._outbox.append(frame)
        self._mux.schedule(self)

    def _hold(self, frame: Request | bytes) -> None:
        if self._held is None:
            self._held = deque()
        self._held.append(frame)

    def _flush_held(self) -> None:
        """Send held input within the credit; pause the attacker while any is held."""
        held = self._held
        while held and (self._credit or not isinstance(held[0], bytes)):
            frame = held[0]
            if isinstance(frame, bytes):
                if len(frame) > self._credit:
                    held[0] = frame[self._credit :]
                    frame = frame[: self._credit]
                else:
                    held.popleft()
                self._credit -= len(frame)
            else:
                held.popleft()
            self._post(frame)
        if held is not None and not held:
            self._held = held = None
        if bool(held) != self._blocked:
            self._blocked = bool(held)
            (self._receiver.pause_writing if self._blocked else self._receiver.resume_writing)()

    # Output credit.

    def _grant(self, at_least: int = GRANT_STEP) -> None:
        """Grant the node the output the attacker's channel has taken."""
        if self._paused or self._owed < at_least:
            return
        self._post(Request(session_id=self.session_id, window_adjust=self._owed))
        self._owed = 0


def _raw(text: str | bytes) -> bytes:
    """What the attacker sent, as bytes again (asyncssh decodes names and commands)."""
    return text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")
