"""Hand-encoded Sessions data frames read back as protobuf's own."""

from __future__ import annotations

import pytest

from honeyfleet.sessionwire import data_frame, serialize
from honeyfleet.v1 import poolnode_pb2


@pytest.mark.parametrize("message", [poolnode_pb2.SessionsRequest, poolnode_pb2.SessionsResponse])
@pytest.mark.parametrize("session_id", [0, 1, 127, 128, 300, 2**32 - 1])
@pytest.mark.parametrize("stream", [0, poolnode_pb2.SESSION_STREAM_STDERR])
@pytest.mark.parametrize("parts", [[], [b""], [b"x"], [b"a" * 127, b"b"], [b"c" * 200_000] * 2])
def test_a_data_frame_is_what_protobuf_encodes(
    message: type[poolnode_pb2.SessionsRequest] | type[poolnode_pb2.SessionsResponse],
    session_id: int,
    stream: int,
    parts: list[bytes],
) -> None:
    expected = message(session_id=session_id)
    expected.data.data = b"".join(parts)
    expected.data.stream = stream  # type: ignore[assignment]
    wire = data_frame(session_id, stream, parts)
    assert wire == expected.SerializeToString()
    assert message.FromString(wire) == expected


def test_serialize_passes_encoded_frames_and_encodes_messages() -> None:
    wire = data_frame(3, 0, [b"ls\n"])
    assert serialize(wire) is wire
    frame = poolnode_pb2.SessionsResponse(session_id=3, exit_status=7)
    assert serialize(frame) == frame.SerializeToString()
