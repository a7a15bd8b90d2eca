"""The frames of a session whose command ends while its channel opens.

asyncssh reads the guest's packets in batches: the confirmation of an exec request, the
command's output, exit status, EOF and close can all arrive in one read, so the
channel's callbacks run before the code that awaited the open resumes. The sensor must
still hear of the open first: a close before it reads as a refused channel (seen as
"Connection closed by remote host" on ``ssh host true``, about one setup in twenty).
"""

from __future__ import annotations

from typing import cast

from honeyfleet.v1 import poolnode_pb2
from poolnode.pool import GuestPool
from poolnode.sessions import STDOUT, GuestChannel, SessionMux, SessionRelay


def frames(relay: SessionRelay) -> list[str]:
    """The kinds of the frames the relay has for the stream, the end as "end"."""
    kinds = []
    while relay.has_frames():
        frame = relay.next_frame()
        if frame is None:
            kinds.append("end")
        elif isinstance(frame, bytes):
            parsed = poolnode_pb2.SessionsResponse.FromString(frame)
            kinds.append(f"data {parsed.data.data!r}")
        else:
            kinds.append(str(frame.WhichOneof("frame")))
    return kinds


def test_what_the_guest_says_before_the_open_is_done_follows_the_open() -> None:
    mux = SessionMux(cast(GuestPool, None), "sensor/s1")
    relay = SessionRelay(mux, 1, "lease-1")
    relay._credit = 4096  # as open() sets it from the sensor's window
    channel = GuestChannel(relay)
    # The whole life of `true` (or `echo hi`), read with the open's confirmation.
    channel.data_received(b"hi\n", None)
    channel.exit_status_received(0)
    channel.eof_received()
    channel.connection_lost(None)
    assert frames(relay) == []
    relay.opened()
    assert frames(relay) == ["opened", "data b'hi\\n'", "exit_status", "eof", "end"]


def test_output_after_the_open_goes_at_once() -> None:
    mux = SessionMux(cast(GuestPool, None), "sensor/s1")
    relay = SessionRelay(mux, 1, "lease-1")
    relay._credit = 4096
    relay.opened()
    relay.output(b"hello", STDOUT)
    assert frames(relay) == ["opened", "data b'hello'"]
