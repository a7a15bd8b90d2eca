"""The libvirt backend: each guest a transient QEMU domain on its own qcow2 overlay.

Every libvirt object the node owns is named with ``guest_tag``: domains
``<tag>-<id>`` (the pool's guest ids), the nwfilter ``<tag>-guest``; overlays and
console logs live in ``state_dir/guests``. Domains also carry a honeyfleet
``<metadata>`` element, so start-up removes a crashed run's leftovers and never an
operator's domain that merely shares the prefix.

Domains are started with ``createXML`` (transient) and ``START_AUTODESTROY``: a
guest that stops, or a node process that dies, leaves no domain definition behind,
and guests never outlive the node that supervises them and serves their tunnels.
Addresses come from the pool network's DHCP leases, looked up by each guest's
random MAC.

libvirt's calls block, so each runs in a worker thread over one shared connection
(libvirt connections are thread-safe); a connection lost to a libvirtd restart is
reopened once per failing call.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import secrets
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import libvirt

from honeyfleet.errors import ConfigError, FailedPrecondition, Unavailable
from poolnode.backends.libvirt_xml import (
    GUEST_NS,
    DomainSpec,
    guest_tag,
    network_fingerprint,
    render_domain,
    render_network,
    render_nwfilter,
)
from poolnode.config import PoolNodeConfig

log = logging.getLogger(__name__)

T = TypeVar("T")
QEMU_IMG_TIMEOUT = 60.0
# libvirt reports the stock filters' absence only when a domain starts; check up front.
BASE_FILTER = "clean-traffic"


class LibvirtError(Unavailable):
    """A libvirt call failed; the message names the call and libvirt's reason."""


class QemuImgError(FailedPrecondition):
    """qemu-img could not inspect the base image or make an overlay."""


@dataclass(frozen=True)
class LibvirtGuest:
    """The backend's handle on one guest."""

    name: str
    mac: str
    overlay: Path
    console_log: Path


