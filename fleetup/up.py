"""`honeyfleet up`: the whole fleet on one machine, for trying it and for tests.

Creates (once) a fleet CA, certificates and a config in ``--dir``, builds the guest
image if missing, then runs a controller, a pool node and a sensor as child
processes, each exactly as an operator would start it. Ctrl-C or SIGTERM stops them
in reverse order; the pool node destroys its guests and ``up`` checks that no guest,
overlay or libvirt network of ours is left behind.
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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

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


class PrerequisiteMissing(HoneyfleetError):
    """Something `up` needs is not there; the message says what to do."""


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
PORTS = {"controller": 7300, "enroll": 7301, "poolnode": 7310}


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
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                raise PrerequisiteMissing(
                    f"port {port} ({what}) is taken: stop whatever uses it "
                    f"(`ss -ltnp 'sport = :{port}'`)"
                    + (
                        " or pick another with --ssh-port/--telnet-port"
                        if what in ("SSH", "Telnet")
                        else ""
                    )
                ) from None
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


def fleet_config(plan: Plan, image: GuestImage, backend_pass: str) -> dict[str, dict[str, Any]]:
    """The one config all three processes read (rewritten on every start)."""

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
            **tls("poolnode"),
            "backend": "libvirt",
            "max_vms": plan.guests,
            "max_parallel_boots": plan.guests,
            "hypervisor": plan.hypervisor,
            "libvirt_uri": plan.libvirt_uri,
            "guest_memory": plan.guest_memory,
            "guest_image": str(image.disk),
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
            "json_log": str(plan.logs / "sensor-cowrie.json"),
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
        """SIGTERM in reverse start order; SIGKILL what does not stop in time."""
        for role in reversed(list(self.procs)):
            proc = self.procs[role]
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    async with asyncio.timeout(STOP_GRACE):
                        await proc.wait()
                except TimeoutError:
                    proc.kill()
                    await proc.wait()


async def wait_ready(children: Children, plan: Plan, progress: Progress) -> None:
    """Wait for the guests and the sensor, failing if a child dies.

    The sensor counts as ready once it registered with the controller (it does so
    after it listens); probing its port would log a pretend attacker.
    """
    from honeyfleet.status import fetch

    controller = f"127.0.0.1:{PORTS['controller']}"
    admin = plan.tls("admin", NAMES["admin"])
    started = time.time()
    guests = progress.add_task("guests booting", total=plan.guests)
    while True:
        if (dead := children.died()) is not None:
            raise HoneyfleetError(f"the {dead} stopped:\n{children.tail(dead)}")
        with contextlib.suppress(HoneyfleetError):
            state = await fetch(controller, admin)
            nodes = state["pool_nodes"]
            pristine = nodes[0].guest_counts.pristine if nodes else 0
            progress.update(guests, completed=pristine)
            sensor_up = any(
                s.name == NAMES["sensor"] and s.last_seen_time.ToSeconds() >= int(started)
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
    """Guests, networks and overlays of ours still present (should be none)."""
    import libvirt

    found = []
    conn = libvirt.open(plan.libvirt_uri)
    try:
        found += [f"domain {d.name()}" for d in conn.listAllDomains() if d.name().startswith(TAG)]
        for net in conn.listAllNetworks():
            if net.name() == NETWORK:
                # The network is ours alone; removing it is part of a clean stop.
                if net.isActive():
                    net.destroy()
                net.undefine()
    finally:
        conn.close()
    overlays = plan.directory / "state" / "poolnode" / "guests"
    if overlays.exists():
        found += [f"overlay {p}" for p in overlays.iterdir() if p.suffix == ".qcow2"]
    return found


async def run(plan: Plan, console: Console) -> int:
    """Bring the fleet up, wait for Ctrl-C/SIGTERM, bring it down."""
    from poolnode.image import GuestImageSpec, build_image

    check_prerequisites(plan)
    plan.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    prepare_identities(plan)
    password = backend_password(plan)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("guest image", total=None)

        def step(name: str, index: int, total: int) -> None:
            progress.update(task, description=f"guest image: {name}", completed=index, total=total)

        spec = GuestImageSpec(out_dir=plan.image_dir, backend_pass=password)
        image = await asyncio.to_thread(build_image, spec, step)
        write_toml(plan.config, fleet_config(plan, image, password))
        children = Children(plan)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            for role in ROLES:
                await children.start(role)
                if role == "controller":
                    await _until_port(children, role, PORTS["controller"])
            ready = asyncio.create_task(wait_ready(children, plan, progress))
            stopped = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if ready not in done:  # Ctrl-C while booting: stop what has started
                ready.cancel()
                await children.stop()
                return 130
            ready.result()
        except BaseException:
            await children.stop()
            raise
    admin = plan.tls("admin", NAMES["admin"])
    console.print(
        f"""[bold green]honeyfleet is up.[/]
  attack it:  ssh -p {plan.ssh_port} root@127.0.0.1   (any password but "root")
              telnet 127.0.0.1 {plan.telnet_port}
  fleet:      honeyfleet status --config {plan.config}
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
    console.print("stopping...")
    await children.stop()
    left = leftovers(plan)
    if left:
        console.print("[red]left behind:[/] " + ", ".join(left))
        return 1
    console.print("stopped; nothing left behind")
    return 0 if waiter.done() else 1


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
        help="kvm, qemu (software emulation), or auto: kvm if /dev/kvm is usable",
    )
    p.add_argument("--guest-memory", type=int, default=128, help="MiB per guest")
    p.add_argument("--libvirt-uri", default="qemu:///system")
    p.set_defaults(func=_cmd_up)


def _cmd_up(args: Any) -> int:
    directory = args.dir.resolve()
    hypervisor = args.hypervisor
    if hypervisor == "auto":
        hypervisor = "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "qemu"
    plan = Plan(
        directory=directory,
        image_dir=(args.image_dir or directory / "image").resolve(),
        guests=args.guests,
        ssh_port=args.ssh_port,
        telnet_port=args.telnet_port,
        hypervisor=hypervisor,
        libvirt_uri=args.libvirt_uri,
        guest_memory=args.guest_memory,
    )
    return asyncio.run(run(plan, Console()))
