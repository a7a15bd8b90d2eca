"""A sensor's SSH session channels on guests' warm logins, multiplexed on one stream.

The sensor holds the attacker's SSH connections, the node the guests'
(:mod:`poolnode.guest_login`). One ``Sessions`` stream carries every session a sensor
runs on this node: :class:`SessionMux` is the node's end of it. Each ``open`` frame
becomes a :class:`SessionRelay`, which opens the channel the frame describes on the
warm login of its lease's guest, then turns the sensor's frames into channel operations
and the channel's callbacks into frames for the sensor.

Flow control is credit-based per session on the node's leg, as SSH windows are on the
others: the node sends the sensor at most the output bytes it was granted and stops
reading the guest's channel when the credit is spent (so the guest's SSH window closes);
it grants input credit back only once the guest's channel has taken the data. Nothing
queues without bound anywhere between the attacker and the guest, and since neither end
ever waits on one session to take a frame, no session holds up another: the stream's
writer takes one frame from each session with something to send in turn.

Guest output is carried as the raw pieces asyncssh hands over (OpenSSH's sshd sends
32 KiB packets whatever packet size we offer) and joined into one frame of up to
MAX_DATA only when the writer takes it, encoded by hand (:mod:`honeyfleet.sessionwire`).
The writer holds a frame that is still filling for as long as each turn of the event
loop brings more of the guest's output, and sends it as soon as a turn brings none: a
bulk transfer goes out in few large frames (each costs gRPC and both ends far more than
its bytes do), a keystroke's echo at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeAlias

import asyncssh
import grpc

from honeyfleet.errors import (
    FailedPrecondition,
    HoneyfleetError,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from honeyfleet.sessionwire import data_frame
from honeyfleet.v1 import poolnode_pb2
from poolnode.guest_login import WarmLogin
from poolnode.pool import GuestPool

log = logging.getLogger(__name__)

# Output bytes one frame carries at most: large frames keep gRPC's per-message cost low.
MAX_DATA = 256 * 1024
# Input bytes the sensor may have in flight; granted back as the guest's channel takes them.
WINDOW = 1024 * 1024
# Input credit is granted back in steps of at least this much (fewer frames).
GRANT_STEP = WINDOW // 4
# Sessions one stream holds at once: what the node allowed a sensor's connection as
# concurrent streams when each session had one (honeyfleet.grpcserver).
MAX_SESSIONS = 1000
# How long the guest's login and channel may take to open.
OPEN_TIMEOUT = 10.0

STREAMS = {
    None: poolnode_pb2.SESSION_STREAM_STDOUT,
    asyncssh.EXTENDED_DATA_STDERR: poolnode_pb2.SESSION_STREAM_STDERR,
}
# What a session's closed frame says for the errors that end it.
ERROR_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT: poolnode_pb2.SESSION_ERROR_CODE_INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND: poolnode_pb2.SESSION_ERROR_CODE_NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED: poolnode_pb2.SESSION_ERROR_CODE_PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED: poolnode_pb2.SESSION_ERROR_CODE_RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION: poolnode_pb2.SESSION_ERROR_CODE_FAILED_PRECONDITION,
    grpc.StatusCode.UNAVAILABLE: poolnode_pb2.SESSION_ERROR_CODE_UNAVAILABLE,
}
Response = poolnode_pb2.SessionsResponse
Stream: TypeAlias = poolnode_pb2.SessionStream.ValueType
STDOUT = poolnode_pb2.SESSION_STREAM_STDOUT


@dataclass(slots=True)
class Output:
    """Guest output of one stream for one frame, in the pieces it came in (joined only
    once, when the frame is sent)."""

    stream: Stream
    parts: list[bytes]
    size: int


# A session's frames for the stream: output, another frame, or None for the end.
Outgoing: TypeAlias = Output | Response | None


class GuestChannel(asyncssh.SSHClientSession[bytes]):
    """asyncssh's callbacks on the guest's channel, handed to the relay."""

    def __init__(self, relay: SessionRelay) -> None:
        self._relay = relay

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        """Guest output."""
        self._relay.output(data, STDOUT if datatype is None else STREAMS.get(datatype, STDOUT))

    def eof_received(self) -> bool:
        """The guest is done sending; the channel stays open for the exit status."""
        self._relay.send(Response(eof=poolnode_pb2.SessionEof()))
        return True

    def exit_status_received(self, status: int) -> None:
        """The guest's command exited."""
        self._relay.send(Response(exit_status=status))

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        """The guest's command died of a signal."""
        self._relay.send(
            Response(
                exit_signal=poolnode_pb2.SessionExitSignal(
                    signal=signal, core_dumped=core_dumped, message=msg, language=lang
                )
            )
        )

    def pause_writing(self) -> None:
        """The guest's window is full: input credit is held back."""
        self._relay.input_blocked(True)

    def resume_writing(self) -> None:
        """The guest's window opened again."""
        self._relay.input_blocked(False)

    def connection_lost(self, exc: BaseException | None) -> None:
        """The guest's channel is closed: the session ends."""
        self._relay.finish()