class LibvirtBackend:
    """Guests as QEMU domains on qcow2 overlays of one read-only base image."""

    name = "libvirt"
    max_guests: int | None = None

    def __init__(self, config: PoolNodeConfig) -> None:
        self.config = config
        try:
            address = ipaddress.ip_interface(config.network_address)
        except ValueError as e:
            raise ConfigError("network_address", str(e)) from None
        if not isinstance(address, ipaddress.IPv4Interface):
            raise ConfigError("network_address", "must be an IPv4 address with a prefix")
        self.gateway = address
        self.nwfilter = f"{config.guest_tag}-guest"
        self.guests_dir = config.state_dir / "guests"
        self._base_format = "qcow2"
        self._conn: Any = None
        self._reconnect = threading.Lock()
        self._macs: set[str] = set()

    # Connection

    def _open(self) -> Any:
        """Open the libvirt connection (blocking)."""
        try:
            return libvirt.open(self.config.libvirt_uri)
        except libvirt.libvirtError as e:
            raise Unavailable(
                f"cannot connect to libvirt at {self.config.libvirt_uri}: "
                f"{e.get_error_message()}; start libvirtd (scripts/setup-libvirt.sh prepares "
                "a host, tests/e2e/netns_notes.md shows how to run it) or fix libvirt_uri"
            ) from None

    def _with_conn(self, what: str, op: Callable[[Any], T]) -> T:
        """Run ``op(connection)`` (blocking); reconnect once if libvirtd went away."""
        conn = self._conn
        if conn is None:
            raise FailedPrecondition("the libvirt backend is not started")
        try:
            return op(conn)
        except libvirt.libvirtError as e:
            if _alive(conn):
                raise LibvirtError(f"{what}: {e.get_error_message()}") from None
        with self._reconnect:
            if self._conn is conn:
                log.warning(
                    "lost the libvirt connection; reconnecting to %s", self.config.libvirt_uri
                )
                self._conn = self._open()
            conn = self._conn
        try:
            return op(conn)
        except libvirt.libvirtError as e:
            raise LibvirtError(f"{what}: {e.get_error_message()}") from None

    async def _call(self, what: str, op: Callable[[Any], T]) -> T:
        """``_with_conn`` in a worker thread."""
        return await asyncio.to_thread(self._with_conn, what, op)

    # Backend protocol

    async def start(self) -> None:
        """Check the host, connect, remove an earlier run's leftovers, define network and filter."""
        config = self.config
        for key, path in (
            ("guest_image", config.guest_image),
            ("guest_kernel", config.guest_kernel),
            ("guest_initrd", config.guest_initrd),
        ):
            if path is not None and not path.is_file():
                raise ConfigError(
                    key,
                    f"{path} does not exist: build the guest image with "
                    "'honeyfleet image build --out DIR' and use DIR/current/base.qcow2, "
                    "vmlinuz and initrd.img, or point it at your own image",
                )
        self._base_format = await self._image_format(config.guest_image)
        libvirt.registerErrorHandler(_quiet, None)  # errors are raised, not printed
        self._conn = await asyncio.to_thread(self._open)
        try:
            await self._call("check the hypervisor", self._check_host)
            self.guests_dir.mkdir(parents=True, exist_ok=True)
            foreign = await self._call("remove leftover domains", self._remove_leftover_domains)
            await asyncio.to_thread(self._remove_leftover_files, foreign)
            await self._call("define the guest filter", self._define_nwfilter)
            await self._call("define the pool network", self._ensure_network)
        except BaseException:
            await self.stop()
            raise
        log.info(
            "libvirt backend ready: %s, network %s (%s on %s), filter %s, base %s (%s)",
            config.libvirt_uri,
            config.network_name,
            self.gateway,
            config.network_bridge,
            self.nwfilter,
            config.guest_image,
            self._base_format,
        )

    async def create(self, guest_id: str) -> object:
        """Make the guest's overlay and start its transient domain."""
        config = self.config
        mac = self._new_mac()
        guest = LibvirtGuest(
            name=guest_id,
            mac=mac,
            overlay=self.guests_dir / f"{guest_id}.qcow2",
            console_log=self.guests_dir / f"{guest_id}.console.log",
        )
        xml = render_domain(
            DomainSpec(
                name=guest_id,
                hypervisor=config.hypervisor,
                memory_mib=config.guest_memory,
                vcpus=config.guest_vcpus,
                cpu_model=config.guest_cpu_model,
                tb_cache_mib=config.guest_tb_cache,
                disk=guest.overlay,
                mac=mac,
                network=config.network_name,
                nwfilter=self.nwfilter,
                dns_server=str(self.gateway.ip),
                console_log=guest.console_log,
                kernel=config.guest_kernel,
                initrd=config.guest_initrd,
                cmdline=config.guest_cmdline,
                tag=config.guest_tag,
            )
        )
        self._macs.add(mac)
        try:
            backing = str(config.guest_image.resolve())
            await self._qemu_img(
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                self._base_format,
                "-b",
                backing,
                str(guest.overlay),
            )
            guest.overlay.chmod(0o600)  # attackers' data: for root (and QEMU) only
            await self._start_domain(guest_id, xml)
        except BaseException:
            self._macs.discard(mac)
            _unlink(guest.overlay, guest.console_log)
            raise
        log.info("guest %s: domain started (mac %s, overlay %s)", guest_id, mac, guest.overlay)
        return guest

    async def _start_domain(self, name: str, xml: str) -> None:
        """Start a transient domain; if cancelled meanwhile, undo the start once it lands."""
        started = asyncio.ensure_future(
            self._call(
                f"start guest {name}",
                lambda c: c.createXML(xml, libvirt.VIR_DOMAIN_START_AUTODESTROY),
            )
        )
        try:
            await asyncio.shield(started)
        except asyncio.CancelledError:
            # The worker thread cannot be interrupted and may still start the domain.
            with contextlib.suppress(Exception):
                await started
                await self._call(f"destroy guest {name}", lambda c: _destroy_domain(c, name))
            raise

    async def address(self, handle: object) -> str | None:
        """The guest's IPv4 address from the pool network's DHCP leases."""
        guest = _guest(handle)

        def lookup(conn: Any) -> str | None:
            leases = conn.networkLookupByName(self.config.network_name).DHCPLeases(guest.mac)
            ipv4 = [
                lease
                for lease in leases
                if lease.get("type") == libvirt.VIR_IP_ADDR_TYPE_IPV4 and lease.get("ipaddr")
            ]
            newest = max(ipv4, key=lambda lease: lease.get("expirytime", 0), default=None)
            return str(newest["ipaddr"]) if newest else None

        return await self._call(f"read guest {guest.name}'s DHCP lease", lookup)

    async def alive(self, handle: object) -> bool:
        """Whether the guest's domain exists and runs (raises if libvirt is unreachable)."""
        guest = _guest(handle)

        def running(conn: Any) -> bool:
            try:
                return bool(conn.lookupByName(guest.name).isActive())
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return False
                raise

        return await self._call(f"look up guest {guest.name}", running)

    async def hung(self, handle: object) -> str | None:
        """Whether the guest's serial console is still empty (QEMU runs but the guest
        never did): KVM that accepts guests but never runs them (nested KVM on many
        cloud VMs) looks exactly like this."""
        guest = _guest(handle)
        size = await asyncio.to_thread(_size, guest.console_log)
        if size:
            return None
        if self.config.hypervisor == "kvm":
            hint = (
                "KVM accepts guests here but does not run them (nested KVM often hangs "
                'on cloud VMs): set hypervisor = "qemu" (software emulation) in [poolnode]'
            )
        else:
            hint = (
                "the guest never started: check guest_kernel, guest_initrd and "
                f"guest_cmdline (its console log is {guest.console_log})"
            )
        where = f"hypervisor = {self.config.hypervisor!r}"
        return f"no console output and no DHCP lease under {where}; {hint}"

    async def destroy(self, handle: object, keep_disk: Path | None) -> None:
        """Stop the domain, then delete the overlay or move it to ``keep_disk``."""
        guest = _guest(handle)
        await self._call(f"destroy guest {guest.name}", lambda c: _destroy_domain(c, guest.name))
        self._macs.discard(guest.mac)
        if keep_disk is None:
            _unlink(guest.overlay, guest.console_log)
            log.info("guest %s: domain and overlay removed", guest.name)
            return

        def keep() -> None:
            keep_disk.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(guest.overlay, keep_disk)
            if guest.console_log.exists():
                shutil.move(guest.console_log, keep_disk.with_suffix(".console.log"))

        await asyncio.to_thread(keep)
        log.info("guest %s: domain removed, overlay kept as %s", guest.name, keep_disk)

    async def stop(self) -> None:
        """Close the connection; network and filter stay defined for the next start."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                await asyncio.to_thread(conn.close)

    def ports(self, handle: object) -> tuple[int, int]:
        """The guests' SSH and Telnet ports (the same for every guest of an image)."""
        return self.config.guest_ssh_port, self.config.guest_telnet_port

    # Start-up steps (blocking; run through _call)

    def _check_host(self, conn: Any) -> None:
        """Refuse a hypervisor this host lacks, or a libvirt without the stock filters."""
        try:
            conn.getDomainCapabilities(None, "x86_64", None, self.config.hypervisor)
        except libvirt.libvirtError as e:
            other = "qemu" if self.config.hypervisor == "kvm" else "kvm"
            raise ConfigError(
                "hypervisor",
                f"{self.config.hypervisor!r} is not available on this host "
                f"({e.get_error_message()}); try hypervisor = {other!r}",
            ) from None
        try:
            conn.nwfilterLookupByName(BASE_FILTER)
        except libvirt.libvirtError:
            raise FailedPrecondition(
                f"libvirt has no {BASE_FILTER!r} filter: install "
                "libvirt-daemon-config-nwfilter and restart libvirtd"
            ) from None

    def _remove_leftover_domains(self, conn: Any) -> set[str]:
        """Destroy (and undefine) the domains an earlier run of this node left behind.

        Returns the names of domains with our prefix that are not ours (left alone).
        """
        prefix = f"{self.config.guest_tag}-"
        foreign: set[str] = set()
        for domain in conn.listAllDomains(0):
            name = domain.name()
            if not name.startswith(prefix):
                continue
            try:
                marker = domain.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, GUEST_NS, 0)
            except libvirt.libvirtError:
                marker = ""
            if guest_tag(marker) != self.config.guest_tag:
                log.warning("domain %s is not one of this node's guests: left alone", name)
                foreign.add(name)
                continue
            log.warning("guest %s: left by an earlier run; destroying it", name)
            _destroy_domain(conn, name)
        return foreign

    def _remove_leftover_files(self, keep: set[str]) -> None:
        """Delete overlays and console logs an earlier run left (except ``keep``'s guests)."""
        prefix = f"{self.config.guest_tag}-"
        for path in sorted(self.guests_dir.iterdir()):
            owner = path.name.split(".", 1)[0]
            if owner in keep:
                continue
            if path.name.startswith(prefix) and path.suffix in (".qcow2", ".log"):
                log.warning("removing %s, left by an earlier run", path)
                path.unlink(missing_ok=True)

    def _define_nwfilter(self, conn: Any) -> None:
        """Define (or update in place) the guest filter."""
        try:
            uuid: str | None = conn.nwfilterLookupByName(self.nwfilter).UUIDString()
        except libvirt.libvirtError:
            uuid = None
        config = self.config
        egress = [("udp", config.egress_dns_port)]
        if config.egress_policy != "drop":
            egress.append(("tcp", config.egress_sinkhole_port))
        if config.egress_policy == "fetch":
            egress.append(("udp", config.egress_tftp_port))
        conn.nwfilterDefineXML(render_nwfilter(self.nwfilter, uuid, tuple(egress)))

    def _ensure_network(self, conn: Any) -> None:
        """Define and start the pool network; re-create it if it runs with other settings."""
        name = self.config.network_name
        try:
            network = conn.networkLookupByName(name)
        except libvirt.libvirtError:
            network = None
        uuid = network.UUIDString() if network is not None else None
        xml = render_network(name, self.config.network_bridge, self.gateway, uuid)
        if network is not None and network.isActive():
            if network_fingerprint(network.XMLDesc(0)) == network_fingerprint(xml):
                return
            log.warning("network %s runs with other settings; re-creating it", name)
            network.destroy()
        network = conn.networkDefineXML(xml)
        network.create()

    # Helpers

    def _new_mac(self) -> str:
        """A random MAC in QEMU's 52:54:00 range that no live guest of ours has."""
        while True:
            mac = "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))
            if mac not in self._macs:
                return mac

    async def _image_format(self, image: Path) -> str:
        """The base image's format, as qemu-img sees it (``-U``: guests may hold it open)."""
        info = json.loads(await self._qemu_img("info", "-U", "--output=json", str(image)))
        if info.get("backing-filename"):
            log.info("base image %s itself has a backing file: %s", image, info["backing-filename"])
        return str(info.get("format", "qcow2"))

    async def _qemu_img(self, *args: str) -> str:
        """Run qemu-img; its stdout, or an error naming the command and its stderr."""
        try:
            proc = await asyncio.create_subprocess_exec(
                "qemu-img",
                *args,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except FileNotFoundError:
            raise QemuImgError("qemu-img not found: install qemu-utils") from None
        try:
            async with asyncio.timeout(QEMU_IMG_TIMEOUT):
                out, err = await proc.communicate()
        except TimeoutError:
            raise QemuImgError(f"qemu-img {args[0]} took over {QEMU_IMG_TIMEOUT:.0f}s") from None
        finally:
            if proc.returncode is None:
                # Timed out or cancelled: a qemu-img left running would write its file
                # after the caller has cleaned up.
                proc.kill()
                await proc.wait()
        if proc.returncode != 0:
            raise QemuImgError(
                f"qemu-img {' '.join(args)} failed: {err.decode(errors='replace').strip()}"
            )
        return out.decode()


def _guest(handle: object) -> LibvirtGuest:
    """The handle, typed."""
    assert isinstance(handle, LibvirtGuest)
    return handle


def _destroy_domain(conn: Any, name: str) -> None:
    """Stop a domain and drop its definition; a domain already gone is fine."""
    try:
        domain = conn.lookupByName(name)
        if domain.isActive():
            domain.destroy()
        if domain.isPersistent():
            domain.undefine()
    except libvirt.libvirtError as e:
        if e.get_error_code() not in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
            raise


def _alive(conn: Any) -> bool:
    """Whether a connection still reaches libvirtd (False also if asking fails)."""
    try:
        return bool(conn.isAlive())
    except libvirt.libvirtError:
        return False


def _size(path: Path) -> int:
    """A file's size; 0 if it does not exist (yet)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _unlink(*paths: Path) -> None:
    """Delete files that may not exist."""
    for path in paths:
        path.unlink(missing_ok=True)


def _quiet(_context: object, _error: object) -> None:
    """libvirt's default handler prints every error to stderr; ours are raised instead."""
