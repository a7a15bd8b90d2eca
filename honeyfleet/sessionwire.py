"""Data frames of the ``TunnelService.Sessions`` stream, encoded by hand.

Nearly every byte of an SSH session crosses the Sessions stream in a data frame of up
to 256 KiB. Built as a protobuf message, such a frame costs three more copies of its
data (into the message, into upb's encoder, into the bytes gRPC sends) and as many
fresh large allocations; written straight to the wire it costs one join. Both
``SessionsRequest`` and ``SessionsResponse`` carry data the same way (``session_id``
field 1, ``data`` field 3: a ``SessionData`` with ``data`` field 1, ``stream`` field
2), so one encoder serves both ends. Every other frame is an ordinary message:
:func:`serialize` is the stream's serializer for either.
"""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf.message import Message

# Tags (field number << 3 | wire type): varint 0, length-delimited 2.
_SESSION_ID = b"\x08"  # SessionsRequest/SessionsResponse.session_id = 1
_DATA = b"\x1a"  # SessionsRequest/SessionsResponse.data = 3
_DATA_BYTES = b"\x0a"  # SessionData.data = 1
_STREAM = b"\x10"  # SessionData.stream = 2


def _varint(value: int) -> bytes:
    """``value`` (not negative) as a protobuf varint."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def data_frame(session_id: int, stream: int, parts: Sequence[bytes]) -> bytes:
    """The wire form of a data frame of ``session_id`` carrying ``parts`` joined, on
    ``stream`` (a SessionStream value; 0 for input), as protobuf would encode it."""
    size = sum(map(len, parts))
    inner = _DATA_BYTES + _varint(size) if size else b""
    tail = _STREAM + _varint(stream) if stream else b""
    head = b"".join(
        (
            _SESSION_ID + _varint(session_id) if session_id else b"",
            _DATA,
            _varint(len(inner) + size + len(tail)),
            inner,
        )
    )
    return b"".join((head, *parts, tail))


def serialize(frame: Message | bytes) -> bytes:
    """The Sessions stream's serializer: a frame already encoded, or a message."""
    if isinstance(frame, bytes):
        return frame
    return frame.SerializeToString()
