"""What a held shell costs below the sensor's own code: bare asyncssh, one gRPC stream.

    .venv/bin/python bench/memory_floor.py             # well under a minute
    .venv/bin/python bench/memory_floor.py --shells 50

Two floors under the sensor's memory per held shell (bench/ssh_proxy.py), each in a
process of its own on loopback, measured with ``--shells`` held at once:

* **asyncssh**: a bare asyncssh server (``asyncssh.listen``, password login, a pty
  session that echoes, ``SSHServerSession`` as the sensor's channels are) holding pty
  shells opened by asyncssh clients in this process: the least any sensor that
  terminates SSH with asyncssh holds per shell (connection, channel, ciphers, kex state);
* **gRPC stream**: a grpc.aio client holding open bidirectional streams (one message
  each way) to a generic echo server: what the sensor's relay held per SSH session
  channel in gRPC when each had its own stream (now one TunnelService.Sessions stream
  per pool node carries them all, sensor.tunnel.SessionMux);
  once on a default channel, once with the tunnels' ``NO_RETRY_STATE``.

Each is run twice: once for RSS growth per shell, once under tracemalloc for the Python
part of it (by line for asyncssh); for gRPC also the growth of the C heap's main arena
(mallinfo2, glibc), where gRPC's C core allocates its calls. Nothing is asserted; every
phase is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import functools
import gc
import json
import os
import signal
import sys
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncssh
import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ssh_proxy import Peer, bounded, held_shells  # noqa: E402
from honeyfleet.tls import NO_RETRY_STATE  # noqa: E402
from tests.conftest import free_port  # noqa: E402

TRACE_FRAMES = 1
SETTLE = 1.0  # seconds for per-session callbacks to run before a measurement
TOP = 8  # Python lines shown
# Larger requests go from pymalloc to malloc (CPython 3.11's SMALL_REQUEST_THRESHOLD).
PYMALLOC_MAX = 512


def rss_bytes() -> int:
    """This process's resident set size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ProcessLookupError("no VmRSS")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")
    ]  # fmt: skip


def malloc_in_use() -> int:
    """Bytes in use in glibc's main arena (where the event loop's thread allocates)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _Mallinfo2
    return int(libc.mallinfo2().uordblks)


def malloc_blocks(snap: tracemalloc.Snapshot) -> int:
    """Bytes of Python's allocations that malloc served (too large for pymalloc)."""
    return sum(trace.size for trace in snap.traces if trace.size > PYMALLOC_MAX)


class Measure:
    """RSS, main-arena malloc and (when tracing) Python bytes now, and the growth since."""

    def __init__(self) -> None:
        gc.collect()
        self.rss, self.malloc = rss_bytes(), malloc_in_use()
        self.snap = tracemalloc.take_snapshot() if tracemalloc.is_tracing() else None

    def growth(self, count: int) -> dict[str, object]:
        """Growth per each of ``count`` held things since construction."""
        gc.collect()
        out: dict[str, object] = {
            "rss": (rss_bytes() - self.rss) / count,
            "malloc": (malloc_in_use() - self.malloc) / count,
        }
        if self.snap is not None:
            now = tracemalloc.take_snapshot()
            stats = now.compare_to(self.snap, "lineno")
            out["python"] = sum(stat.size_diff for stat in stats) / count
            out["python_malloc"] = (malloc_blocks(now) - malloc_blocks(self.snap)) / count
            out["lines"] = [
                (str(stat.traceback[0]), stat.size_diff / count) for stat in stats[:TOP]
            ]
        return out


# The asyncssh floor: a server process, measured from inside on SIGUSR1/SIGUSR2.


class _Echo(asyncssh.SSHServerSession[bytes]):
    """A pty shell that echoes input (the client waits for its echo)."""

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self._chan = chan

    def pty_requested(self, *_args: object) -> bool:
        return True

    def shell_requested(self) -> bool:
        return True

    def data_received(self, data: bytes, _datatype: asyncssh.DataType) -> None:
        self._chan.write(data.replace(b"\n", b"\r\n"))


class _Login(asyncssh.SSHServer):
    """Any password; a session channel is an :class:`_Echo`."""

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return True

    def validate_password(self, username: str, password: str) -> bool:
        return True

    def session_requested(self) -> _Echo:
        return _Echo()


async def serve_ssh(port: int, shells: int) -> None:
    """The bare server: SIGUSR1 marks the start, SIGUSR2 prints the growth as JSON."""
    loop = asyncio.get_running_loop()
    start: list[Measure] = []
    loop.add_signal_handler(signal.SIGUSR1, lambda: start.append(Measure()))
    loop.add_signal_handler(
        signal.SIGUSR2, lambda: print(json.dumps(start[-1].growth(shells)), flush=True)
    )
    await asyncssh.listen(
        "127.0.0.1", port, server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
        server_factory=_Login, line_editor=False, encoding=None, allow_scp=False,
    )  # fmt: skip
    print("ready", flush=True)
    await asyncio.Event().wait()