class SessionRelay:
    """One session of a stream: the guest's channel and its frames both ways."""

    def __init__(self, mux: SessionMux, session_id: int, lease_id: str) -> None:
        self.id = session_id
        self.lease_id = lease_id
        self._mux = mux
        self._chan: asyncssh.SSHClientChannel[bytes] | None = None
        self.login: WarmLogin | None = None
        """The lease's guest login (its loss is what ``closed`` reports)."""
        self.host: WarmLogin | None = None
        """The login the channel runs on, counted until the session ends."""
        self.untrack: Callable[[], None] | None = None
        self._outbox: deque[Outgoing] = deque()  # for the stream now
        self.scheduled = False  # in the stream's queue of sessions with frames to send
        self._credit = 0  # output bytes the sensor still takes
        # Output past the credit, and the frames behind it; everything until it opened.
        self._held: deque[Outgoing] = deque()
        # A command that ends at once can have its exit, EOF and close read in the same
        # packets as the channel's open confirmation, before ``opened``: the sensor
        # must hear of the open first (a close before it reads as a refusal).
        self._open = False
        self._input_credit = WINDOW  # input bytes the sensor may still send
        self._owed = 0  # input taken by the guest's channel, not yet granted back
        self._blocked = False
        self._close_asked = False  # the sensor asked to close while the channel opened
        self._ended = False  # the end is queued: nothing more is sent
        # Set once the lease's end closed the channel, with the login's loss known then:
        # a guest reset that follows its lease's end is not what ended the session.
        self._cut = False
        self._lost_when_cut: str | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.error: HoneyfleetError | None = None
        """Why the session ended on an error (its open refused, or its frames broke
        the rules)."""

    async def open(
        self, conn: asyncssh.SSHClientConnection, request: poolnode_pb2.SessionOpen
    ) -> None:
        """Open the guest's channel as the sensor's open frame says.

        Raises FailedPrecondition when the guest refuses it.
        """
        self._credit = request.window
        run = request.WhichOneof("run")
        pty = request.pty if request.HasField("pty") else None
        try:
            self._chan, _ = await conn.create_session(
                lambda: GuestChannel(self),
                command=request.exec.decode("utf-8", "surrogateescape") if run == "exec" else None,
                subsystem=request.subsystem if run == "subsystem" else None,
                env={e.name: e.value for e in request.env},
                request_pty="force" if pty is not None else False,
                term_type=pty.term if pty is not None else None,
                term_size=(pty.width, pty.height, pty.pixel_width, pty.pixel_height)
                if pty is not None
                else None,
                term_modes=dict(pty.modes) if pty is not None else None,
                encoding=None,
            )
        except asyncssh.ChannelOpenError as e:
            raise FailedPrecondition(f"the guest refused a session channel: {e.reason}") from None
        except asyncssh.Error as e:
            raise FailedPrecondition(f"the guest refused the session: {e}") from None

    def opened(self) -> None:
        """The channel is open: tell the sensor, then what the guest said meanwhile (and
        close it if the sensor gave up)."""
        self._open = True
        self._post(Response(opened=poolnode_pb2.SessionOpened(window=WINDOW)))
        self._flush_held()
        if self._close_asked:
            self.close()

    # Guest -> sensor.

    def send(self, frame: Response | None) -> None:
        """Queue a frame for the sensor (None: the end), behind any output held back."""
        if self._held or not self._open:
            self._held.append(frame)
        else:
            self._post(frame)

    def _post(self, frame: Response | None) -> None:
        """Hand a frame to the stream now (nothing once the end is queued)."""
        if self._ended:
            return
        self._ended = frame is None
        self._outbox.append(frame)
        self._mux.schedule(self)

    def output(self, data: bytes, stream: Stream) -> None:
        """Guest output: send what the credit allows, hold the rest and stop reading."""
        if self._held or not self._open or len(data) > self._credit:
            self._held.append(Output(stream, [data], len(data)))
            self._flush_held()
            return
        self._credit -= len(data)
        self._post_output(stream, data)

    def _post_output(self, stream: Stream, data: bytes) -> None:
        """Hand output within the credit to the stream, joining the frame still filling."""
        if self._ended:
            return
        outbox = self._outbox
        if outbox:
            last = outbox[-1]
            if (
                isinstance(last, Output)
                and last.stream == stream
                and last.size + len(data) <= MAX_DATA
            ):
                last.parts.append(data)
                last.size += len(data)
                return  # already scheduled
        outbox.append(Output(stream, [data], len(data)))
        self._mux.schedule(self)

    def _flush_held(self) -> None:
        """Send held frames in order, output within the credit; read the guest only once
        nothing is held."""
        held = self._held
        while held and self._open:
            item = held[0]
            if isinstance(item, Output):
                if not self._credit:
                    break
                data = item.parts[0]  # held output is one piece per item
                if len(data) > self._credit:
                    data, item.parts[0] = data[: self._credit], data[self._credit :]
                    item.size -= len(data)
                else:
                    held.popleft()
                self._credit -= len(data)
                self._post_output(item.stream, data)
            else:
                held.popleft()
                self._post(item)
        if self._chan is not None:
            if held:
                self._chan.pause_reading()
            else:
                self._chan.resume_reading()

    def finish(self) -> None:
        """The guest's channel closed: end the session after what is queued."""
        self.send(None)

    def fail(self, error: HoneyfleetError) -> None:
        """End the session now on ``error`` (what is queued and held is dropped)."""
        if self._ended:
            return
        self.error = error
        self._held.clear()
        self._outbox.clear()
        self._post(None)
        if self._chan is not None:
            self._chan.close()

    def has_frames(self) -> bool:
        """Whether frames wait for the stream."""
        return bool(self._outbox)

    def filling(self) -> int | None:
        """The size of the next frame if it is output more may still join, else None."""
        outbox = self._outbox
        if len(outbox) == 1:
            only = outbox[0]
            if isinstance(only, Output) and only.size < MAX_DATA:
                return only.size
        return None

    def next_frame(self) -> Response | bytes | None:
        """The next frame for the stream: a message, output already encoded (its
        session id in it), or None for the end (then :meth:`closed` is the frame to
        send)."""
        item = self._outbox.popleft()
        if not isinstance(item, Output):
            return item
        self.bytes_out += item.size
        return data_frame(self.id, item.stream, item.parts)

    def closed(self) -> Response:
        """The session's last frame: its error, or whether the guest's login was lost."""
        if self.error is not None:
            code = ERROR_CODES.get(self.error.code, poolnode_pb2.SESSION_ERROR_CODE_INTERNAL)
            return Response(
                closed=poolnode_pb2.SessionClosed(
                    error=poolnode_pb2.SessionError(code=code, message=str(self.error))
                )
            )
        why = self._lost_when_cut if self._cut else self._login_lost()
        lost = f"guest {self.login.guest} lost its SSH login: {why}" if why and self.login else ""
        return Response(closed=poolnode_pb2.SessionClosed(lost=lost))

    # Sensor -> guest.

    def apply(self, request: poolnode_pb2.SessionsRequest) -> None:
        """One frame from the sensor. Raises InvalidArgument for a frame that breaks the
        rules."""
        chan = self._chan
        kind = request.WhichOneof("frame")
        if chan is None:
            if kind != "close":
                raise InvalidArgument(f"unexpected {kind} frame in a session still opening")
            self._close_asked = True
            return
        match kind:
            case "data":
                data = request.data.data
                if len(data) > self._input_credit:
                    raise InvalidArgument("session data beyond the granted window")
                self._input_credit -= len(data)
                self.bytes_in += len(data)
                chan.write(data)
                self._owed += len(data)
                self._grant()
            case "eof":
                chan.write_eof()
            case "window_change":
                size = request.window_change
                chan.change_terminal_size(
                    size.width, size.height, size.pixel_width, size.pixel_height
                )
            case "signal":
                chan.send_signal(request.signal)
            case "break_ms":
                chan.send_break(request.break_ms)
            case "window_adjust":
                self._credit += request.window_adjust
                self._flush_held()
            case "close":
                # The sensor wants nothing more: output held for its credit would hold
                # up the closed frame for ever.
                self._held.clear()
                chan.close()
            case other:
                raise InvalidArgument(f"unexpected {other} frame in an open session")

    def input_blocked(self, blocked: bool) -> None:
        """The guest's channel is (or no longer is) full: hold back input credit."""
        self._blocked = blocked
        self._grant()

    def _grant(self) -> None:
        """Grant the sensor the input the guest's channel has taken, in large steps."""
        # The sensor's credit never runs out unseen: at zero, WINDOW bytes are owed.
        if self._blocked or self._owed < GRANT_STEP:
            return
        self._input_credit += self._owed
        # Not behind held output: input credit must flow while output waits.
        self._post(Response(window_adjust=self._owed))
        self._owed = 0

    def _login_lost(self) -> str | None:
        """Why the guest's login (the lease's, or the one the channel runs on) was lost."""
        return (self.login.lost if self.login else None) or (self.host.lost if self.host else None)

    def close(self) -> None:
        """Close the guest's channel (the lease ended); ``closed`` follows once it is."""
        if not self._cut:
            self._cut, self._lost_when_cut = True, self._login_lost()
        if self._chan is not None:
            self._chan.close()
        else:
            self._close_asked = True

    def abandon(self) -> None:
        """The sensor is gone: drop what waits for its credit and close the channel."""
        self._held.clear()
        self.close()

    def release(self, pool: GuestPool) -> None:
        """Give back what the session held (once it ended)."""
        if self.untrack is not None:
            self.untrack()
            self.untrack = None
        if self._chan is not None:
            self._chan.close()
        if self.host is not None:
            self.host.release()
            self.host = None
            metrics = pool.metrics.tunnel_bytes
            metrics.labels("to_guest").inc(self.bytes_in)
            metrics.labels("to_sensor").inc(self.bytes_out)
            log.info("session %d for lease %s closed", self.id, self.lease_id)


