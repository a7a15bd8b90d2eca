"""The VM tests' libvirt host: libvirtd inside a network namespace this test run creates.

Layout (see netns_notes.md, "The VM test harness")::

    root namespace: pytest                    test namespace hf-test-<pid>
    ----------------------------------        -------------------------------------------
    controller   127.0.0.1:C  <--- relay ---  127.0.0.1:C'  <-- pool node process
    sensors, tunnels --> 127.0.0.1:F -- relay --> 127.0.0.1:P    (honeyfleet poolnode)
                                              libvirtd, virtlogd, dnsmasq, QEMU guests,
                                              the pool bridge and every guest packet

The pytest process never enters the namespace (gRPC's threads would end up split
between namespaces); sockets that must live there are made by one worker thread
that has entered it with setns(2), and relays carry loopback TCP across.

Only one libvirtd can run on a machine (its sockets are in the shared file system),
so a run owns it: a libvirtd left in the namespace of a run that is gone is killed
with that namespace; any other running libvirtd stops the run with a clear message.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
NETNS_PREFIX = "hf-test-"
CLONE_NEWNET = 0x40000000
LIBVIRT_URI = "qemu:///system"
DAEMON_START_WAIT = 20.0
DAEMON_STOP_WAIT = 10.0
# Names of every libvirt object the VM tests make (the pool node's guest_tag etc.).
TAG = "hft"
NETWORK = "hf-test-pool"
BRIDGE = "hftest0"
GATEWAY = "10.77.0.1"
NETWORK_ADDRESS = f"{GATEWAY}/24"
REPO = Path(__file__).resolve().parents[2]


class HostProblem(Exception):
    """The machine cannot host the VM tests; the message says what to do."""


def _pid_alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return status.rpartition(")")[2].split()[0] != "Z"


def _daemon_pid(pidfile: Path, name: str) -> int | None:
    """The pid of a running daemon from its pid file (None if not running)."""
    try:
        pid = int(pidfile.read_text().strip())
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError):
        return None
    return pid if comm == name and _pid_alive(pid) else None


def _netns_of(pid: int) -> str | None:
    """The name (under /run/netns) of the network namespace a process is in."""
    try:
        inode = Path(f"/proc/{pid}/ns/net").stat().st_ino
    except OSError:
        return None
    for path in NETNS_DIR.glob("*") if NETNS_DIR.is_dir() else ():
        with contextlib.suppress(OSError):
            if path.stat().st_ino == inode:
                return path.name
    return None


def _run(*argv: str, timeout: float = 60.0) -> str:
    """Run a command; its stdout, or an error with its stderr."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise HostProblem(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _wait_gone(pids: list[int], wait: float) -> bool:
    """Wait (bounded) until none of ``pids`` is alive; whether they all went."""
    deadline = time.monotonic() + wait
    while any(_pid_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _kill(pids: list[int], grace: float) -> None:
    """SIGTERM, SIGKILL whatever is still there after ``grace`` seconds, wait for the end.

    ``grace`` 0 sends SIGKILL at once (for what a crashed run left behind).
    """
    if grace > 0:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        if _wait_gone(pids, grace):
            return
    for pid in pids:
        if _pid_alive(pid):
            if grace > 0:
                log.warning("pid %d ignored SIGTERM for %.0fs; killing it", pid, grace)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    if not _wait_gone(pids, DAEMON_STOP_WAIT):
        raise HostProblem(f"processes {pids} survived SIGKILL")


def namespace_pids(name: str) -> list[int]:
    """Processes inside a named network namespace."""
    out = subprocess.run(
        ["ip", "netns", "pids", name], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _delete_namespace(name: str, grace: float) -> None:
    """Kill everything inside a namespace, then delete it."""
    _kill(namespace_pids(name), grace)
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30, check=False)


def sweep_stale_runs() -> None:
    """Remove the namespaces (and the daemons and guests in them) of runs that are gone."""
    for path in sorted(NETNS_DIR.glob(f"{NETNS_PREFIX}*")) if NETNS_DIR.is_dir() else ():
        owner = path.name.removeprefix(NETNS_PREFIX)
        # Our own pid can only be there from an earlier process that had it.
        if owner.isdigit() and int(owner) != os.getpid() and _pid_alive(int(owner)):
            continue
        log.warning("removing %s, left by a VM test run that is gone", path.name)
        # No grace: libvirtd can deadlock on SIGTERM while its guests still run.
        _delete_namespace(path.name, 0)


def _enter_netns(path: Path) -> None:
    """Move the calling thread into the network namespace at ``path``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


class NetnsSockets:
    """Makes sockets inside the test namespace, from a worker thread that lives there.

    A socket belongs to the namespace its creator was in when it was made, so once
    made it can be used from the event loop like any other.
    """

    def __init__(self, netns: Path) -> None:
        self._worker = ThreadPoolExecutor(
            1, thread_name_prefix="netns", initializer=_enter_netns, initargs=(netns,)
        )

    async def _socket(self, host: str) -> socket.socket:
        """A non-blocking TCP socket in the namespace, of ``host``'s family."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        loop = asyncio.get_running_loop()
        sock = await loop.run_in_executor(self._worker, socket.socket, family, socket.SOCK_STREAM)
        sock.setblocking(False)
        return sock

    async def connect(self, host: str, port: int) -> socket.socket:
        """A TCP connection from inside the namespace."""
        sock = await self._socket(host)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        return sock

    async def listen(self, host: str, port: int = 0) -> socket.socket:
        """A listening TCP socket inside the namespace."""
        sock = await self._socket(host)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(16)
        return sock

    def close(self) -> None:
        """Stop the worker thread."""
        self._worker.shutdown(wait=True)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy one direction until EOF, then pass the EOF on (half-close)."""
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()


class Relay:
    """Relays loopback TCP connections between the root and the test namespace."""

    def __init__(self, connect: Callable[[], Awaitable[Streams]]) -> None:
        self._connect = connect
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def serve(self, sock: socket.socket | None = None) -> Relay:
        """Listen on ``sock`` (a namespace socket) or on the root namespace's loopback."""
        if sock is not None:
            self._server = await asyncio.start_server(self._handle, sock=sock)
        else:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Connect to the target and copy both ways."""
        try:
            target_reader, target_writer = await self._connect()
        except OSError:
            writer.close()
            return
        self._writers |= {writer, target_writer}
        try:
            await asyncio.gather(_pipe(reader, target_writer), _pipe(target_reader, writer))
        finally:
            for w in (writer, target_writer):
                self._writers.discard(w)
                w.close()

    def close(self) -> None:
        """Stop listening and cut the relayed connections."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()


async def relay_into_netns(sockets: NetnsSockets, port: int) -> Relay:
    """Root 127.0.0.1:<relay.port> -> the namespace's 127.0.0.1:``port``."""

    async def connect() -> Streams:
        return await asyncio.open_connection(sock=await sockets.connect("127.0.0.1", port))

    return await Relay(connect).serve()


async def relay_out_of_netns(sockets: NetnsSockets, port: int) -> Relay:
    """The namespace's 127.0.0.1:<relay.port> -> root 127.0.0.1:``port``."""
    return await Relay(lambda: asyncio.open_connection("127.0.0.1", port)).serve(
        await sockets.listen("127.0.0.1")
    )


@dataclass
class VmHost:
    """A running libvirtd in this run's own network namespace."""

    netns: str
    log_dir: Path
    sockets: NetnsSockets
    started: list[int] = field(default_factory=list)

    def ns(self, *argv: str, timeout: float = 60.0) -> str:
        """Run a command inside the namespace; its stdout."""
        return _run("ip", "netns", "exec", self.netns, *argv, timeout=timeout)

    def ns_argv(self, *argv: str) -> list[str]:
        """``argv`` prefixed so that it runs inside the namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def libvirt(self) -> Any:
        """A new libvirt connection (the socket is reachable from any namespace)."""
        import libvirt

        return libvirt.open(LIBVIRT_URI)

    @classmethod
    def start(cls, log_dir: Path) -> VmHost:
        """Sweep stale runs, create the namespace, start virtlogd and libvirtd in it."""
        sweep_stale_runs()
        running = _daemon_pid(Path("/run/libvirtd.pid"), "libvirtd")
        if running is not None:
            where = _netns_of(running)
            if where and where.startswith(NETNS_PREFIX):
                raise HostProblem(
                    f"libvirtd (pid {running}) belongs to another VM test run "
                    f"({where}, still running): wait for it to finish"
                )
            raise HostProblem(
                f"libvirtd (pid {running}) is already running "
                f"{'in namespace ' + where if where else 'in the root network namespace'}: "
                "the VM tests start their own libvirtd inside a namespace and there can be "
                f"only one per machine; stop it (kill {running}, or systemctl stop libvirtd) "
                "and run the tests again"
            )
        name = f"{NETNS_PREFIX}{os.getpid()}"
        _run("ip", "netns", "add", name)
        host = cls(netns=name, log_dir=log_dir, sockets=NetnsSockets(NETNS_DIR / name))
        try:
            host._boot()
        except BaseException:
            host.stop()
            raise
        return host

    def _boot(self) -> None:
        """Loopback up, bridge netfilter on, daemons started and answering."""
        self.ns("ip", "link", "set", "lo", "up")
        # The nwfilter egress lock filters bridged traffic with iptables; make sure the
        # bridge hands its packets to netfilter in this namespace.
        self.ns("sysctl", "-q", "-w", "net.bridge.bridge-nf-call-iptables=1")
        _run("bash", str(REPO / "scripts/setup-libvirt.sh"))
        if _daemon_pid(Path("/run/virtlogd.pid"), "virtlogd") is None:
            self.ns("virtlogd", "-d")
            self._remember("/run/virtlogd.pid", "virtlogd")
        outputs = f"3:file:{self.log_dir / 'libvirtd.log'}"
        self.ns("env", f"LIBVIRT_LOG_OUTPUTS={outputs}", "libvirtd", "-d")
        pid = self._remember("/run/libvirtd.pid", "libvirtd")
        if _netns_of(pid) != self.netns:
            raise HostProblem(f"libvirtd (pid {pid}) did not start inside {self.netns}")
        self._wait_for_libvirtd()

    def _remember(self, pidfile: str, name: str) -> int:
        """Record a daemon this run started, so teardown stops exactly it."""
        deadline = time.monotonic() + DAEMON_START_WAIT
        while (pid := _daemon_pid(Path(pidfile), name)) is None:
            if time.monotonic() > deadline:
                raise HostProblem(f"{name} did not start (no live pid in {pidfile})")
            time.sleep(0.1)
        self.started.append(pid)
        return pid

    def _wait_for_libvirtd(self) -> None:
        """Wait (bounded) until libvirtd accepts connections."""
        import libvirt

        deadline = time.monotonic() + DAEMON_START_WAIT
        while True:
            try:
                self.libvirt().close()
                return
            except libvirt.libvirtError as e:
                if time.monotonic() > deadline:
                    raise HostProblem(f"libvirtd does not answer: {e.get_error_message()}") from e
                time.sleep(0.1)

    def remove_libvirt_objects(self, tag: str = TAG, network_name: str = NETWORK) -> None:
        """Destroy one pool's domains, network and filter (named after its tag and network)."""
        import libvirt

        try:
            conn = self.libvirt()
        except libvirt.libvirtError:
            return
        try:
            for domain in conn.listAllDomains(0):
                if domain.name().startswith(f"{tag}-"):
                    with contextlib.suppress(libvirt.libvirtError):
                        domain.destroy()
                    with contextlib.suppress(libvirt.libvirtError):
                        domain.undefine()
            with contextlib.suppress(libvirt.libvirtError):
                network = conn.networkLookupByName(network_name)
                with contextlib.suppress(libvirt.libvirtError):
                    network.destroy()
                network.undefine()
            with contextlib.suppress(libvirt.libvirtError):
                conn.nwfilterLookupByName(f"{tag}-guest").undefine()
        finally:
            conn.close()

    def stop(self) -> None:
        """Remove libvirt objects, stop the daemons this run started, delete the namespace."""
        with contextlib.ExitStack() as later:  # each step runs even if one before fails
            later.callback(self.sockets.close)
            later.callback(_delete_namespace, self.netns, DAEMON_STOP_WAIT)
            later.callback(_kill, self.started, DAEMON_STOP_WAIT)
            self.remove_libvirt_objects()
