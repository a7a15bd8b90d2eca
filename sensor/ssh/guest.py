"""The leased guest's SSH sessions, run by the pool node on its warm login.

The sensor never logs into the guest (its credentials stay on the pool node): each
session channel the attacker opens becomes one ``TunnelService.Session`` stream, which
the pool node runs as a channel on the login it keeps into the guest.
:class:`GuestChannel` is the sensor's end of one stream: what the relay writes becomes
frames, the node's frames become the relay's callbacks (the names are asyncssh's, so
:mod:`sensor.ssh.channels` reads the same for either end).

Flow control is credit on the stream and asyncssh's windows on the attacker's side:
input beyond the node's credit is held and the attacker's channel paused until the node
grants more; output credit is granted only while the attacker's channel takes what is
written to it. Consecutive data frames are merged up to MAX_DATA.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import asyncssh
import grpc

from honeyfleet.v1 import poolnode_pb2
from sensor.session.guest import GuestLink
from sensor.tunnel import SessionCall, TunnelFailed

log = logging.getLogger(__name__)

# Output bytes the node may send before we grant more. With 1 MiB the node kept
# stopping and restarting its read of the guest's channel (pool node CPU per 64 MiB
# down 0.16 s, 0.13 s with 4 MiB); it is also what may land in a stalled attacker's buffer.
WINDOW = 4 * 1024 * 1024
# Output credit is granted back in steps of at least this much (fewer frames).
GRANT_STEP = WINDOW // 4
# Input bytes one frame carries at most.
MAX_DATA = 256 * 1024

Request = poolnode_pb2.SessionRequest


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

    def __init__(self, link: GuestLink, wait: float) -> None:
        self._link = link
        self._wait = wait
        self._channels: set[GuestChannel] = set()

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
        try:
            call, window = await self._link.tunnels.open_session(lease, self._wait, request)
        except TunnelFailed as e:
            self._broken(f"tunnel broke: {e}")
            raise
        channel = GuestChannel(call, window, receiver, self._broken, self._channels.discard)
        self._channels.add(channel)
        return channel

    def close(self) -> None:
        """Close every channel (the session is over)."""
        for channel in list(self._channels):
            channel.abort()

    def _broken(self, reason: str) -> None:
        """A stream broke: the guest (or its pool node) is gone, and the session with it."""
        self._link.lost(reason, report=True)


class GuestChannel:
    """The sensor's end of one Session stream."""

    def __init__(
        self,
        call: SessionCall,
        window: int,
        receiver: GuestReceiver,
        on_broken: Callable[[str], None],
        on_done: Callable[[GuestChannel], None],
    ) -> None:
        self._call = call
        self._receiver = receiver
        self._on_broken = on_broken
        self._on_done = on_done
        self._credit = window  # input bytes the node still takes
        # Input past the credit (raw bytes, as in the outbox), and an EOF behind it.
        self._held: deque[Request | bytes] = deque()
        self._blocked = False
        # Input stays raw bytes until the writer merges it into one frame; None: half-close.
        self._outbox: deque[Request | bytes | None] = deque()
        # What the writer waits on when the outbox is empty: a future made only then
        # (an asyncio.Event would hold its own deque, 0.76 KB per held channel).
        self._wakeup: asyncio.Future[None] | None = None
        self._paused = False  # the attacker is not taking output
        self._owed = 0  # output delivered, not yet granted back
        self._closing = False
        self._writer = asyncio.create_task(self._write_loop())
        self._reader = asyncio.create_task(self._read_loop())

    # The relay's side (asyncssh's channel methods).

    def write(self, data: bytes) -> None:
        """Input for the guest, within the node's credit."""
        if self._held or len(data) > self._credit:
            self._held.append(data)
            self._flush_held()
        else:
            self._credit -= len(data)
            self._post(data)

    def write_eof(self) -> None:
        """No more input (after what is held)."""
        frame = Request(eof=poolnode_pb2.SessionEof())
        if self._held:
            self._held.append(frame)
        else:
            self._post(frame)

    def change_terminal_size(self, width: int, height: int, pixwidth: int, pixheight: int) -> None:
        """The attacker's terminal changed size."""
        self._post(
            Request(
                window_change=poolnode_pb2.SessionWindowChange(
                    width=width, height=height, pixel_width=pixwidth, pixel_height=pixheight
                )
            )
        )

    def send_signal(self, signal: str) -> None:
        """A signal for the guest's command."""
        self._post(Request(signal=signal))

    def send_break(self, msec: int) -> None:
        """A break."""
        self._post(Request(break_ms=msec))

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
            self._held.clear()
            self._post(Request(close=poolnode_pb2.SessionClose()))

    def abort(self) -> None:
        """Drop the stream now (the session is over)."""
        self._call.cancel()
        self._writer.cancel()

    # Input credit.

    def _post(self, frame: Request | bytes | None) -> None:
        """Hand a frame to the writer."""
        self._outbox.append(frame)
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _flush_held(self) -> None:
        """Send held input within the credit; pause the attacker while any is held."""
        while self._held and (self._credit or not isinstance(self._held[0], bytes)):
            frame = self._held[0]
            if isinstance(frame, bytes):
                if len(frame) > self._credit:
                    self._held[0] = frame[self._credit :]
                    frame = frame[: self._credit]
                else:
                    self._held.popleft()
                self._credit -= len(frame)
            else:
                self._held.popleft()
            self._post(frame)
        if bool(self._held) != self._blocked:
            self._blocked = bool(self._held)
            (self._receiver.pause_writing if self._blocked else self._receiver.resume_writing)()

    # Output credit.

    def _grant(self, at_least: int = GRANT_STEP) -> None:
        """Grant the node the output the attacker's channel has taken."""
        if self._paused or self._owed < at_least:
            return
        self._post(Request(window_adjust=self._owed))
        self._owed = 0

    # The stream.

    async def _write_loop(self) -> None:
        """Frames to the node, consecutive input merged, until the close frame."""
        call = self._call
        try:
            while True:
                if not self._outbox:
                    self._wakeup = asyncio.get_running_loop().create_future()
                    await self._wakeup
                    self._wakeup = None
                while self._outbox:
                    frame = self._outbox.popleft()
                    if frame is None:
                        await call.done_writing()
                        return
                    await call.write(self._merge(frame))
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return  # the stream ended: the reader says why

    def _merge(self, first: Request | bytes) -> Request:
        """``first``, or the input queued from it on (up to MAX_DATA) as one frame."""
        if not isinstance(first, bytes):
            return first
        parts = [first]
        size = len(first)
        while self._outbox and isinstance(nxt := self._outbox[0], bytes):
            if size + len(nxt) > MAX_DATA:
                break
            parts.append(nxt)
            self._outbox.popleft()
            size += len(nxt)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        return Request(data=poolnode_pb2.SessionData(data=data))

    async def _read_loop(self) -> None:
        """Frames from the node, to the receiver, until the stream ends."""
        receiver = self._receiver
        try:
            while isinstance(frame := await self._call.read(), poolnode_pb2.SessionResponse):
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
                    # The node ends the stream once we are done writing.
                    self._held.clear()
                    self._post(None)
                    if frame.closed.lost:
                        self._on_broken(f"guest lost: {frame.closed.lost}")
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                self._on_broken(f"tunnel broke: {e.code().name}: {e.details() or ''}")
        finally:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._on_done(self)
            receiver.connection_lost(None)


def _raw(text: str | bytes) -> bytes:
    """What the attacker sent, as bytes again (asyncssh decodes names and commands)."""
    return text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")
