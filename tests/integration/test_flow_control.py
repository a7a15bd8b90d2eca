"""HTTP/2 flow control of fleet servers and of members' small-answer channels, on the wire.

A fleet server offers a fixed 4 MB window and sends no BDP probe (PING) for what it
receives; a channel with SMALL_ANSWERS sends none for what it receives. Each check has
a counterpart with gRPC's defaults, which do probe, so the frames read here would show
a probe if there were one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import grpc
import pytest

from honeyfleet.grpcserver import FIXED_WINDOW_BYTES, new_server
from honeyfleet.tls import SMALL_ANSWERS

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, SETTINGS, PING = 0x0, 0x1, 0x4, 0x6
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
INITIAL_WINDOW_SIZE = 0x4
METHOD = "/test.Echo/Echo"
TIMEOUT = 10  # for a local peer to send what the test waits for

Frame = tuple[int, int, int, bytes]  # type, flags, stream, payload


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame."""
    return (
        len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload
    )


def header_block(*fields: tuple[str, str]) -> bytes:
    """HPACK: every field a literal without indexing, with a literal name."""
    block = b""
    for name, value in fields:
        block += b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()
    return block


def grpc_message(body: bytes) -> bytes:
    """A gRPC length-prefixed message, uncompressed."""
    return b"\x00" + len(body).to_bytes(4, "big") + body


async def read_frame(reader: asyncio.StreamReader) -> Frame:
    """The next frame from the peer."""
    head = await reader.readexactly(9)
    length = int.from_bytes(head[:3], "big")
    stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
    return head[3], head[4], stream, await reader.readexactly(length)


def settings_of(payload: bytes) -> dict[int, int]:
    """The parameters of a SETTINGS frame."""
    return {
        int.from_bytes(payload[i : i + 2], "big"): int.from_bytes(payload[i + 2 : i + 6], "big")
        for i in range(0, len(payload), 6)
    }


def probes(frames: Sequence[Frame]) -> list[Frame]:
    """PINGs the peer started (not acknowledgements)."""
    return [f for f in frames if f[0] == PING and not f[1] & ACK]


async def echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    """The servers' one method."""
    return request


@pytest.fixture(params=["fleet", "grpc defaults"])
async def server(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, int]]:
    """A fleet server (new_server) or one with gRPC's defaults, serving Echo in cleartext."""
    srv = new_server(None) if request.param == "fleet" else grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    srv.add_generic_rpc_handlers((handler,))
    port = srv.add_insecure_port("127.0.0.1:0")
    await srv.start()
    try:
        yield request.param, port
    finally:
        await srv.stop(None)


async def test_a_fleet_server_offers_a_fixed_window_and_sends_no_probes(
    server: tuple[str, int],
) -> None:
    kind, port = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(PREFACE + frame(SETTINGS, 0, 0))
        request = header_block(
            (":method", "POST"),
            (":scheme", "http"),
            (":path", METHOD),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        )
        writer.write(frame(HEADERS, END_HEADERS, 1, request))
        writer.write(frame(DATA, END_STREAM, 1, grpc_message(b"x" * 100)))
        frames: list[Frame] = []
        async with asyncio.timeout(TIMEOUT):
            # Until the answer's trailers; with gRPC's defaults, until its probe too.
            while not any(f[0] == HEADERS and f[1] & END_STREAM for f in frames) or (
                kind != "fleet" and not probes(frames)
            ):
                frames.append(await read_frame(reader))
                if frames[-1][0] == SETTINGS and not frames[-1][1] & ACK:
                    writer.write(frame(SETTINGS, ACK, 0))
    finally:
        writer.close()
    first = next(settings_of(f[3]) for f in frames if f[0] == SETTINGS and not f[1] & ACK)
    if kind == "fleet":
        assert first.get(INITIAL_WINDOW_SIZE) == FIXED_WINDOW_BYTES
        assert probes(frames) == []
    else:
        assert probes(frames)


@pytest.mark.parametrize(
    ("options", "probed"), [(SMALL_ANSWERS, False), ((), True)], ids=["small answers", "default"]
)
async def test_a_small_answers_channel_sends_no_probes(
    options: Sequence[tuple[str, int]], probed: bool
) -> None:
    frames: list[Frame] = []
    probe, left = asyncio.Event(), asyncio.Event()

    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A server that answers one call, then records the client's frames until it leaves."""
        await reader.readexactly(len(PREFACE))
        writer.write(frame(SETTINGS, 0, 0))
        try:
            while True:
                frames.append(got := await read_frame(reader))
                if probes([got]):
                    probe.set()
                if got[0] == SETTINGS and not got[1] & ACK:
                    writer.write(frame(SETTINGS, ACK, 0))
                if got[0] == DATA and got[1] & END_STREAM:
                    response = header_block(
                        (":status", "200"), ("content-type", "application/grpc")
                    )
                    writer.write(frame(HEADERS, END_HEADERS, got[2], response))
                    writer.write(frame(DATA, 0, got[2], grpc_message(b"y" * 100)))
                    trailers = header_block(("grpc-status", "0"))
                    writer.write(frame(HEADERS, END_HEADERS | END_STREAM, got[2], trailers))
        except asyncio.IncompleteReadError:
            pass  # the client closed its connection
        finally:
            writer.close()
            left.set()

    listener = await asyncio.start_server(peer, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            call = channel.unary_unary(METHOD)
            assert await call(b"x", timeout=TIMEOUT) == b"y" * 100
            if probed:
                async with asyncio.timeout(TIMEOUT):
                    await probe.wait()
        # The channel is closed: once its connection has ended, every frame it sent is read.
        async with asyncio.timeout(TIMEOUT):
            await left.wait()
    finally:
        listener.close()
        await listener.wait_closed()
    assert bool(probes(frames)) is probed