async def ssh_floor(shells: int, trace: bool) -> dict[str, Any]:
    """Run the bare server in a child process and hold ``shells`` against it."""
    port = free_port()
    argv = [sys.executable, __file__, "--serve-ssh", str(port), "--shells", str(shells)]
    child = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, env={**os.environ, "FLOOR_TRACE": str(int(trace))}
    )
    assert child.stdout is not None
    try:
        await bounded("asyncssh server start", child.stdout.readline())
        peer = Peer("bare asyncssh", port, "root", "any")
        async with held_shells(peer, 3):
            pass  # warm-up: first-use allocations are not per shell
        child.send_signal(signal.SIGUSR1)
        await asyncio.sleep(SETTLE)
        async with held_shells(peer, shells):
            await asyncio.sleep(SETTLE)
            child.send_signal(signal.SIGUSR2)
            line = await bounded("asyncssh measurement", child.stdout.readline())
        return dict(json.loads(line))
    finally:
        child.terminate()
        await child.wait()


# The gRPC floor: a generic echo server and a client holding streams, both children.

METHOD = "/floor.Echo/Stream"


async def serve_grpc(port: int) -> None:
    """A bidirectional echo method on ``port`` (insecure: TLS is per connection, not
    per stream)."""

    async def echo(requests: object, _context: object) -> object:
        async for message in requests:  # type: ignore[attr-defined]
            yield message

    handler = grpc.method_handlers_generic_handler(
        "floor.Echo", {"Stream": grpc.stream_stream_rpc_method_handler(echo)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


async def hold_streams(port: int, streams: int, retries: bool) -> None:
    """Open ``streams`` streams on one channel, one round trip each; print the growth.
    Without ``retries``, the channel has the sensor's tunnels' NO_RETRY_STATE."""
    options = () if retries else NO_RETRY_STATE
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        method = channel.stream_stream(METHOD)
        held = [method()]
        await held[0].write(b"warm-up")
        await held[0].read()
        start = Measure()
        for _ in range(streams):
            call = method()
            await call.write(b"x" * 16)
            await call.read()
            held.append(call)
        await asyncio.sleep(SETTLE)
        print(json.dumps(start.growth(streams)), flush=True)
        for call in held:
            call.cancel()


async def grpc_floor(streams: int, trace: bool, retries: bool = True) -> dict[str, Any]:
    """The echo server and a client child; the client's growth per held stream."""
    port = free_port()
    server = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--serve-grpc", str(port), stdout=asyncio.subprocess.PIPE
    )
    assert server.stdout is not None
    try:
        await bounded("gRPC server start", server.stdout.readline())
        client = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--hold-streams", str(port), "--shells", str(streams),
            *([] if retries else ["--no-retries"]),
            stdout=asyncio.subprocess.PIPE, env={**os.environ, "FLOOR_TRACE": str(int(trace))},
        )  # fmt: skip
        out, _ = await bounded("gRPC streams", client.communicate())
        return dict(json.loads(out))
    finally:
        server.terminate()
        await server.wait()


def report(name: str, plain: dict[str, Any], traced: dict[str, Any]) -> None:
    """One floor's figures (KB per held shell or stream)."""
    python = traced["python"]
    # What malloc served beyond Python's own large blocks: C libraries (gRPC's core).
    native = plain["malloc"] - traced["python_malloc"]
    print(
        f"{name}: in use {(python + native) / 1e3:.1f} KB per held one = Python "
        f"{python / 1e3:.1f} (tracemalloc) + C {native / 1e3:.1f} (glibc main arena); "
        f"RSS growth {plain['rss'] / 1e3:.1f} KB. Largest Python lines:"
    )
    for where, size in traced["lines"]:
        print(f"    {size:7.0f} B  {'/'.join(Path(where).parts[-2:])}")


async def run(args: argparse.Namespace) -> None:
    """Both floors, each untraced then traced."""
    floors: tuple[tuple[str, Callable[..., Awaitable[dict[str, Any]]]], ...] = (
        ("bare asyncssh shell", ssh_floor),
        ("gRPC aio stream", grpc_floor),
        ("gRPC aio stream, NO_RETRY_STATE", functools.partial(grpc_floor, retries=False)),
    )
    for name, floor in floors:
        plain = await floor(args.shells, trace=False)
        traced = await floor(args.shells, trace=True)
        report(name, plain, traced)


def main() -> None:
    """Parse arguments; run the benchmark or one of its child roles."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shells", type=int, default=100, help="shells (streams) held")
    roles = parser.add_mutually_exclusive_group()
    roles.add_argument("--serve-ssh", type=int, metavar="PORT", help=argparse.SUPPRESS)
    roles.add_argument("--serve-grpc", type=int, metavar="PORT", help=argparse.SUPPRESS)
    roles.add_argument("--hold-streams", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--no-retries", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if os.environ.get("FLOOR_TRACE") == "1":
        tracemalloc.start(TRACE_FRAMES)
    if args.serve_ssh:
        asyncio.run(serve_ssh(args.serve_ssh, args.shells))
    elif args.serve_grpc:
        asyncio.run(serve_grpc(args.serve_grpc))
    elif args.hold_streams:
        asyncio.run(hold_streams(args.hold_streams, args.shells, retries=not args.no_retries))
    else:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
