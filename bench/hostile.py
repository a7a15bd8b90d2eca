"""Hostile-traffic benchmark: what attackers cost a legitimate client, sensor vs OpenSSH.

The sensor runs with default bounds in a fleet on loopback; Debian's OpenSSH sshd,
started by the benchmark on loopback, is the baseline.

    .venv/bin/python bench/hostile.py                          # about five minutes
    .venv/bin/python bench/hostile.py --duration 30 --scenarios slowloris-ssh,churn
    .venv/bin/python bench/hostile.py --servers sensor

Needs root (sshd), ``apt-get install openssh-server busybox-static sshpass``.

Both servers run side by side and each scenario runs on one, then the other (so the pair
sees about the same load from whatever else the machine runs): attackers on loopback
addresses of the scenario's own (127.0.N.1, 127.0.N.2, ...; ``--addresses``) while a
legitimate client logs in from 127.0.0.2 and runs ``true``, one login after another
(OpenSSH ``ssh`` under sshpass; 0.2 s pause after a failure), for ``--duration``
seconds after ``--ramp`` seconds of attack. Scenarios:

* ``idle``: no attack, for reference;
* ``brute-force``: ``--workers`` connections at a time guessing 8 passwords each for
  unknown users;
* ``slowloris-ssh`` / ``slowloris-telnet``: 16 connections per address, half silent,
  half trickling a byte every 5 s (an SSH banner and a KEXINIT never finished; a
  Telnet username never ended), each reopened a second after the server closes it;
* ``garbage``: ``--workers`` connections at a time sending 64 KiB of random bytes,
  every other one after a valid SSH banner;
* ``churn``: ``--workers`` connect-and-close loops (every other one reads the banner);
* ``channels``: 8 logged-in connections opening session channels (``cat``) and
  direct-tcpip channels (to 127.0.0.1:9, a 30 KB originator) until refused, closing
  them, and again a second later;
* ``never-reads``: 8 logged-in connections each running ``cat /dev/zero`` on 2 channels
  with a 1 GiB window, then never reading their socket again.

Figures per scenario: the legitimate client's success rate, p50 and p99 of its login
time (connect to exit status of ``true``, successful logins only), and the server's
peak RSS, descriptors and processes (sampled from /proc four times a second; summed
over the server's process tree: the sensor is one process, sshd forks per connection
so shared pages count once per process), with the 1-minute load average at the end.

The sensor runs as ``honeyfleet sensor --config FILE`` with default bounds (only its
listeners set), behind a controller and a pool node whose one guest is another
throwaway OpenSSH sshd. The baseline is sshd with Debian's defaults (bench/openssh.py)
and, for Telnet, busybox telnetd (the guest image's) on its own port: a Telnet attack
there costs the SSH client only CPU. Nothing is asserted; every loop is bounded in
count and time. Logs of every process (and the sensor's state: the never-reads
sessions' recordings alone take a few hundred MB) stay in the printed work directory
with ``--keep``; without it the directory is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import attacks  # noqa: E402
from bench.attacks import Attack, AttackFunction, Target  # noqa: E402
from bench.fleet import Processes, Usage, start_fleet, tree_usage  # noqa: E402
from bench.openssh import require, start_sshd, start_telnetd, until_banner  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.integration.ssh_fleet import SSH_OPTIONS, run  # noqa: E402

LEGIT_SOURCE = "127.0.0.2"
# The sensor's default userdb lets root in with any password but "root".
SENSOR_PASSWORD = "bench-password"  # noqa: S105
BASELINE_PASSWORD = "baseline-secret"  # noqa: S105
GUEST_PASSWORD = "guest-secret"  # noqa: S105
# Seconds one legitimate login may take before it counts as failed.
LOGIN_TIMEOUT = 30.0
MAX_LOGINS = 10_000
# A refused login is tried again after this long (as a person or a script would, not at
# once: a refusal takes a millisecond and would otherwise flood the tallies).
RETRY_DELAY = 0.2
SAMPLE_INTERVAL = 0.25
# Seconds to wait after an attack for the server to drop back to its idle descriptors
# and processes (busybox telnetd's logins may linger).
SETTLE_TIMEOUT = 30.0
START_TIMEOUT = 180.0
# Attack stops must not hang the run.
STOP_TIMEOUT = 30.0


NOTHING = Usage(0, 0, 0)


@dataclass(frozen=True)
class Scenario:
    """An attack and how many workers it runs."""

    name: str
    run: AttackFunction
    workers: int


@dataclass(frozen=True)
class Server:
    """A target and the processes whose usage is measured."""

    target: Target
    pids: tuple[int, ...]


@dataclass
class Row:
    """What one scenario against one server measured."""

    server: str
    scenario: str
    logins: list[float] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    peak: Usage = NOTHING
    idle: Usage = NOTHING
    counts: Counter[str] = field(default_factory=Counter)
    load: float = 0.0


def scenarios(workers: int) -> list[Scenario]:
    """Every scenario, in the order they run."""
    return [
        Scenario("idle", attacks.idle, 0),
        Scenario("brute-force", attacks.brute_force, workers),
        Scenario("slowloris-ssh", attacks.slowloris_ssh, 16),
        Scenario("slowloris-telnet", attacks.slowloris_telnet, 16),
        Scenario("garbage", attacks.garbage, workers),
        Scenario("churn", attacks.churn, workers),
        Scenario("channels", attacks.channel_abuse, 8),
        Scenario("never-reads", attacks.never_reads, 8),
    ]


async def legit_login(target: Target) -> tuple[bool, float, str]:
    """One login running ``true``: (succeeded, seconds, why it failed)."""
    ssh = require("ssh", "openssh-client")
    start = time.perf_counter()
    try:
        code, _out, err = await run(
            ssh, *SSH_OPTIONS, "-b", LEGIT_SOURCE, "-p", str(target.ssh_port),
            "root@127.0.0.1", "true", password=target.password, timeout=LOGIN_TIMEOUT,
        )  # fmt: skip
    except TimeoutError:
        return False, time.perf_counter() - start, f"no answer in {LOGIN_TIMEOUT:.0f}s"
    elapsed = time.perf_counter() - start
    reason = err.decode(errors="replace").strip().splitlines()[-1:] or [f"exit {code}"]
    return code == 0, elapsed, "" if code == 0 else reason[0][:100]


async def sample(server: Server, row: Row, stop: asyncio.Event) -> None:
    """Keep the peak of the server's usage in ``row`` until ``stop``."""
    while not stop.is_set():
        usage = await asyncio.to_thread(total_usage, server)
        row.peak = Usage(
            max(row.peak.rss, usage.rss),
            max(row.peak.fds, usage.fds),
            max(row.peak.processes, usage.processes),
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_INTERVAL)


