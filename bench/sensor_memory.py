"""Where a sensor's memory goes: idle, and per held shell, by line of code (tracemalloc).

    .venv/bin/python bench/sensor_memory.py               # about a minute; needs root
    .venv/bin/python bench/sensor_memory.py --shells 50 --top 40

The fleet of bench/ssh_proxy.py (Debian's sshd as the guest, controller, static pool
node, sensor: each its own process, on loopback), with the sensor run under tracemalloc
(bench/traced_role.py). After a few warm-up sessions the sensor writes a snapshot; then
``--shells`` pty shells are opened and held (each proven alive by an echo) and it
writes another. Printed:

* the sensor's RSS (anonymous and file-backed) idle, and its growth per held shell
  (tracing itself costs memory: these are higher than bench/ssh_proxy.py's);
* the Python heap at idle: what imports allocated against what the running sensor did;
* the Python allocations per held shell, by the innermost line of the project's own
  code on their stack (an allocation made in a callback of asyncio or asyncssh with no
  project frame below it is shown by its own line), largest first.

Nothing is asserted; every phase is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import tracemalloc
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fleet import Processes, start_fleet  # noqa: E402
from bench.openssh import start_sshd  # noqa: E402
from bench.ssh_proxy import (  # noqa: E402
    ATTACKER_PASSWORD,
    BACKEND_PASSWORD,
    BACKEND_USER,
    OpenSshClient,
    Peer,
    bounded,
    held_shells,
    sensor_settings,
    until_serving,
)
from tests.conftest import free_port  # noqa: E402

PROJECT = ("sensor", "honeyfleet", "poolnode", "controller")
# Below every callback of the event loop: never the place an allocation is charged to.
ENTRY = Path("honeyfleet/cli.py")
SNAPSHOT_TIMEOUT = 120.0
IGNORED = [tracemalloc.Filter(False, tracemalloc.__file__)]


def memory(pid: int) -> dict[str, int]:
    """RSS and its anonymous and file-backed parts, in bytes."""
    fields = ("VmRSS", "RssAnon", "RssFile")
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in fields:
            values[name] = int(rest.split()[0]) * 1024
    return values


def dumped(out: Path) -> int:
    """How many snapshots the traced process has written so far."""
    done = Path(f"{out}.done")
    return len(done.read_text().splitlines()) if done.exists() else 0


async def snapshot(pid: int, out: Path) -> tracemalloc.Snapshot:
    """Have the traced process write its next snapshot; load it."""
    count = await asyncio.to_thread(dumped, out)
    os.kill(pid, signal.SIGUSR1)
    while await asyncio.to_thread(dumped, out) == count:  # noqa: ASYNC110 (another process)
        await asyncio.sleep(0.2)
    loaded = await asyncio.to_thread(tracemalloc.Snapshot.load, f"{out}.{count}")
    return loaded.filter_traces(IGNORED)


def where(traceback: tracemalloc.Traceback) -> str:
    """The innermost frame in the project's code, else the allocating frame."""
    frames = list(reversed(traceback))  # most recent first
    for frame in frames:
        path = Path(frame.filename)
        if not path.is_relative_to(ROOT):
            continue
        relative = path.relative_to(ROOT)
        if relative.parts[0] in PROJECT and relative != ENTRY:
            return f"{relative}:{frame.lineno}"
    package_and_file = "/".join(Path(frames[0].filename).parts[-2:])
    return f"{package_and_file}:{frames[0].lineno} (no project frame)"


def idle_heap(idle: tracemalloc.Snapshot) -> tuple[int, int]:
    """Bytes allocated while importing, and by everything else."""
    imports = other = 0
    for trace in idle.traces:
        if any("importlib._bootstrap" in frame.filename for frame in trace.traceback):
            imports += trace.size
        else:
            other += trace.size
    return imports, other


def per_shell(idle: tracemalloc.Snapshot, held: tracemalloc.Snapshot) -> Counter[str]:
    """Bytes allocated between the snapshots, by :func:`where`."""
    growth: Counter[str] = Counter()
    for stat in held.compare_to(idle, "traceback"):
        growth[where(stat.traceback)] += stat.size_diff
    return growth


async def run(args: argparse.Namespace) -> None:
    """Start the fleet with a traced sensor, take both snapshots, print."""
    if os.geteuid() != 0:
        raise SystemExit("needs root: Debian's sshd")
    client = OpenSshClient()
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        workdir = Path(tmp)
        await asyncio.to_thread(workdir.chmod, 0o755)  # the sshd account's home is inside
        procs = Processes(workdir)
        try:
            backend = free_port()
            await start_sshd(procs, workdir / "sshd", backend, BACKEND_PASSWORD, BACKEND_USER)
            port = free_port()
            plain = await start_fleet(
                workdir, procs, f"127.0.0.1:{backend}", BACKEND_PASSWORD,
                sensor_settings(port, args.shells), backend_user=BACKEND_USER,
            )  # fmt: skip
            # The same sensor again, traced (start_fleet wrote its config).
            plain.send_signal(signal.SIGTERM)
            await plain.wait()
            out = workdir / "snapshot"
            os.environ["HF_TRACEMALLOC_OUT"] = str(out)
            sensor = await procs.start(
                "sensor-traced", sys.executable, "-m", "bench.traced_role", "sensor",
                "--config", str(workdir / "honeyfleet.toml"),
            )  # fmt: skip
            peer = Peer("fleet", port, "root", ATTACKER_PASSWORD, {"sensor": sensor.pid})
            await bounded("sensor start", until_serving(client, peer))
            for _ in range(3):
                await client.setup(peer)
            await asyncio.sleep(2)
            before = memory(sensor.pid)
            idle = await bounded("idle snapshot", snapshot(sensor.pid, out))
            async with held_shells(peer, args.shells):
                await asyncio.sleep(2)  # let per-session tasks settle
                after = memory(sensor.pid)
                held = await bounded("held snapshot", snapshot(sensor.pid, out))
        finally:
            await procs.stop()
    report(args, before, after, idle, held)


def report(
    args: argparse.Namespace,
    before: dict[str, int],
    after: dict[str, int],
    idle: tracemalloc.Snapshot,
    held: tracemalloc.Snapshot,
) -> None:
    """The figures."""
    mib = 2**20
    print(
        f"\nSensor under tracemalloc (loopback): idle RSS {before['VmRSS'] / mib:.1f} MiB "
        f"(anonymous {before['RssAnon'] / mib:.1f}, file-backed {before['RssFile'] / mib:.1f})"
    )
    imports, other = idle_heap(idle)
    print(f"  Python heap idle: {imports / mib:.1f} MiB from imports, {other / mib:.2f} MiB else")
    growth = per_shell(idle, held)
    shells = args.shells
    rss = (after["VmRSS"] - before["VmRSS"]) / shells / 1e3
    print(
        f"  per held shell ({shells}): RSS {rss:.1f} KB, Python "
        f"{sum(growth.values()) / shells / 1e3:.1f} KB, by line:"
    )
    for line, size in growth.most_common(args.top):
        print(f"    {size / shells:8.0f} B  {line}")


def main() -> None:
    """Parse arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shells", type=int, default=100, help="shells held")
    parser.add_argument("--top", type=int, default=30, help="lines shown per held shell")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
