"""What the benchmarks share: each fleet role as its own process on loopback, certificates
for them, and what a process tree holds (memory, descriptors) read from /proc.

Roles run as ``honeyfleet <role> --config FILE`` processes, as in production, so the
process serving attackers can be measured on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from honeyfleet.config import write_toml  # noqa: E402
from honeyfleet.pki import CertificateAuthority, Role, init_ca  # noqa: E402
from honeyfleet.tls import TlsFiles, secure_channel  # noqa: E402
from tests.conftest import free_port  # noqa: E402

BIN = Path(sys.executable).parent
STOP_TIMEOUT = 10.0
START_TIMEOUT = 60.0


def issue(ca: CertificateAuthority, root: Path, role: Role, name: str) -> TlsFiles:
    """Certificate files for one fleet member, valid on loopback."""
    out = root / f"{role}-{name}"
    ca.issue(role, name, dns=["localhost"], ips=["127.0.0.1"], out_dir=out)
    return TlsFiles(ca=out / "ca.pem", cert=out / f"{name}.pem", key=out / f"{name}.key")


def tls_settings(tls: TlsFiles) -> dict[str, str]:
    """The three TLS keys of a config section."""
    return {"tls_ca": str(tls.ca), "tls_cert": str(tls.cert), "tls_key": str(tls.key)}


class Processes:
    """Child processes with their output in log files; all stopped on exit."""

    def __init__(self, workdir: Path) -> None:
        self._workdir = workdir
        self._procs: list[asyncio.subprocess.Process] = []
        self._named: dict[str, asyncio.subprocess.Process] = {}

    async def start(
        self, name: str, *argv: str, stdout: int | None = None
    ) -> asyncio.subprocess.Process:
        """Start one process, its output (or only stderr) appended to ``<name>.log``."""
        # The roles run the code next to this script, not whatever the venv's editable
        # install points at.
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        with (self._workdir / f"{name}.log").open("ab") as log:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdout=log if stdout is None else stdout,
                stderr=log,
                env={**os.environ, "PYTHONPATH": path},
            )
        self._procs.append(proc)
        self._named[name] = proc
        return proc

    def named(self, name: str) -> asyncio.subprocess.Process:
        """The process last started as ``name``."""
        return self._named[name]

    async def stop(self) -> None:
        """SIGTERM every process, SIGKILL what is left after a grace period."""
        for proc in reversed(self._procs):
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    async with asyncio.timeout(STOP_TIMEOUT):
                        await proc.wait()
                except TimeoutError:
                    proc.kill()
                    await proc.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    # utime and stime are fields 14 and 15 of stat(5); fields[0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ControllerProcess:
    """`honeyfleet controller --config` alone, in a fresh state directory.

    ``settings`` are ``[controller]`` keys on top of the loopback listener, the state
    directory and the TLS files; the metrics and enrolment endpoints are off unless given.
    """

    def __init__(self, workdir: Path, tls: TlsFiles, settings: Mapping[str, str]) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.config = workdir / "honeyfleet.toml"
        self.log = workdir / "controller.log"
        section = {
            "listen": self.address,
            "enroll_listen": "",
            "metrics_listen": "",
            "state_dir": str(workdir / "state"),
            **tls_settings(tls),
            **settings,
        }
        write_toml(self.config, {"controller": section})
        self._procs = Processes(workdir)
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        """The controller's process id (it must have been started)."""
        assert self.proc is not None
        return self.proc.pid

    async def __aenter__(self) -> ControllerProcess:
        """Start the process."""
        self.proc = await self._procs.start(
            "controller", str(BIN / "honeyfleet"), "controller", "--config", str(self.config)
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stop the process."""
        await self._procs.stop()

    async def wait_serving(self, tls: TlsFiles) -> None:
        """Wait until the ingest service is SERVING."""
        deadline = time.monotonic() + START_TIMEOUT
        async with secure_channel(self.address, tls) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service="honeyfleet.v1.EventIngestService")
            while time.monotonic() < deadline:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await stub.Check(request, timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                await asyncio.sleep(0.1)
        raise SystemExit(f"controller did not start; see {self.log}")


async def start_fleet(
    workdir: Path,
    procs: Processes,
    guest: str,
    backend_pass: str,
    sensor: dict[str, object],
    backend_user: str = "root",
) -> asyncio.subprocess.Process:
    """Controller, pool node (one static, shared guest at ``guest`` host:port, logged into
    as ``backend_user`` with ``backend_pass``) and sensor processes; returns the sensor's
    (the others are ``procs.named("controller")`` and ``procs.named("poolnode")``).

    ``sensor`` holds the sensor's listeners and any other keys that differ from the
    defaults; the connections to the controller and the certificates are filled in here.
    """
    ca = init_ca(workdir / "ca", "bench")
    issued = workdir / "issued"
    ctl_port, node_port = free_port(), free_port()
    config = workdir / "honeyfleet.toml"
    write_toml(
        config,
        {
            "controller": {
                "listen": f"127.0.0.1:{ctl_port}",
                "enroll_listen": "",
                "metrics_listen": "",
                "state_dir": str(workdir / "controller"),
                # Sensors fetch the revocation list from it (without: a warning each time).
                "ca_dir": str(ca.directory),
                **tls_settings(issue(ca, issued, Role.CONTROLLER, "ctl")),
            },
            "poolnode": {
                "controller": f"127.0.0.1:{ctl_port}",
                "listen": f"127.0.0.1:{node_port}",
                "metrics_listen": "",
                "state_dir": str(workdir / "poolnode"),
                "backend": "static",
                "static_hosts": [guest],
                "max_vms": 1,
                "share_guests": True,
                "backend_user": backend_user,
                "backend_pass": backend_pass,
                **tls_settings(issue(ca, issued, Role.POOLNODE, "pool-1")),
            },
            "sensor": {
                "controller": f"127.0.0.1:{ctl_port}",
                "state_dir": str(workdir / "sensor"),
                **sensor,
                **tls_settings(issue(ca, issued, Role.SENSOR, "sensor-1")),
            },
        },
    )
    honeyfleet = str(BIN / "honeyfleet")
    for role in ("controller", "poolnode", "sensor"):
        proc = await procs.start(role, honeyfleet, role, "--config", str(config))
    return proc


@dataclass(frozen=True)
class Usage:
    """What a process and its descendants hold at one moment."""

    rss: int
    """Resident bytes, summed over the processes (shared pages counted in each)."""
    fds: int
    """Open file descriptors, summed over the processes."""
    processes: int
    """How many processes the tree has."""


def rss_bytes(pid: int) -> int:
    """Resident set size of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ProcessLookupError(f"no VmRSS for process {pid}")


def process_tree(root: int) -> list[int]:
    """``root`` and every process descended from it (one scan of /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended during the scan
            continue
        # The command name may hold spaces and parentheses: fields follow the last ')'.
        ppid = int(text[text.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def tree_usage(root: int) -> Usage:
    """Memory and descriptors of ``root`` and its descendants (those that end while they
    are read are left out)."""
    rss = fds = count = 0
    for pid in process_tree(root):
        try:
            rss += rss_bytes(pid)
            fds += sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())
        except OSError:  # it ended meanwhile
            continue
        count += 1
    return Usage(rss, fds, count)