def total_usage(server: Server) -> Usage:
    """Usage summed over the server's process trees."""
    usages = [tree_usage(pid) for pid in server.pids]
    return Usage(
        sum(u.rss for u in usages), sum(u.fds for u in usages), sum(u.processes for u in usages)
    )


async def run_scenario(
    server: Server, scenario: Scenario, block: int, args: argparse.Namespace
) -> Row:
    """Attack from 127.0.``block``.x while the legitimate client logs in; the figures."""
    row = Row(server.target.name, scenario.name)
    row.idle = await asyncio.to_thread(total_usage, server)
    sources = [f"127.0.{block}.{n}" for n in range(1, args.addresses + 1)]
    deadline = time.monotonic() + args.ramp + args.duration + LOGIN_TIMEOUT
    attack = Attack(server.target, sources, deadline, row.counts, scenario.workers)
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample(server, row, stop))
    attacking = asyncio.create_task(scenario.run(attack))
    try:
        await asyncio.sleep(args.ramp)
        end = time.monotonic() + args.duration
        while time.monotonic() < end and len(row.logins) + row.failures.total() < MAX_LOGINS:
            ok, seconds, reason = await legit_login(server.target)
            if ok:
                row.logins.append(seconds)
            else:
                row.failures[reason] += 1
                await asyncio.sleep(RETRY_DELAY)
    finally:
        attacking.cancel()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            async with asyncio.timeout(STOP_TIMEOUT):
                await attacking
        stop.set()
        await sampler
    if attacking.done() and not attacking.cancelled() and attacking.exception():
        row.counts[f"attack error {attacking.exception()!r}"[:100]] += 1
    await settle(server, row.idle)
    row.load = os.getloadavg()[0]
    return row


async def settle(server: Server, idle: Usage) -> None:
    """Wait (bounded) until the server holds about as many descriptors and processes as
    when idle."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while time.monotonic() < deadline:
        usage = await asyncio.to_thread(total_usage, server)
        if usage.fds <= idle.fds + 4 and usage.processes <= idle.processes + 1:
            return
        await asyncio.sleep(0.5)


async def until_login(target: Target) -> None:
    """Retry the legitimate login until it works (the fleet registers in the background)."""
    async with asyncio.timeout(START_TIMEOUT):
        while True:
            if (await legit_login(target))[0]:
                return
            await asyncio.sleep(0.5)


@contextlib.asynccontextmanager
async def sensor_server(workdir: Path) -> AsyncIterator[Server]:
    """A fleet on loopback whose sensor listens for SSH and Telnet with default bounds."""
    procs = Processes(workdir)
    try:
        guest_port, ssh_port, telnet_port = free_port(), free_port(), free_port()
        await start_sshd(procs, workdir / "guest", guest_port, GUEST_PASSWORD)
        sensor = await start_fleet(
            workdir,
            procs,
            f"127.0.0.1:{guest_port}",
            GUEST_PASSWORD,
            {
                "ssh_listen": [f"127.0.0.1:{ssh_port}"],
                "telnet_listen": [f"127.0.0.1:{telnet_port}"],
            },
        )
        target = Target("sensor", ssh_port, telnet_port, SENSOR_PASSWORD)
        await until_banner(ssh_port, b"SSH-2.0-")
        await until_login(target)
        yield Server(target, (sensor.pid,))
    finally:
        await procs.stop()


@contextlib.asynccontextmanager
async def baseline_server(workdir: Path) -> AsyncIterator[Server]:
    """Debian's OpenSSH sshd and busybox telnetd on loopback."""
    procs = Processes(workdir)
    try:
        ssh_port, telnet_port = free_port(), free_port()
        sshd = await start_sshd(procs, workdir / "sshd", ssh_port, BASELINE_PASSWORD)
        telnetd = await start_telnetd(procs, telnet_port)
        target = Target("openssh", ssh_port, telnet_port, BASELINE_PASSWORD)
        await until_login(target)
        yield Server(target, (sshd, telnetd))
    finally:
        await procs.stop()


