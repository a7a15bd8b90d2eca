"""One SSH session channel on a guest's warm login, relayed as protobuf frames.

The sensor holds the attacker's SSH connection, the node the guest's
(:mod:`poolnode.guest_login`). :class:`SessionRelay` opens the channel the sensor's
``open`` frame describes on the warm login, then turns the sensor's frames into channel
operations and the channel's callbacks into frames for the sensor.

Flow control is credit-based on the node's leg, as SSH windows are on the others: the
node sends the sensor at most the output bytes it was granted and stops reading the
guest's channel when the credit is spent (so the guest's SSH window closes); it grants
input credit back only once the guest's channel has taken the data. Nothing queues
without bound anywhere between the attacker and the guest.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator
from typing import TypeAlias

import asyncssh

from honeyfleet.errors import FailedPrecondition, HoneyfleetError, InvalidArgument
from honeyfleet.v1 import poolnode_pb2

log = logging.getLogger(__name__)

# Output bytes one frame carries at most: large frames keep gRPC's per-message cost low.
MAX_DATA = 256 * 1024
# Input bytes the sensor may have in flight; granted back as the guest's channel takes them.
WINDOW = 1024 * 1024
# Input credit is granted back in steps of at least this much (fewer frames).
GRANT_STEP = WINDOW // 4

STREAMS = {
    None: poolnode_pb2.SESSION_STREAM_STDOUT,
    asyncssh.EXTENDED_DATA_STDERR: poolnode_pb2.SESSION_STREAM_STDERR,
}
Response = poolnode_pb2.SessionResponse
Stream: TypeAlias = poolnode_pb2.SessionStream.ValueType


class GuestChannel(asyncssh.SSHClientSession[bytes]):
    """asyncssh's callbacks on the guest's channel, handed to the relay."""

    def __init__(self, relay: SessionRelay) -> None:
        self._relay = relay

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        """Guest output."""
        self._relay.output(data, STREAMS.get(datatype, poolnode_pb2.SESSION_STREAM_STDOUT))

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
        """The guest's channel is closed: the stream ends."""
        self._relay.finish()


class SessionRelay:
    """One Session stream: the guest's channel and the frames both ways."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._chan: asyncssh.SSHClientChannel[bytes] | None = None
        self._outbox: deque[Response | None] = deque()  # for the stream now
        self._ready = asyncio.Event()
        self._credit = 0  # output bytes the sensor still takes
        # Output past the credit, and the frames behind it (None: the end).
        self._held: deque[Response | None] = deque()
        self._input_credit = WINDOW  # input bytes the sensor may still send
        self._owed = 0  # input taken by the guest's channel, not yet granted back
        self._blocked = False
        self.bytes_in = 0
        self.bytes_out = 0
        self.error: HoneyfleetError | None = None
        """Why the sensor's frames ended the session, if they broke the protocol."""

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

    # Guest -> sensor.

    def send(self, frame: Response | None) -> None:
        """Queue a frame for the sensor (None: the end), behind any output held back."""
        if self._held:
            self._held.append(frame)
        else:
            self._post(frame)

    def _post(self, frame: Response | None) -> None:
        """Hand a frame to the stream now."""
        self._outbox.append(frame)
        self._ready.set()

    def output(self, data: bytes, stream: Stream) -> None:
        """Guest output: send what the credit allows, hold the rest and stop reading."""
        frame = Response(data=poolnode_pb2.SessionData(data=data, stream=stream))
        if self._held or len(data) > self._credit:
            self._held.append(frame)
            self._flush_held()
            return
        self._credit -= len(data)
        self._post(frame)

    def _flush_held(self) -> None:
        """Send held frames in order, output within the credit; read the guest only once
        nothing is held."""
        while self._held:
            frame = self._held[0]
            if frame is not None and frame.WhichOneof("frame") == "data":
                if not self._credit:
                    break
                data = frame.data.data
                if len(data) > self._credit:
                    part, rest = data[: self._credit], data[self._credit :]
                    frame.data.data = rest
                    frame = Response(
                        data=poolnode_pb2.SessionData(data=part, stream=frame.data.stream)
                    )
                else:
                    self._held.popleft()
                self._credit -= len(frame.data.data)
            else:
                self._held.popleft()
            self._post(frame)
        if self._chan is not None:
            if self._held:
                self._chan.pause_reading()
            else:
                self._chan.resume_reading()

    def finish(self) -> None:
        """The guest's channel closed: end the stream after what is queued."""
        self.send(None)

    async def frames(self) -> AsyncIterator[Response]:
        """The frames for the sensor, consecutive output of one stream merged, until the
        guest's channel closes."""
        while True:
            await self._ready.wait()
            self._ready.clear()
            while self._outbox:
                frame = self._outbox.popleft()
                if frame is None:
                    return
                if frame.WhichOneof("frame") == "data":
                    frame = self._merge(frame)
                    self.bytes_out += len(frame.data.data)
                yield frame

    def _merge(self, first: Response) -> Response:
        """``first`` with the output frames of the same stream queued right behind it."""
        stream = first.data.stream
        parts = [first.data.data]
        size = len(parts[0])
        while self._outbox and size < MAX_DATA:
            nxt = self._outbox[0]
            if nxt is None or nxt.WhichOneof("frame") != "data" or nxt.data.stream != stream:
                break
            if size + len(nxt.data.data) > MAX_DATA:
                break
            self._outbox.popleft()
            parts.append(nxt.data.data)
            size += len(parts[-1])
        if len(parts) == 1:
            return first
        return Response(data=poolnode_pb2.SessionData(data=b"".join(parts), stream=stream))

    # Sensor -> guest.

    async def run_requests(self, requests: AsyncIterator[poolnode_pb2.SessionRequest]) -> None:
        """Apply the sensor's frames to the guest's channel until it closes or the sensor
        stops sending (then the channel is closed)."""
        try:
            async for request in requests:
                if not self._apply(request):
                    break
        except HoneyfleetError as e:
            self.error = e
            self._post(None)
        finally:
            self.close()

    def _apply(self, request: poolnode_pb2.SessionRequest) -> bool:
        """One frame from the sensor; False once the channel is to be closed."""
        chan = self._chan
        assert chan is not None
        match request.WhichOneof("frame"):
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
                return False
            case other:
                raise InvalidArgument(f"unexpected {other} frame in an open session")
        return True

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

    def opened(self) -> Response:
        """The answer to the open frame."""
        return Response(opened=poolnode_pb2.SessionOpened(window=WINDOW))

    def close(self) -> None:
        """Close the guest's channel (the lease ended, or the sensor is done)."""
        if self._chan is not None:
            self._chan.close()
