"""SSH proxy benchmark: through the sensor versus direct SSH to the same backend, in one run.

    .venv/bin/python bench/ssh_proxy.py                         # about a minute
    .venv/bin/python bench/ssh_proxy.py --sessions 50 --megabytes 64

Everything runs on loopback, each role in its own process as in production: the backend
SSH server (tests/sshd.py: asyncssh with a real /bin/sh), ``honeyfleet controller``,
``honeyfleet poolnode`` (static backend pointing at that server) and ``honeyfleet
sensor``. This process plays the clients with asyncssh. Figures, each direct and
through the sensor, with the ratio sensor/direct:

* session setup: from TCP connect to the exit status of ``true`` (key exchange, password
  login and, through the sensor, lease, tunnel and guest login), median and p90 of
  ``--setups`` sessions one after another;
* upload and download: one SFTP transfer of ``--megabytes``, MB/s, median of
  ``--repeat`` (through the sensor the upload is also captured: hashed and stored);
* memory per session: growth of the serving process's RSS (the backend's directly, the
  sensor's through it) with ``--sessions`` interactive pty shells open at once, divided
  by their number; measured first, after three warm-up sessions, because the later
  phases leave freed heap behind that new sessions would reuse unseen. The backend's
  growth during the sensor's run is shown too.

Nothing is asserted; every phase is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import sys
import tempfile
import time
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import asyncssh

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fleet import Processes, rss_bytes, start_fleet  # noqa: E402
from tests.postgres import free_port  # noqa: E402
from tests.sshd import PASSWORD, Sshd  # noqa: E402

# An attacker's password: the sensor's default userdb lets root in with it.
SENSOR_PASSWORD = "bench-password"  # noqa: S105
PHASE_TIMEOUT = 300.0
T = TypeVar("T")


@dataclass(frozen=True)
class Figures:
    """What one path measured."""

    setups: list[float]
    uploads: list[float]
    downloads: list[float]
    memory: tuple[float, float]


@dataclass(frozen=True)
class Target:
    """Where clients connect, as whom, and which process serves them."""

    name: str
    port: int
    password: str
    server_pid: int


async def connect(target: Target) -> asyncssh.SSHClientConnection:
    """A password login as root."""
    return await asyncssh.connect(
        "127.0.0.1",
        target.port,
        username="root",
        password=target.password,
        known_hosts=None,
        client_keys=None,
        agent_path=None,
        preferred_auth="password",
    )


async def until_serving(target: Target) -> None:
    """Retry a session until one works (the fleet registers and boots in the background)."""
    while True:
        try:
            conn = await connect(target)
            async with conn:
                await conn.run("true", check=True)
            return
        except (OSError, asyncssh.Error):
            await asyncio.sleep(0.5)


async def setup_latency(target: Target, count: int) -> list[float]:
    """Seconds from connect to the exit status of ``true``, one session after another."""
    times = []
    for _ in range(count):
        start = time.perf_counter()
        conn = await connect(target)
        await conn.run("true", check=True)
        times.append(time.perf_counter() - start)
        conn.close()
        await conn.wait_closed()
    return times


async def transfer_rates(
    target: Target, local: Path, size_mb: float, repeat: int
) -> tuple[list[float], list[float]]:
    """(upload, download) MB/s of SFTP transfers of ``local`` and of the backend's
    ``download.bin`` (the same bytes)."""
    uploads, downloads = [], []
    conn = await connect(target)
    async with conn, conn.start_sftp_client() as sftp:
        for n in range(repeat):
            start = time.perf_counter()
            await sftp.put(str(local), f"upload-{n}.bin")
            uploads.append(size_mb / (time.perf_counter() - start))
            fetched = local.with_name(f"fetched-{target.name}-{n}.bin")
            start = time.perf_counter()
            await sftp.get("download.bin", str(fetched))
            downloads.append(size_mb / (time.perf_counter() - start))
            fetched.unlink()
    return uploads, downloads


@contextlib.asynccontextmanager
async def open_shells(target: Target, count: int) -> AsyncIterator[None]:
    """``count`` interactive pty shells open at once, each proven alive by an echo."""
    conns: list[asyncssh.SSHClientConnection] = []
    try:
        for n in range(count):
            conn = await connect(target)
            conns.append(conn)
            shell = await conn.create_process(term_type="xterm", term_size=(80, 24))
            shell.stdin.write(f"echo ready-{n}\n")
            await shell.stdout.readuntil(f"ready-{n}\r\n")
        yield
    finally:
        for conn in conns:
            conn.close()
        for conn in conns:
            await conn.wait_closed()


async def memory_per_session(target: Target, count: int, guest_pid: int) -> tuple[float, float]:
    """(serving process, backend) RSS growth per session with ``count`` shells open."""
    await asyncio.sleep(1)
    before = rss_bytes(target.server_pid), rss_bytes(guest_pid)
    async with open_shells(target, count):
        await asyncio.sleep(1)  # let per-session tasks settle
        after = rss_bytes(target.server_pid), rss_bytes(guest_pid)
    return (after[0] - before[0]) / count, (after[1] - before[1]) / count


async def bounded(phase: str, work: Awaitable[T]) -> T:
    """Run a phase within PHASE_TIMEOUT, saying which one overran."""
    try:
        async with asyncio.timeout(PHASE_TIMEOUT):
            return await work
    except TimeoutError:
        raise SystemExit(f"benchmark phase {phase!r} took over {PHASE_TIMEOUT:.0f}s") from None


async def start_sensor_fleet(
    workdir: Path, procs: Processes, guest_port: int, sessions: int
) -> tuple[int, int]:
    """Controller, pool node and sensor processes; the sensor's port and pid."""
    sensor_port = free_port()
    sensor = await start_fleet(
        workdir,
        procs,
        f"127.0.0.1:{guest_port}",
        PASSWORD,
        {
            "ssh_listen": [f"127.0.0.1:{sensor_port}"],
            "telnet_listen": [],
            "max_connections_per_ip": sessions + 16,
            "max_connections": sessions + 64,
        },
    )
    return sensor_port, sensor.pid