class SessionMux:
    """The node's end of one ``Sessions`` stream: a sensor's sessions and their frames."""

    def __init__(self, pool: GuestPool, sensor: str) -> None:
        self._pool = pool
        self._sensor = sensor
        self._sessions: dict[int, SessionRelay] = {}
        self._last_id = 0
        self._opening: set[asyncio.Task[None]] = set()
        # Sessions with frames to send, each once, taken in turn.
        self._ready: deque[SessionRelay] = deque()
        self._wakeup: asyncio.Future[None] | None = None
        self._requests_done = False
        self.error: HoneyfleetError | None = None
        """Why the sensor's frames broke the stream's own rules (it ends)."""

    def schedule(self, relay: SessionRelay) -> None:
        """``relay`` has frames to send."""
        if not relay.scheduled:
            relay.scheduled = True
            self._ready.append(relay)
            self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def frames(self) -> AsyncIterator[Response | bytes]:
        """The frames for the sensor, one session's at a time in turn, until the sensor
        has half-closed and every session has ended (or the stream broke a rule)."""
        ready = self._ready
        # The frame last held back to fill: its session and size then.
        watched: tuple[SessionRelay, int] | None = None
        while True:
            if not ready:
                if self.error is not None or (self._requests_done and not self._sessions):
                    return
                self._wakeup = asyncio.get_running_loop().create_future()
                await self._wakeup
                self._wakeup = None
                continue
            size = ready[0].filling()
            if size is not None and watched != (ready[0], size):
                # Output that arrived in the last turn of the loop may have more behind
                # it: one more turn (no timer), then send what there is.
                watched = (ready[0], size)
                await asyncio.sleep(0)
                continue
            watched = None
            relay = ready.popleft()
            frame = relay.next_frame()
            if relay.has_frames():
                ready.append(relay)
            else:
                relay.scheduled = False
            if frame is None:
                frame = relay.closed()
                self._end(relay)
            if not isinstance(frame, bytes):
                frame.session_id = relay.id
            yield frame

    def _end(self, relay: SessionRelay) -> None:
        """The session's last frame is going out: forget it."""
        if self._sessions.get(relay.id) is relay:
            del self._sessions[relay.id]
        relay.release(self._pool)

    async def run_requests(self, requests: AsyncIterator[poolnode_pb2.SessionsRequest]) -> None:
        """Apply the sensor's frames until it half-closes (then its sessions are closed).

        A frame that breaks a session's rules ends that session; one that breaks the
        stream's (an id not above every earlier one) ends the stream.
        """
        try:
            async for request in requests:
                if request.WhichOneof("frame") == "open":
                    self._open(request.session_id, request.open)
                    continue
                relay = self._sessions.get(request.session_id)
                if relay is None:
                    continue  # ended while the frame was in flight
                try:
                    relay.apply(request)
                except HoneyfleetError as e:
                    log.warning("session %d of %s: %s", relay.id, self._sensor, e)
                    relay.fail(e)
        except HoneyfleetError as e:
            self.error = e
        finally:
            self._requests_done = True
            for relay in list(self._sessions.values()):
                relay.abandon()
            self._wake()

    def _open(self, session_id: int, request: poolnode_pb2.SessionOpen) -> None:
        """Start opening a session; its ``opened`` or ``closed`` frame follows."""
        if session_id <= self._last_id:
            raise InvalidArgument(f"session id {session_id} is not above every earlier one")
        self._last_id = session_id
        relay = self._sessions[session_id] = SessionRelay(self, session_id, request.lease_id)
        if len(self._sessions) > MAX_SESSIONS:
            relay.fail(ResourceExhausted(f"more than {MAX_SESSIONS} sessions on one stream"))
            return
        try:
            relay.login = self._pool.session_login(request.lease_id, self._sensor)
        except HoneyfleetError as e:
            relay.fail(e)
            return
        task = asyncio.create_task(self._open_channel(relay, relay.login, request))
        self._opening.add(task)
        task.add_done_callback(self._opening.discard)

    async def _open_channel(
        self, relay: SessionRelay, login: WarmLogin, request: poolnode_pb2.SessionOpen
    ) -> None:
        """Open the guest's channel of ``relay`` on ``login`` (or one more login)."""
        try:
            async with asyncio.timeout(OPEN_TIMEOUT):
                relay.host = await login.room()
        except (asyncssh.Error, OSError, TimeoutError) as e:
            relay.fail(Unavailable(f"guest {login.guest} took no further login: {e}"))
            return
        try:
            async with asyncio.timeout(OPEN_TIMEOUT):
                await relay.open(relay.host.conn, request)
            relay.untrack = self._pool.track_tunnel(request.lease_id, relay)
        except TimeoutError:
            relay.fail(Unavailable(f"guest {login.guest} did not open a session channel"))
            return
        except HoneyfleetError as e:
            relay.fail(e)
            return
        log.info(
            "session %d for lease %s (%s) on guest %s opened",
            relay.id,
            request.lease_id,
            self._sensor,
            login.guest,
        )
        relay.opened()

    async def close(self) -> None:
        """The stream is over: stop opening, close every session and give back what
        they held."""
        for task in list(self._opening):
            task.cancel()
        for task in list(self._opening):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        sessions, self._sessions = self._sessions, {}
        for relay in sessions.values():
            relay.release(self._pool)