SERVERS = {"sensor": sensor_server, "openssh": baseline_server}


def percentile(samples: list[float], fraction: float) -> float:
    """The ``fraction`` quantile (nearest rank)."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def describe(row: Row) -> list[str]:
    """One markdown table row."""
    attempts = len(row.logins) + row.failures.total()
    rate = f"{100 * len(row.logins) / attempts:.0f}% of {attempts}" if attempts else "-"
    p50 = f"{1000 * statistics.median(row.logins):.0f}" if row.logins else "-"
    p99 = f"{1000 * percentile(row.logins, 0.99):.0f}" if row.logins else "-"
    mib = 1024 * 1024
    memory = f"{row.idle.rss / mib:.0f} → {row.peak.rss / mib:.0f}"
    fds = f"{row.idle.fds} → {row.peak.fds}"
    procs = f"{row.idle.processes} → {row.peak.processes}"
    attack = ", ".join(f"{k} {v}" for k, v in row.counts.most_common(4)) or "-"
    return [
        row.scenario, row.server, rate, p50, p99, memory, fds, procs, attack, f"{row.load:.1f}"
    ]  # fmt: skip


def report(rows: list[Row], args: argparse.Namespace, started: str) -> None:
    """The markdown table, then why legitimate logins failed."""
    head = [
        "scenario", "server", "legit ok", "p50 ms", "p99 ms", "RSS MiB (idle → peak)",
        "fds (idle → peak)", "procs", "attackers did", "load1",
    ]  # fmt: skip
    print(f"\n## Hostile traffic: legitimate logins under attack ({time.strftime('%F %T %Z')})\n")
    print(f"commit {commit()}; {os.cpu_count()} CPUs; started under `{started}`;")
    print(f"ended under `{uptime()}`.")
    print(
        f"{args.duration:g}s of logins per scenario after {args.ramp:g}s of attack; "
        f"{args.addresses} attacker addresses per scenario; {args.workers} workers.\n"
    )
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(describe(row)) + " |")
    failed = [row for row in rows if row.failures]
    if failed:
        print("\nWhy legitimate logins failed (last line of ssh's stderr):\n")
        for row in failed:
            for reason, count in row.failures.most_common(3):
                print(f"* {row.server} / {row.scenario}: {count}x `{reason}`")


def commit() -> str:
    """The checked-out commit of the code under test."""
    git = shutil.which("git")
    if git is None:
        return "unknown"
    result = subprocess.run(
        [git, "-C", str(ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() or "unknown"


def uptime() -> str:
    """The load line of ``uptime``."""
    load = os.getloadavg()
    return f"load average: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}"


async def main_async(args: argparse.Namespace) -> None:
    """Every server, every chosen scenario, then the table."""
    require("sshpass", "sshpass")
    started = uptime()
    chosen = [s for s in scenarios(args.workers) if s.name in args.scenarios]
    rows: list[Row] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-hostile-"))
    print(f"work directory: {tmp}", flush=True)
    try:
        async with contextlib.AsyncExitStack() as stack:
            servers = []
            for name in args.servers:
                (tmp / name).mkdir()
                servers.append(await stack.enter_async_context(SERVERS[name](tmp / name)))
            # Each scenario on every server in turn: the pair sees about the same load
            # from whatever else the machine runs.
            for block, scenario in enumerate(chosen, start=1):
                for server in servers:
                    row = await run_scenario(server, scenario, block, args)
                    rows.append(row)
                    print(" | ".join(describe(row)), flush=True)
    finally:
        if not args.keep:
            await asyncio.to_thread(shutil.rmtree, tmp)
    report(rows, args, started)


def main() -> None:
    """Parse arguments and run."""
    names = [s.name for s in scenarios(0)]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=12.0, help="seconds of logins each")
    parser.add_argument("--ramp", type=float, default=3.0, help="seconds of attack before")
    parser.add_argument("--addresses", type=int, default=50, help="attacker addresses (<255)")
    parser.add_argument("--workers", type=int, default=16, help="brute/garbage/churn workers")
    parser.add_argument(
        "--scenarios", type=lambda s: s.split(","), default=names, help=",".join(names)
    )
    parser.add_argument(
        "--servers", type=lambda s: s.split(","), default=list(SERVERS), help="sensor,openssh"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args()
    unknown = set(args.scenarios) - set(names) | set(args.servers) - set(SERVERS)
    if unknown or not 0 < args.addresses < 255:
        parser.error(f"unknown names {sorted(unknown)} or bad --addresses")
    # Attackers hold many sockets; children (the servers) inherit the raised limit.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