def report(name: str, direct: float, sensor: float, unit: str, fmt: str = "{:.1f}") -> None:
    """One row: direct, sensor and the ratio."""
    ratio = sensor / direct if direct else float("nan")
    figures = f"{fmt.format(direct):>12} {fmt.format(sensor):>12}"
    print(f"  {name:<28} {figures} {unit:<6} x{ratio:.2f}")


def summary(samples: list[float]) -> tuple[float, float]:
    """(median, p90)."""
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


async def run(args: argparse.Namespace) -> None:
    """Start everything, measure both paths, print the figures, stop everything."""
    with tempfile.TemporaryDirectory(prefix="bench-ssh-") as tmp:
        workdir = Path(tmp)
        procs = Processes(workdir)
        try:
            home = workdir / "home"
            guest = await procs.start(
                "guest", sys.executable, __file__, "--guest", str(home), stdout=PIPE
            )
            assert guest.stdout is not None
            guest_port = int(await bounded("backend start", guest.stdout.readline()))
            sensor_port, sensor_pid = await start_sensor_fleet(
                workdir, procs, guest_port, args.sessions
            )
            direct = Target("direct", guest_port, PASSWORD, guest.pid)
            sensor = Target("sensor", sensor_port, SENSOR_PASSWORD, sensor_pid)
            await bounded("fleet start", until_serving(sensor))

            payload = workdir / "payload.bin"
            await asyncio.to_thread(_write_payload, payload, home, args.megabytes)
            size_mb = (args.megabytes << 20) / 1e6  # rates are in MB/s (10^6 bytes)
            results = {}
            for target in (direct, sensor):
                await bounded("warm-up", setup_latency(target, 3))
                memory = await bounded(
                    "memory", memory_per_session(target, args.sessions, guest.pid)
                )
                setups = await bounded("setup", setup_latency(target, args.setups))
                uploads, downloads = await bounded(
                    "transfer", transfer_rates(target, payload, size_mb, args.repeat)
                )
                results[target.name] = Figures(setups, uploads, downloads, memory)
        finally:
            await procs.stop()
    _print(args, results)


def _write_payload(payload: Path, home: Path, megabytes: int) -> None:
    """Random bytes to upload, and the same as the backend's ``download.bin``."""
    data = os.urandom(megabytes << 20)
    payload.write_bytes(data)
    (home / "download.bin").write_bytes(data)


def _print(args: argparse.Namespace, results: dict[str, Figures]) -> None:
    """The table."""
    direct, sensor = results["direct"], results["sensor"]
    d_med, d_p90 = summary(direct.setups)
    s_med, s_p90 = summary(sensor.setups)
    print(
        f"\nSSH through the sensor vs direct to the backend (loopback, {os.cpu_count()} CPUs; "
        f"{args.setups} setups, {args.repeat}x{args.megabytes} MB SFTP, "
        f"{args.sessions} shells)"
    )
    print(f"  {'':<28} {'direct':>12} {'sensor':>12} {'':<6} ratio")
    report("session setup, median", d_med * 1000, s_med * 1000, "ms")
    report("session setup, p90", d_p90 * 1000, s_p90 * 1000, "ms")
    median = statistics.median
    report("upload (SFTP put)", median(direct.uploads), median(sensor.uploads), "MB/s")
    report("download (SFTP get)", median(direct.downloads), median(sensor.downloads), "MB/s")
    report("memory per session", direct.memory[0] / 1024, sensor.memory[0] / 1024, "KiB", "{:.0f}")
    print(
        f"  (the backend grew {sensor.memory[1] / 1024:.0f} KiB per session during the "
        "sensor's run: those are the guest side of the sensor's sessions)"
    )


def serve_guest(home: Path) -> None:
    """Child-process mode: run the backend SSH server until SIGTERM; its port on stdout."""

    async def main() -> None:
        sshd = Sshd(home)
        port = await sshd.start()
        print(port, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await sshd.stop()

    asyncio.run(main())


def main() -> None:
    """Parse arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", type=int, default=30, help="sessions timed for setup")
    parser.add_argument("--megabytes", type=int, default=32, help="size of each transfer")
    parser.add_argument("--repeat", type=int, default=3, help="transfers each way")
    parser.add_argument("--sessions", type=int, default=50, help="shells open for memory")
    parser.add_argument("--guest", metavar="HOME", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.guest:
        serve_guest(Path(args.guest))
        return
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
