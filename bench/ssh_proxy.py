"""SSH proxy benchmark: the fleet and Cowrie's proxy against direct SSH, in one run.

    .venv/bin/python bench/ssh_proxy.py                  # a few minutes; needs root
    .venv/bin/python bench/ssh_proxy.py --setups 20 --repeat 2 --shells 50
    .venv/bin/python bench/ssh_proxy.py --only-tcg       # only the TCG guest's line

Everything runs on loopback, each role in its own process. The backend is Debian's
OpenSSH ``sshd`` (bench/openssh.py) with a throwaway account. The peers, each measured
against it:

* **direct**: OpenSSH's client straight to that sshd;
* **Cowrie** 3.1.4 in proxy mode (bench/cowrie.py: installed from PyPI into a throwaway
  virtualenv by this script), simple backend to the same sshd, once with tty logs and
  once without (two instances);
* **the fleet**: ``honeyfleet controller``, ``poolnode`` (static backend: the same sshd)
  and ``sensor`` processes, mTLS between them as in production.

Clients are OpenSSH's ``ssh`` (with ``sshpass``) for setups and transfers, and asyncssh
in this process for the held shells. The phases run interleaved (one sample of each peer
in turn), each bounded in count and time:

* session setup: ``ssh user@host true`` from process start to exit (connect, key
  exchange, password login, exec, exit status, close), p50 and p95;
* download: ``head -c 64M /dev/zero`` read from ``ssh``'s stdout, MB/s from the first
  byte to the end (setup excluded);
* upload: 32 MiB written to ``ssh``'s stdin for ``cat >/dev/null``, MB/s from the
  remote's ready line to its exit status;
* proxy CPU seconds (user + system, from /proc) spent during the transfers, per 64 MiB
  moved: Cowrie's process, the sensor's plus the pool node's for the fleet;
* proxy RSS idle, after warm-up sessions;
* memory per held shell: RSS growth of the process serving attackers (Cowrie, the
  sensor) with ``--shells`` pty shells open at once, each proven alive by an echo,
  divided by their number; measured before the transfers, whose freed heap new sessions
  would reuse unseen. The pool node's growth is shown beside the sensor's;
* a real guest: the pool's image under QEMU's TCG (bench/tcg.py), session setup p50 and
  p95 direct into it and through a second fleet whose static pool node hands it out.

Latencies suffer from whatever else loads the machine (the load average is printed);
CPU seconds hold up better. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from asyncio.subprocess import DEVNULL, PIPE
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import asyncssh

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.cowrie import COWRIE_VERSION, CowrieBackend, install_cowrie, start_cowrie  # noqa: E402
from bench.fleet import Processes, cpu_seconds, rss_bytes, start_fleet  # noqa: E402
from bench.openssh import require, start_sshd  # noqa: E402
from bench.tcg import GUEST_MEMORY_MIB, guest_image, start_tcg_guest  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.e2e.fleet import GUEST_PASSWORD, GUEST_USER  # noqa: E402

BACKEND_USER = "hfbench"
BACKEND_PASSWORD = "bench-backend-password"  # noqa: S105
# An attacker's password: both the sensor's default userdb and Cowrie's let root in with it.
ATTACKER_PASSWORD = "bench-password"  # noqa: S105
PHASE_TIMEOUT = 600.0
SESSION_TIMEOUT = 60.0
DOWNLOAD_BYTES = 64 << 20
UPLOAD_BYTES = 32 << 20
PER = 64 << 20  # CPU seconds are per this many bytes moved
CHUNK = 1 << 20
T = TypeVar("T")


@dataclass(frozen=True)
class Peer:
    """Where clients connect, as whom, and which processes relay for it."""

    name: str
    """Column heading."""
    port: int
    """Its SSH port on 127.0.0.1."""
    user: str
    """The login name clients use."""
    password: str
    """Their password."""
    proxies: dict[str, int] = field(default_factory=dict)
    """The relaying processes by role (empty for direct); the first serves attackers."""


@dataclass
class Figures:
    """What one peer measured."""

    setups: list[float] = field(default_factory=list)
    downloads: list[float] = field(default_factory=list)
    uploads: list[float] = field(default_factory=list)
    cpu_down: dict[str, float] = field(default_factory=dict)
    cpu_up: dict[str, float] = field(default_factory=dict)
    idle: dict[str, float] = field(default_factory=dict)
    per_shell: dict[str, float] = field(default_factory=dict)
    failures: int = 0
    reasons: Counter[str] = field(default_factory=Counter)

    def fail(self, phase: str, reason: str) -> None:
        """Count a failed session or transfer, and what its client said."""
        self.failures += 1
        self.reasons[f"{phase}: {reason}"] += 1


class OpenSshClient:
    """``ssh`` runs with a password from ``sshpass``, no config, no known hosts."""

    def __init__(self) -> None:
        self._sshpass = require("sshpass", "sshpass")
        self._ssh = require("ssh", "openssh-client")
        self.error = ""
        """Why the last session that returned None failed."""

    def argv(self, peer: Peer, command: str) -> list[str]:
        """The command line running ``command`` on ``peer``."""
        options = {
            "StrictHostKeyChecking": "no",
            "UserKnownHostsFile": "/dev/null",
            "PreferredAuthentications": "password",
            "PubkeyAuthentication": "no",
            "LogLevel": "ERROR",
        }
        flags = [f"-o{key}={value}" for key, value in options.items()]
        target = f"{peer.user}@127.0.0.1"
        return [self._sshpass, "-e", self._ssh, "-F", "/dev/null", *flags, "-p", str(peer.port),
                target, command]  # fmt: skip

    async def start(
        self, peer: Peer, command: str, stdin: int = DEVNULL, stdout: int = DEVNULL
    ) -> asyncio.subprocess.Process:
        """Start ``ssh`` running ``command`` on ``peer``."""
        return await asyncio.create_subprocess_exec(
            *self.argv(peer, command),
            stdin=stdin,
            stdout=stdout,
            stderr=PIPE,
            env={**os.environ, "SSHPASS": peer.password},
        )

    async def setup(self, peer: Peer) -> float | None:
        """Seconds for ``ssh peer true``, or None if it failed."""
        start = time.perf_counter()
        proc = await self.start(peer, "true")
        if (code := await _wait(proc)) != 0:
            return await self._failed(proc, f"exit {code}")
        return time.perf_counter() - start

    async def download(self, peer: Peer) -> float | None:
        """MB/s of ``head -c 64M /dev/zero`` from the first byte on, or None if short."""
        proc = await self.start(peer, f"head -c {DOWNLOAD_BYTES} /dev/zero", stdout=PIPE)
        assert proc.stdout is not None
        first = await proc.stdout.read(CHUNK)
        start, total = time.perf_counter(), len(first)
        while chunk := await proc.stdout.read(CHUNK):
            total += len(chunk)
        elapsed = time.perf_counter() - start
        if (code := await _wait(proc)) != 0 or total != DOWNLOAD_BYTES or not elapsed:
            return await self._failed(proc, f"exit {code}, {total} bytes")
        return (total - len(first)) / elapsed / 1e6

    async def upload(self, peer: Peer, payload: bytes) -> float | None:
        """MB/s of ``payload`` into ``cat`` from its ready line to exit, or None."""
        proc = await self.start(peer, "echo ready; exec cat >/dev/null", stdin=PIPE, stdout=PIPE)
        assert proc.stdin is not None and proc.stdout is not None
        if (line := await proc.stdout.readline()) != b"ready\n":
            code = await _wait(proc)
            return await self._failed(proc, f"exit {code}, first line {line[:40]!r}")
        start = time.perf_counter()
        view = memoryview(payload)
        for offset in range(0, len(payload), CHUNK):
            proc.stdin.write(view[offset : offset + CHUNK])
            await proc.stdin.drain()
        proc.stdin.close()
        if (code := await _wait(proc)) != 0:
            return await self._failed(proc, f"exit {code}")
        return len(payload) / (time.perf_counter() - start) / 1e6

    async def _failed(self, proc: asyncio.subprocess.Process, what: str) -> None:
        """Note why a session failed (its exit and the end of ssh's stderr); None."""
        assert proc.stderr is not None
        said = (await proc.stderr.read()).decode(errors="replace").strip()
        self.error = f"{what}: {said[-160:]}" if said else what


async def _wait(proc: asyncio.subprocess.Process) -> int:
    """The exit code of a client, killed if it overruns SESSION_TIMEOUT."""
    try:
        async with asyncio.timeout(SESSION_TIMEOUT):
            return await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return -1


async def bounded(phase: str, work: Awaitable[T]) -> T:
    """Run a phase within PHASE_TIMEOUT, saying which one overran."""
    try:
        async with asyncio.timeout(PHASE_TIMEOUT):
            return await work
    except TimeoutError:
        raise SystemExit(f"benchmark phase {phase!r} took over {PHASE_TIMEOUT:.0f}s") from None


async def until_serving(client: OpenSshClient, peer: Peer) -> None:
    """Retry a session until one works (the fleet registers in the background)."""
    while await client.setup(peer) is None:  # noqa: ASYNC110 (polling another process)
        await asyncio.sleep(0.5)


@contextlib.asynccontextmanager
async def held_shells(peer: Peer, count: int) -> AsyncIterator[None]:
    """``count`` interactive pty shells open at once, each proven alive by an echo."""
    conns: list[asyncssh.SSHClientConnection] = []
    try:
        for n in range(count):
            conn = await asyncssh.connect(
                "127.0.0.1",
                peer.port,
                username=peer.user,
                password=peer.password,
                known_hosts=None,
                client_keys=None,
                agent_path=None,
                preferred_auth="password",
            )
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


async def memory_per_shell(peer: Peer, count: int) -> dict[str, float]:
    """Each relaying process's RSS growth per held shell with ``count`` shells open."""
    await asyncio.sleep(1)
    before = {role: rss_bytes(pid) for role, pid in peer.proxies.items()}
    async with held_shells(peer, count):
        await asyncio.sleep(2)  # let per-session tasks settle
        after = {role: rss_bytes(pid) for role, pid in peer.proxies.items()}
    return {role: (after[role] - before[role]) / count for role in before}


def cpu_of(peer: Peer) -> dict[str, float]:
    """CPU seconds so far of each relaying process."""
    return {role: cpu_seconds(pid) for role, pid in peer.proxies.items()}


def add_cpu(total: dict[str, float], before: dict[str, float], after: dict[str, float]) -> None:
    """Add the CPU spent between two readings to ``total``, role by role."""
    for role, seconds in after.items():
        total[role] = total.get(role, 0.0) + seconds - before[role]


async def measure(
    args: argparse.Namespace, client: OpenSshClient, peers: Sequence[Peer]
) -> dict[str, Figures]:
    """Every phase over every peer, interleaved; the figures by peer name."""
    figures = {peer.name: Figures() for peer in peers}

    async def warm_up() -> None:
        for _ in range(3):
            for peer in peers:
                if await client.setup(peer) is None:
                    figures[peer.name].fail("warm-up", client.error)

    await bounded("warm-up", warm_up())
    await asyncio.sleep(2)
    for peer in peers:
        idle = {role: float(rss_bytes(pid)) for role, pid in peer.proxies.items()}
        figures[peer.name].idle = idle
    for peer in peers:
        if peer.proxies:
            figures[peer.name].per_shell = await bounded(
                f"held shells ({peer.name})", memory_per_shell(peer, args.shells)
            )

    await bounded("setup", time_setups(client, peers, figures, args.setups))
    payload = os.urandom(UPLOAD_BYTES)

    async def transfers() -> None:
        for _ in range(args.repeat):
            for peer in peers:
                fig = figures[peer.name]
                before = cpu_of(peer)
                rate = await client.download(peer)
                add_cpu(fig.cpu_down, before, cpu_of(peer))
                _record(fig, fig.downloads, rate, "download", client)
                before = cpu_of(peer)
                rate = await client.upload(peer, payload)
                add_cpu(fig.cpu_up, before, cpu_of(peer))
                _record(fig, fig.uploads, rate, "upload", client)

    await bounded("transfers", transfers())
    for fig in figures.values():
        # Per 64 MiB moved (failed transfers count as moved: their CPU was spent too).
        down, up = PER / (DOWNLOAD_BYTES * args.repeat), PER / (UPLOAD_BYTES * args.repeat)
        fig.cpu_down = {role: seconds * down for role, seconds in fig.cpu_down.items()}
        fig.cpu_up = {role: seconds * up for role, seconds in fig.cpu_up.items()}
    return figures


async def time_setups(
    client: OpenSshClient, peers: Sequence[Peer], figures: dict[str, Figures], count: int
) -> None:
    """``count`` timed setups of each peer, interleaved."""
    for _ in range(count):
        for peer in peers:
            seconds = await client.setup(peer)
            if seconds is None:
                figures[peer.name].fail("setup", client.error)
            else:
                figures[peer.name].setups.append(seconds)


def _record(
    fig: Figures, samples: list[float], rate: float | None, phase: str, client: OpenSshClient
) -> None:
    """Keep a rate, or count a failure."""
    if rate is None:
        fig.fail(phase, client.error)
    else:
        samples.append(rate)


def percentile(samples: list[float], fraction: float) -> float:
    """The ``fraction`` quantile (nearest rank); NaN without samples."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def median(samples: list[float]) -> float:
    """The median; NaN without samples."""
    return statistics.median(samples) if samples else float("nan")


class Table:
    """Rows of one figure per peer, each with its ratio to the first column."""

    def __init__(self, peers: Sequence[Peer]) -> None:
        self._names = [peer.name for peer in peers]
        print(f"  {'':<36}" + "".join(f"{name:>20}" for name in self._names))

    def row(self, label: str, values: Sequence[float | None], fmt: str, ratio: bool) -> None:
        """One figure; ``None`` where it does not apply (direct has no proxy)."""
        base = values[0]
        cells = []
        for value in values:
            if value is None:
                cells.append(f"{'-':>20}")
                continue
            text = fmt.format(value)
            if ratio and base:
                text += f" ({value / base:.2f}x)"
            cells.append(f"{text:>20}")
        print(f"  {label:<36}" + "".join(cells))


def report(args: argparse.Namespace, peers: Sequence[Peer], figures: dict[str, Figures]) -> None:
    """The table."""
    pairs = [(peer, figures[peer.name]) for peer in peers]
    figs = [fig for _, fig in pairs]

    def serving(attr: str, scale: float) -> list[float | None]:
        """The figure of each peer's process serving attackers (none for direct)."""
        values = [(getattr(f, attr), p) for p, f in pairs]
        return [v[next(iter(p.proxies))] / scale if p.proxies else None for v, p in values]

    def pool(attr: str, scale: float) -> list[float | None]:
        """The pool node's figure (the fleet only)."""
        values = [getattr(f, attr) for f in figs]
        return [v["poolnode"] / scale if "poolnode" in v else None for v in values]

    def totals(attr: str) -> list[float | None]:
        """A figure summed over each peer's relaying processes."""
        return [sum(getattr(f, attr).values()) if p.proxies else None for p, f in pairs]

    table = Table(peers)
    table.row("setup p50 (ms)", [percentile(f.setups, 0.5) * 1e3 for f in figs], "{:.0f}", True)
    table.row("setup p95 (ms)", [percentile(f.setups, 0.95) * 1e3 for f in figs], "{:.0f}", True)
    table.row("download (MB/s, head -c 64M)", [median(f.downloads) for f in figs], "{:.0f}", True)
    table.row("upload (MB/s, 32 MiB to cat)", [median(f.uploads) for f in figs], "{:.0f}", True)
    for label, attr in (("down", "cpu_down"), ("up", "cpu_up")):
        table.row(f"proxy CPU s per 64 MiB {label}", totals(attr), "{:.2f}", False)
        table.row("  of which pool node", pool(attr, 1), "{:.2f}", False)
    table.row("proxy RSS idle (MiB)", serving("idle", 2**20), "{:.1f}", False)
    table.row("  pool node RSS idle (MiB)", pool("idle", 2**20), "{:.1f}", False)
    table.row(f"memory per held shell (KB, {args.shells})", serving("per_shell", 1e3), "{:.1f}",
              False)  # fmt: skip
    table.row("  pool node per held shell (KB)", pool("per_shell", 1e3), "{:.1f}", False)
    failures = ", ".join(f"{p.name} {f.failures}" for p, f in pairs if f.failures)
    print(f"  failed sessions or transfers: {failures or 'none'}")
    print_reasons((p.name, f) for p, f in pairs)


def sensor_settings(port: int, shells: int) -> dict[str, object]:
    """The benchmark sensor's settings: SSH on 127.0.0.1:``port``, no Telnet, and room
    for ``shells`` held sessions, all from 127.0.0.1."""
    return {
        "ssh_listen": [f"127.0.0.1:{port}"],
        "telnet_listen": [],
        "max_connections_per_ip": shells + 16,
        "max_connections": shells + 64,
        "max_leases": shells + 16,
        "max_leases_per_source": shells + 16,
    }


async def start_peers(args: argparse.Namespace, workdir: Path, procs: Processes) -> list[Peer]:
    """The backend sshd, the Cowrie instances and the fleet; the peers in column order."""
    backend_port = free_port()
    await start_sshd(procs, workdir / "sshd", backend_port, BACKEND_PASSWORD, BACKEND_USER)
    peers = [Peer("direct", backend_port, BACKEND_USER, BACKEND_PASSWORD)]
    if not args.no_cowrie:
        twistd = await bounded("cowrie install", install_cowrie(workdir / "cowrie-venv"))
        backend = CowrieBackend("127.0.0.1", backend_port, BACKEND_USER, BACKEND_PASSWORD)
        for ttylog in (True, False):
            port = free_port()
            tag = "on" if ttylog else "off"
            pid = await bounded(
                "cowrie start",
                start_cowrie(
                    procs, twistd, workdir / f"cowrie-tty-{tag}", port, backend, ttylog=ttylog
                ),
            )
            peers.append(Peer(f"cowrie ttylog {tag}", port, "root", ATTACKER_PASSWORD,
                              {"cowrie": pid}))  # fmt: skip
    sensor_port = free_port()
    sensor = await start_fleet(
        workdir,
        procs,
        f"127.0.0.1:{backend_port}",
        BACKEND_PASSWORD,
        sensor_settings(sensor_port, args.shells),
        backend_user=BACKEND_USER,
    )
    fleet = Peer("fleet", sensor_port, "root", ATTACKER_PASSWORD,
                 {"sensor": sensor.pid, "poolnode": procs.named("poolnode").pid})  # fmt: skip
    peers.append(fleet)
    return peers


async def start_tcg_peers(workdir: Path, procs: Processes) -> list[Peer]:
    """A TCG guest and a fleet of its own whose static pool node hands it out; the peers
    (direct into the guest, the fleet)."""
    image = await asyncio.to_thread(guest_image)
    guest_port = free_port()
    await start_tcg_guest(procs, workdir / "guest", image, guest_port)
    sensor_port = free_port()
    sensor = await start_fleet(
        workdir,
        procs,
        f"127.0.0.1:{guest_port}",
        GUEST_PASSWORD,
        {"ssh_listen": [f"127.0.0.1:{sensor_port}"], "telnet_listen": []},
        backend_user=GUEST_USER,
    )
    return [
        Peer("direct into guest", guest_port, GUEST_USER, GUEST_PASSWORD),
        Peer("fleet", sensor_port, "root", ATTACKER_PASSWORD,
             {"sensor": sensor.pid, "poolnode": procs.named("poolnode").pid}),
    ]  # fmt: skip


async def measure_tcg(
    args: argparse.Namespace, client: OpenSshClient, workdir: Path
) -> tuple[list[Peer], dict[str, Figures]]:
    """The TCG guest's line: setups direct into it and through the fleet, interleaved
    (its processes, logs and files under ``workdir``; all stopped at the end)."""
    await asyncio.to_thread(workdir.mkdir)
    procs = Processes(workdir)
    try:
        peers = await bounded("TCG guest start", start_tcg_peers(workdir, procs))
        for peer in peers:
            await bounded(f"TCG {peer.name} start", until_serving(client, peer))
        figures = {peer.name: Figures() for peer in peers}
        await bounded("TCG setup", time_setups(client, peers, figures, args.tcg_setups))
    finally:
        await procs.stop()
    return peers, figures


def report_tcg(
    args: argparse.Namespace, peers: Sequence[Peer], figures: dict[str, Figures]
) -> None:
    """The TCG guest's line."""
    print(
        f"\nSSH setup into a TCG guest (the pool's image: dropbear, QEMU TCG, "
        f"{GUEST_MEMORY_MIB} MiB; {args.tcg_setups} setups each)"
    )
    figs = [figures[peer.name] for peer in peers]
    table = Table(peers)
    table.row("setup p50 (ms)", [percentile(f.setups, 0.5) * 1e3 for f in figs], "{:.0f}", True)
    table.row("setup p95 (ms)", [percentile(f.setups, 0.95) * 1e3 for f in figs], "{:.0f}", True)
    failures = ", ".join(f"{p.name} {figures[p.name].failures}" for p in peers
                         if figures[p.name].failures)  # fmt: skip
    print(f"  failed sessions: {failures or 'none'}")
    print_reasons((p.name, figures[p.name]) for p in peers)


def print_reasons(figures: Iterable[tuple[str, Figures]]) -> None:
    """What the failed sessions' clients said, most common first, by peer."""
    for name, fig in figures:
        for reason, count in fig.reasons.most_common(5):
            print(f"    {name}: {count} x {reason}")


async def run(args: argparse.Namespace) -> None:
    """Start everything, measure, print the figures, stop everything."""
    if os.geteuid() != 0:
        raise SystemExit("needs root: Debian's sshd and Cowrie's unprivileged user")
    client = OpenSshClient()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-ssh-") as tmp:
        workdir = Path(tmp)
        # The throwaway account and Cowrie's user must reach their directories.
        await asyncio.to_thread(workdir.chmod, 0o755)
        procs = Processes(workdir)
        peers: list[Peer] = []
        figures: dict[str, Figures] = {}
        tcg: tuple[list[Peer], dict[str, Figures]] | None = None
        failed = False
        try:
            if not args.only_tcg:
                peers = await start_peers(args, workdir, procs)
                for peer in peers:
                    await bounded(f"{peer.name} start", until_serving(client, peer))
                figures = await measure(args, client, peers)
            if not args.no_tcg:
                tcg = await measure_tcg(args, client, workdir / "tcg")
        except BaseException:
            failed = True
            raise
        finally:
            await procs.stop()
            measured = [*figures.values(), *(tcg[1].values() if tcg else ())]
            if args.keep and (failed or any(f.failures for f in measured)):
                shutil.copytree(workdir, args.keep, dirs_exist_ok=True, symlinks=True)
    load_after = os.getloadavg()
    print(
        f"\nLoopback, {os.cpu_count()} CPUs, load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after"
    )
    if peers:
        print(
            f"\nSSH through proxies vs direct to Debian's sshd ({args.setups} setups, "
            f"{args.repeat} transfers each way, {args.shells} shells; Cowrie {COWRIE_VERSION})"
        )
        report(args, peers, figures)
    if tcg is not None:
        report_tcg(args, *tcg)


def main() -> None:
    """Parse arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", type=int, default=40, help="setups timed per peer")
    parser.add_argument("--repeat", type=int, default=3, help="transfers each way per peer")
    parser.add_argument("--shells", type=int, default=100, help="shells held for memory")
    parser.add_argument("--no-cowrie", action="store_true", help="leave Cowrie out")
    parser.add_argument("--tcg-setups", type=int, default=10, help="setups timed per TCG peer")
    tcg = parser.add_mutually_exclusive_group()
    tcg.add_argument("--no-tcg", action="store_true", help="leave the TCG guest's line out")
    tcg.add_argument("--only-tcg", action="store_true", help="measure only the TCG guest's line")
    parser.add_argument(
        "--keep",
        metavar="DIR",
        help="copy the work directory (logs) there on error or a failed session",
    )
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
