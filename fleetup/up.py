"""`honeyfleet up`: the whole fleet on one machine, for trying it and for tests.

Creates (once) a fleet CA, certificates and a config in ``--dir``, builds the guest
image if missing, then runs a controller, a pool node and a sensor as child
processes, each exactly as an operator would start it. Ctrl-C or SIGTERM stops them
in reverse order; the pool node destroys its guests and ``up`` removes its libvirt
network and filter and checks that no guest or overlay of ours is left behind.

``--hypervisor auto`` takes KVM when /dev/kvm is usable, and falls back to software
emulation by itself when the pool node finds its first guests hung (KVM that accepts
guests but never runs them, as nested KVM does on many cloud VMs).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from fleetup.report import Report
from honeyfleet.config import write_toml
from honeyfleet.errors import HoneyfleetError
from honeyfleet.pki import Role, init_ca, load_ca, write_private
from honeyfleet.tls import TlsFiles

if TYPE_CHECKING:
    from poolnode.image import GuestImage

FLEET = "local"
TAG = "hfup"
NETWORK = "honeyfleet-up"
BRIDGE = "hfup0"
SUBNET = "10.78.0.1/24"
STOP_GRACE = 60.0
ROLES = ("controller", "poolnode", "sensor")
# The pool node's count of guests it destroyed as hung (poolnode/pool.py).
HUNG_SAMPLE = ("honeyfleet_poolnode_guests_destroyed_total", "hung")
METRICS_TIMEOUT = 5.0


class PrerequisiteMissing(HoneyfleetError):
    """Something `up` needs is not there; the message says what to do."""


class KvmHangs(HoneyfleetError):
    """The pool node found guests hung under KVM."""


@dataclass(frozen=True)
class Plan:
    """What `up` runs, from its command line."""

    directory: Path
    image_dir: Path
    guests: int
    ssh_port: int
    telnet_port: int
    hypervisor: str
    libvirt_uri: str
    guest_memory: int
    distro: str = "busybox"
    """The guest image: busybox (tiny, fastest boot) or debian (a real Debian 12 server)."""
    cpu_model: str = ""
    """guest_cpu_model: the CPU name the guests report (empty: the hypervisor's default)."""
    fallback: bool = False
    """``--hypervisor auto`` chose KVM: hung guests switch the pool node to qemu."""

    @property
    def config(self) -> Path:
        return self.directory / "honeyfleet.toml"

    @property
    def logs(self) -> Path:
        return self.directory / "logs"

    def tls(self, role: str, name: str) -> TlsFiles:
        """Where one identity's files live."""
        d = self.directory / "tls" / role
        return TlsFiles(ca=d / "ca.pem", cert=d / f"{name}.pem", key=d / f"{name}.key")


NAMES = {
    "controller": "controller",
    "poolnode": "local-pool",
    "sensor": "local-sensor",
    "admin": "operator",
}
# A Debian server with systemd wants more than busybox's 128 MiB; 512 MiB is what the
# smallest cloud VMs sell, and what `free` then shows.
DEFAULT_MEMORY = {"busybox": 128, "debian": 512}
# What /proc/cpuinfo of many KVM cloud VMs says: "Intel Xeon Processor (Skylake, IBRS)".
DEBIAN_CPU_MODEL = "Skylake-Server-IBRS"
DEFAULT_CPU = {"busybox": "", "debian": DEBIAN_CPU_MODEL}
# TCG's translated-code cache (MiB): a Debian guest's systemd, udev and modules outgrow
# busybox's 32 and boot about twice as fast with 128 (unused under KVM).
TB_CACHE = {"busybox": 32, "debian": 128}
PORTS = {"controller": 7300, "enroll": 7301, "poolnode": 7310, "poolnode metrics": 7311}


def port_taken(port: int) -> bool:
    """Whether something listens on a loopback port that one of `up`'s roles will bind.

    SO_REUSEADDR as the roles' own servers set it: connections of a fleet just stopped
    linger in TIME_WAIT on its ports, and they must not keep the next `up` from starting.
    """
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def check_prerequisites(plan: Plan) -> None:
    """Refuse to start, saying what to do, when something is missing.

    Local checks come first, so the message names the first thing to fix here.
    """
    if os.geteuid() != 0:
        raise PrerequisiteMissing(
            "`honeyfleet up` builds a guest image and runs VMs: run it as root (sudo)"
        )
    for what, port in (
        ("SSH", plan.ssh_port),
        ("Telnet", plan.telnet_port),
        *((name, p) for name, p in PORTS.items()),
    ):
        if port_taken(port):
            raise PrerequisiteMissing(
                f"port {port} ({what}) is taken: stop whatever uses it "
                f"(`ss -ltnp 'sport = :{port}'`)"
                + (
                    " or pick another with --ssh-port/--telnet-port"
                    if what in ("SSH", "Telnet")
                    else ""
                )
            )
    if plan.hypervisor == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise PrerequisiteMissing("/dev/kvm is not usable here: pass --hypervisor qemu")
    try:
        import libvirt
    except ImportError:
        raise PrerequisiteMissing(
            "libvirt-python is not installed: pip install 'honeyfleet[poolnode]'"
        ) from None
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # raised, not printed
    try:
        conn = libvirt.open(plan.libvirt_uri)
    except libvirt.libvirtError as e:
        raise PrerequisiteMissing(
            f"cannot reach libvirt at {plan.libvirt_uri} ({e.get_error_message()}): start it "
            "(`systemctl start libvirtd`, or `virtlogd -d && libvirtd -d`) and try again"
        ) from None
    conn.close()


def prepare_identities(plan: Plan) -> None:
    """A fleet CA and one certificate per role, made once."""
    ca_dir = plan.directory / "pki"
    ca = load_ca(ca_dir) if (ca_dir / "ca.pem").exists() else init_ca(ca_dir, FLEET)
    for role, name in NAMES.items():
        files = plan.tls(role, name)
        if not files.cert.exists():
            ca.issue(
                Role(role),
                name,
                dns=["localhost"],
                ips=["127.0.0.1"],
                out_dir=files.cert.parent,
            )


def egress_ca_files(image_dir: Path) -> tuple[Path, Path]:
    """The egress interception CA `up` uses (certificate, key): kept with the images, so
    every fleet built from them shares it and an image that trusts it is built once."""
    return image_dir / "egress-ca.pem", image_dir / "egress-ca.key"


def fleet_config(plan: Plan, image: GuestImage, backend_pass: str) -> dict[str, dict[str, Any]]:
    """The one config all three processes read (rewritten on every start)."""
    from poolnode.image import GuestImageSpec
    from sensor.config import telnetd_greeting

    def tls(role: str) -> dict[str, Any]:
        f = plan.tls(role, NAMES[role])
        return {"tls_ca": str(f.ca), "tls_cert": str(f.cert), "tls_key": str(f.key)}

    state = plan.directory / "state"
    controller = f"127.0.0.1:{PORTS['controller']}"
    return {
        "controller": {
            "listen": controller,
            "enroll_listen": f"127.0.0.1:{PORTS['enroll']}",
            "state_dir": str(state / "controller"),
            "ca_dir": str(plan.directory / "pki"),
            **tls("controller"),
        },
        "poolnode": {
            "controller": controller,
            "listen": f"127.0.0.1:{PORTS['poolnode']}",
            "state_dir": str(state / "poolnode"),
            # `up` reads its count of hung guests there (the KVM fallback).
            "metrics_listen": f"127.0.0.1:{PORTS['poolnode metrics']}",
            **tls("poolnode"),
            "backend": "libvirt",
            "max_vms": plan.guests,
            "max_parallel_boots": plan.guests,
            "hypervisor": plan.hypervisor,
            "libvirt_uri": plan.libvirt_uri,
            "guest_memory": plan.guest_memory,
            "guest_cpu_model": plan.cpu_model,
            "guest_tb_cache": TB_CACHE[plan.distro],
            "guest_image": str(image.disk),
            "egress_tls_ca_cert": str(egress_ca_files(plan.image_dir)[0]),
            "egress_tls_ca_key": str(egress_ca_files(plan.image_dir)[1]),
            "guest_kernel": str(image.kernel),
            "guest_initrd": str(image.initrd),
            "guest_cmdline": image.cmdline,
            "guest_tag": TAG,
            "network_name": NETWORK,
            "network_bridge": BRIDGE,
            "network_address": SUBNET,
            "backend_user": "root",
            "backend_pass": backend_pass,
        },
        "sensor": {
            "controller": controller,
            "state_dir": str(state / "sensor"),
            **tls("sensor"),
            "ssh_listen": [f"0.0.0.0:{plan.ssh_port}"],
            "telnet_listen": [f"0.0.0.0:{plan.telnet_port}"],
            # telnetd's banner with the guests' own kernel release (what `uname -r` says).
            "telnet_greeting": telnetd_greeting(image.kernel_version, GuestImageSpec.hostname),
            "json_log": str(plan.logs / "sensor-cowrie.json"),
            # Guests under software emulation on a busy machine can take longer than
            # the default 15s to let the sensor log in; the grace time must cover
            # lease_timeout (30s) plus this.
            "guest_login_timeout": 60.0,
            "login_grace_time": 120.0,
        },
        "admin": {"controller": controller, **tls("admin")},
    }


def backend_password(plan: Plan) -> str:
    """The guests' root password: random, made once per directory (the image embeds it)."""
    path = plan.directory / "backend_pass"
    if not path.exists():
        write_private(path, secrets.token_urlsafe(18).encode())
    return path.read_text().strip()


class Children:
    """The fleet's processes, started and stopped in order."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.procs: dict[str, asyncio.subprocess.Process] = {}

    async def start(self, role: str) -> None:
        """Start one role exactly as an operator would, logging to logs/<role>.log."""
        self.plan.logs.mkdir(parents=True, exist_ok=True)
        log = (self.plan.logs / f"{role}.log").open("ab")
        self.procs[role] = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "honeyfleet.cli",
            role,
            "--config",
            str(self.plan.config),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            # Out of the terminal's process group: Ctrl-C reaches `up` alone, which
            # stops the children in order (sensor, pool node, controller).
            start_new_session=True,
        )
        log.close()

    def died(self) -> str | None:
        """The first child that exited, if any."""
        return next((r for r, p in self.procs.items() if p.returncode is not None), None)

    def tail(self, role: str, lines: int = 15) -> str:
        """The end of a child's log, for error messages."""
        path = self.plan.logs / f"{role}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    async def stop(self) -> None:
        """Stop every child in reverse start order (sensor, pool node, controller)."""
        for role in reversed(ROLES):
            await self.stop_role(role)

    async def stop_role(self, role: str) -> None:
        """SIGTERM one child; SIGKILL it if it does not stop in time."""
        proc = self.procs.pop(role, None)
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(STOP_GRACE):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def hung_guests() -> int:
    """How many guests the pool node destroyed as hung (0 while it does not answer)."""
    url = f"http://127.0.0.1:{PORTS['poolnode metrics']}/metrics"

    def read() -> str:
        # A fixed http URL on loopback: the pool node's own metrics endpoint.
        with urllib.request.urlopen(url, timeout=METRICS_TIMEOUT) as reply:
            return str(reply.read().decode())

    try:
        text = await asyncio.to_thread(read)
    except OSError:
        return 0
    name, reason = HUNG_SAMPLE
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("reason") == reason:
                return int(sample.value)
    return 0


async def wait_ready(children: Children, plan: Plan, report: Report, since: float) -> None:
    """Wait for the guests and the sensor, failing if a child dies.

    The sensor counts as ready once it registered with the controller (it does so
    after it listens) at ``since`` or later; probing its port would log a pretend
    attacker.
    """
    from honeyfleet.status import fetch

    controller = f"127.0.0.1:{PORTS['controller']}"
    admin = plan.tls("admin", NAMES["admin"])
    report.step("guests booting", 0, plan.guests, plan.hypervisor)
    while True:
        if (dead := children.died()) is not None:
            raise HoneyfleetError(f"the {dead} stopped:\n{children.tail(dead)}")
        if plan.hypervisor == "kvm" and await hung_guests():
            if plan.fallback:
                raise KvmHangs("guests hang under KVM")
            raise HoneyfleetError(
                "guests hang under KVM on this host (no console output, no DHCP lease; "
                f"see {plan.logs}/poolnode.log): run with --hypervisor qemu"
            )
        with contextlib.suppress(HoneyfleetError):
            state = await fetch(controller, admin)
            nodes = state["pool_nodes"]
            pristine = nodes[0].guest_counts.pristine if nodes else 0
            report.step("guests booting", pristine, plan.guests, plan.hypervisor)
            sensor_up = any(
                s.name == NAMES["sensor"] and s.last_seen_time.ToSeconds() >= int(since)
                for s in state["sensors"]
            )
            if pristine >= plan.guests and sensor_up:
                return
        await asyncio.sleep(1)


async def _answers(port: int) -> bool:
    """Whether something accepts connections on a local port."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


def leftovers(plan: Plan) -> list[str]:
    """Remove our network and filter; the guests and overlays still present (none, when
    the pool node stopped cleanly). Blocking: run it in a thread."""
    import libvirt

    found = []
    conn = libvirt.open(plan.libvirt_uri)
    try:
        found += [f"domain {d.name()}" for d in conn.listAllDomains() if d.name().startswith(TAG)]
        # The network and the guest filter are ours alone (a pool node keeps them for
        # its next start); removing them is part of a clean stop.
        for net in conn.listAllNetworks():
            if net.name() == NETWORK:
                if net.isActive():
                    net.destroy()
                net.undefine()
        for nwfilter in conn.listAllNWFilters():
            if nwfilter.name() == f"{TAG}-guest":
                try:
                    nwfilter.undefine()
                except libvirt.libvirtError as e:
                    found.append(f"nwfilter {nwfilter.name()} ({e.get_error_message()})")
    finally:
        conn.close()
    overlays = plan.directory / "state" / "poolnode" / "guests"
    if overlays.exists():
        found += [f"overlay {p}" for p in overlays.iterdir() if p.suffix == ".qcow2"]
    return found


async def run(plan: Plan, console: Console) -> int:
    """Bring the fleet up, wait for Ctrl-C/SIGTERM, bring it down."""
    from poolnode.egress.intercept import load_or_make_ca
    from poolnode.image import Distro, GuestImageSpec, build_image
    from poolnode.image._cli import default_disk_mib

    check_prerequisites(plan)
    plan.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    prepare_identities(plan)
    password = backend_password(plan)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    children = Children(plan)
    with Report(console) as report:

        def step(name: str, index: int, total: int) -> None:
            report.step("guest image", index, total, name)

        distro = Distro(plan.distro)
        # The pool node's egress interception CA, made before the image so that a Debian
        # image trusts it (its wget and curl check certificates; busybox's do not).
        ca_cert, ca_key = egress_ca_files(plan.image_dir)
        await asyncio.to_thread(load_or_make_ca, ca_cert, ca_key)
        spec = GuestImageSpec(
            out_dir=plan.image_dir,
            backend_pass=password,
            distro=distro,
            disk_size_mib=default_disk_mib(distro),
            trust_ca=ca_cert.read_text() if distro is Distro.DEBIAN else "",
        )
        image = await asyncio.to_thread(build_image, spec, step)

        def configure(plan: Plan) -> None:
            write_toml(plan.config, fleet_config(plan, image, password))

        try:
            up = await bring_up(children, plan, configure, report, stop)
        except BaseException:
            await shut_down(children, plan, report)
            raise
        if up is None:  # Ctrl-C while booting
            return 130 if await shut_down(children, plan, report) else 1
    admin = plan.tls("admin", NAMES["admin"])
    console.print(
        f"""[bold green]honeyfleet is up[/] (hypervisor {up.hypervisor}).
  attack it:  ssh -p {plan.ssh_port} root@127.0.0.1   (any password but "root")
              telnet 127.0.0.1 {plan.telnet_port}
  fleet:      honeyfleet status --config {plan.config}
  sessions:   honeyfleet sessions list --config {plan.config}
              honeyfleet replay SESSION --config {plan.config}
              honeyfleet artefacts list --config {plan.config}   (captured files)
  grpcurl:    grpcurl -cacert {admin.ca} -cert {admin.cert} -key {admin.key} \\
                127.0.0.1:{PORTS["controller"]} honeyfleet.v1.FleetService/ListPoolNodes
  logs:       {plan.logs}/  (processes; sensor-cowrie.json has the sensor's events)
Ctrl-C stops everything.""",
        soft_wrap=True,  # no hard line breaks inside commands meant to be copied
    )
    waiter = asyncio.create_task(stop.wait())
    while not waiter.done():
        if (dead := children.died()) is not None:
            console.print(f"[red]the {dead} stopped unexpectedly:[/]\n{children.tail(dead)}")
            break
        await asyncio.wait({waiter}, timeout=1)
    clean = await shut_down(children, plan, Report(console))
    return 0 if clean and waiter.done() else 1


async def bring_up(
    children: Children,
    plan: Plan,
    configure: Callable[[Plan], None],
    report: Report,
    stop: asyncio.Event,
) -> Plan | None:
    """Start the roles and wait until they serve; the plan they run with, or None if
    ``stop`` came first. Hung guests under an auto-chosen KVM restart the pool node
    with software emulation."""
    configure(plan)
    since = time.time()
    for role in ROLES:
        await children.start(role)
        if role == "controller":
            await _until_port(children, role, PORTS["controller"])
    stopped = asyncio.create_task(stop.wait())
    try:
        while True:
            ready = asyncio.create_task(wait_ready(children, plan, report, since))
            await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not ready.done():
                ready.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ready
                return None
            try:
                ready.result()
            except KvmHangs:
                report.warn(
                    "KVM accepts guests here but does not run them (no console output, no "
                    "DHCP lease; nested KVM often hangs on cloud VMs). Falling back to "
                    "software emulation: the pool node restarts with hypervisor qemu "
                    "(--hypervisor qemu skips this check)."
                )
                await children.stop_role("poolnode")
                plan = replace(plan, hypervisor="qemu", fallback=False)
                configure(plan)
                await children.start("poolnode")
                continue
            return plan
    finally:
        stopped.cancel()


async def shut_down(children: Children, plan: Plan, report: Report) -> bool:
    """Stop the children, remove our network and filter; whether nothing is left."""
    report.say("stopping...")
    await children.stop()
    left = await asyncio.to_thread(leftovers, plan)
    if left:
        report.warn("left behind: " + ", ".join(left))
        return False
    report.say("stopped; nothing left behind")
    return True


async def _until_port(children: Children, role: str, port: int) -> None:
    """Wait until a child listens on its port (or fail if it dies)."""
    deadline = time.monotonic() + 60
    while not await _answers(port):
        if children.died() == role or time.monotonic() > deadline:
            raise HoneyfleetError(f"the {role} did not start:\n{children.tail(role)}")
        await asyncio.sleep(0.2)


def add_parser(commands: Any) -> None:
    """The `up` command."""
    p = commands.add_parser("up", help="run the whole fleet on this machine (Ctrl-C stops it)")
    p.add_argument(
        "--dir",
        type=Path,
        default=Path("honeyfleet-up"),
        help="where CA, config, state and logs go (default ./honeyfleet-up)",
    )
    p.add_argument(
        "--image-dir",
        type=Path,
        default=None,
        help="where the guest image is built (default DIR/image)",
    )
    p.add_argument("--guests", type=int, default=2, help="guests kept booted (default 2)")
    p.add_argument("--ssh-port", type=int, default=2222)
    p.add_argument("--telnet-port", type=int, default=2223)
    p.add_argument(
        "--hypervisor",
        choices=("auto", "kvm", "qemu"),
        default="auto",
        help="kvm, qemu (software emulation), or auto: kvm if /dev/kvm is usable, "
        "falling back to qemu if its guests hang",
    )
    p.add_argument(
        "--distro",
        choices=("busybox", "debian"),
        default="busybox",
        help="guest image: busybox (tiny, boots fastest) or debian (a real Debian 12 "
        "server: systemd, OpenSSH, apt; its first build takes a few minutes)",
    )
    p.add_argument(
        "--guest-memory",
        type=int,
        default=None,
        help=f"MiB per guest (default {DEFAULT_MEMORY['busybox']}, "
        f"{DEFAULT_MEMORY['debian']} for debian)",
    )
    p.add_argument(
        "--cpu-model",
        default=None,
        help=f"QEMU CPU model the guests report (default {DEBIAN_CPU_MODEL} for debian, "
        "the hypervisor's own otherwise)",
    )
    p.add_argument("--libvirt-uri", default="qemu:///system")
    p.set_defaults(func=_cmd_up)


def _cmd_up(args: Any) -> int:
    directory = args.dir.resolve()
    hypervisor = args.hypervisor
    auto = hypervisor == "auto"
    if auto:
        hypervisor = "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "qemu"
    plan = Plan(
        directory=directory,
        image_dir=(args.image_dir or directory / "image").resolve(),
        guests=args.guests,
        ssh_port=args.ssh_port,
        telnet_port=args.telnet_port,
        hypervisor=hypervisor,
        libvirt_uri=args.libvirt_uri,
        guest_memory=args.guest_memory or DEFAULT_MEMORY[args.distro],
        distro=args.distro,
        cpu_model=args.cpu_model if args.cpu_model is not None else DEFAULT_CPU[args.distro],
        fallback=auto and hypervisor == "kvm",
    )
    return asyncio.run(run(plan, Console()))
