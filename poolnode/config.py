"""The pool node's configuration (the ``[poolnode]`` section).

Pool settings keep the names of Cowrie's backend pool where the meaning is the same.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from honeyfleet import outbox, uploader
from honeyfleet.config import (
    fraction,
    host_port,
    instance_id,
    non_negative,
    optional_host_port,
    positive,
    setting,
)
from honeyfleet.errors import ConfigError
from honeyfleet.tls import TlsFiles


def _port(value: int) -> str | None:
    """Check: a TCP port number."""
    return None if 0 < value < 65536 else "must be a TCP port (1-65535)"


def _name_prefix(value: str) -> str | None:
    """Check: a short prefix that is safe in libvirt names, file names and bridge names."""
    if re.fullmatch(r"[a-z0-9][a-z0-9-]{0,15}", value):
        return None
    return "must be 1-16 lower-case letters, digits or '-' (it prefixes libvirt objects)"


def _bridge(value: str) -> str | None:
    """Check: a Linux network interface name."""
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}", value):
        return None
    return "must be an interface name: 1-15 letters, digits, '_', '.' or '-'"


def _cpu_model(value: str) -> str | None:
    """Check: empty, or a name shaped like QEMU's CPU models (Skylake-Server-IBRS)."""
    if value == "" or re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", value):
        return None
    return "must be a QEMU CPU model name such as Skylake-Server-IBRS (or empty)"


def _gateway(value: str) -> str | None:
    """Check: an IPv4 host address with its prefix, leaving room for guests."""
    try:
        address = ipaddress.ip_interface(value)
    except ValueError:
        address = None
    if (
        not isinstance(address, ipaddress.IPv4Interface)
        or "/" not in value
        or address.network.prefixlen > 29
        or address.ip in (address.network.network_address, address.network.broadcast_address)
    ):
        return "must be the host's IPv4 address and prefix on the pool network, e.g. 10.77.0.1/24"
    return None


def _log_group(value: int) -> str | None:
    """Check: an NFLOG group number."""
    return None if 0 <= value < 65536 else "must be an NFLOG group (0-65535)"


def _host_patterns(value: tuple[str, ...]) -> str | None:
    """Check: host names, each maybe with ``*`` wildcards (``*.example.com``)."""
    for pattern in value:
        if not re.fullmatch(r"[A-Za-z0-9*?_.:-]{1,253}", pattern):
            return f"{pattern!r} is not a host name or a pattern such as *.example.com"
    return None


@dataclass(frozen=True)
class PoolNodeConfig:
    """Settings of a pool node process."""

    controller: str = setting(
        "127.0.0.1:7300", "host:port of the controller's fleet API", check=host_port
    )
    listen: str = setting(
        "127.0.0.1:7310", "host:port the node serves PoolNodeService and Tunnel on", check=host_port
    )
    advertise: str = setting("", "host:port the controller and sensors dial (default: listen)")
    state_dir: Path = setting(Path("state/poolnode"), "where the node keeps overlays and state")
    tls_ca: Path = setting(Path("tls/ca.pem"), "fleet CA certificate")
    tls_cert: Path = setting(Path("tls/cert.pem"), "the node's certificate")
    tls_key: Path = setting(Path("tls/key.pem"), "the node's private key")
    metrics_listen: str = setting(
        "", "host:port for Prometheus metrics (empty: off)", check=optional_host_port
    )
    labels: Mapping[str, str] = setting(
        factory=lambda: {"image": "busybox"}, help="image labels sensors can ask for"
    )
    backend: Literal["libvirt", "static"] = setting(
        "libvirt", "libvirt (VMs from a base image) or static (hosts you run yourself)"
    )

    # The pool (Cowrie's names).
    max_vms: int = setting(2, "guests kept alive", check=positive)
    unused_timeout: float = setting(
        600.0, "seconds a used guest is kept for the same attacker address", check=non_negative
    )
    share_guests: bool = setting(
        False, "let attackers from different addresses share a guest when none is pristine"
    )
    recycle_period: float = setting(
        3600.0,
        "seconds after which pristine and idle guests are replaced (0: never)",
        check=non_negative,
    )
    save_snapshots: bool = setting(False, "keep a destroyed guest's disk overlay for analysis")
    snapshot_path: Path | None = setting(
        None, "where saved overlays go (default: state_dir/snapshots)"
    )
    disk_diff: bool = setting(
        False,
        "when a used guest is destroyed, compare its disk with the base image (libguestfs) "
        "and report every file created or changed as a honeyfleet.guest.file event, keeping "
        "contents in state_dir/downloads and uploading them to the controller's artefact "
        "store (libvirt backend only)",
    )
    disk_diff_max_file_bytes: int = setting(
        10 * 1024 * 1024,
        "largest file whose content a disk diff keeps (bigger ones are hashed only)",
        check=non_negative,
    )
    disk_diff_max_total_bytes: int = setting(
        100 * 1024 * 1024,
        "content a disk diff keeps per guest, all files together",
        check=non_negative,
    )
    disk_diff_max_files: int = setting(
        500, "files a disk diff reports per guest (the most recently changed)", check=positive
    )
    disk_diff_timeout: float = setting(
        300.0,
        "seconds a disk diff may take, its appliance's boot included; then it is killed",
        check=positive,
    )
    boot_timeout: float = setting(
        180.0, "seconds a guest may take to accept the node's SSH login", check=positive
    )
    boot_silence_timeout: float = setting(
        45.0,
        "seconds a booting guest may show no sign of life (no console output, no DHCP "
        "lease) before it counts as hung and is destroyed (0: only boot_timeout applies)",
        check=non_negative,
    )
    health_interval: float = setting(
        10.0, "seconds between health checks and pool upkeep", check=positive
    )
    max_parallel_boots: int = setting(2, "guests booting at once", check=positive)
    backend_user: str = setting(
        "root", "the guests' login account (the node's own SSH login; Telnet leases carry it)"
    )
    backend_pass: str = setting("", "its password (required)")

    # libvirt backend.
    libvirt_uri: str = setting("qemu:///system", "libvirt connection URI")
    hypervisor: Literal["kvm", "qemu"] = setting("kvm", "kvm, or qemu for software emulation")
    guest_memory: int = setting(256, "MiB of memory per guest", check=positive)
    guest_vcpus: int = setting(1, "virtual CPUs per guest", check=positive)
    guest_cpu_model: str = setting(
        "",
        "named QEMU CPU model the guests see (e.g. Skylake-Server-IBRS, whose /proc/cpuinfo "
        'says "Intel Xeon Processor (Skylake, IBRS)"); empty: the hypervisor\'s default',
        check=_cpu_model,
    )
    guest_tb_cache: int = setting(
        32,
        "MiB of translated code QEMU keeps per guest under TCG (hypervisor = qemu): 32 "
        "suffices for busybox; a Debian guest boots about twice as fast with 128",
        check=positive,
    )
    guest_image: Path = setting(Path("images/guest.qcow2"), "read-only base disk image (qcow2)")
    guest_kernel: Path | None = setting(
        None, "kernel to boot directly (unset: boot the image's own bootloader)"
    )
    guest_initrd: Path | None = setting(None, "initramfs for guest_kernel")
    guest_cmdline: str = setting(
        "root=/dev/vda rw console=ttyS0 quiet", "kernel command line for guest_kernel"
    )
    guest_ssh_port: int = setting(22, "the guests' SSH port", check=_port)
    guest_telnet_port: int = setting(23, "the guests' Telnet port", check=_port)
    guest_tag: str = setting(
        "hf",
        "name prefix of this node's libvirt objects and snapshots (unique per libvirt host)",
        check=_name_prefix,
    )
    network_name: str = setting("honeyfleet-pool", "libvirt network the guests live on")
    network_bridge: str = setting(
        "hfpool0", "bridge device of the pool network (unique per libvirt host)", check=_bridge
    )
    network_address: str = setting(
        "192.168.150.1/24",
        "the pool network's host address and prefix (the guests' gateway and resolver)",
        check=_gateway,
    )

    # Egress containment (what guests' outbound traffic meets; see poolnode.egress).
    egress_policy: Literal["drop", "sinkhole", "fetch"] = setting(
        "sinkhole",
        "drop (nothing leaves; every attempt is an event), sinkhole (DNS answered with the "
        "node's own address, whose listener accepts TCP on any port and records what the "
        "guest sends) or fetch (as sinkhole, but HTTP and FTP downloads are fetched through "
        "egress_fetch_proxy, TFTP ones from egress_fetch_tftp_source, and served to the guest)",
    )
    egress_dns_port: int = setting(
        10053, "port of the node's DNS server on the pool network's address", check=_port
    )
    egress_sinkhole_port: int = setting(
        10080,
        "port of the node's sinkhole listener on the pool network's address (guests' TCP "
        "to any address and port is redirected there)",
        check=_port,
    )
    egress_tftp_port: int = setting(
        10069,
        "port of the node's TFTP server on the pool network's address (fetch only: guests' "
        "UDP to port 69 anywhere is redirected there)",
        check=_port,
    )
    egress_log_group: int = setting(
        7707,
        "netfilter NFLOG group the node reads dropped attempts from (unique per host)",
        check=_log_group,
    )
    egress_capture_bytes: int = setting(
        4096, "first bytes of a guest's connection the sinkhole reads and records", check=positive
    )
    egress_read_timeout: float = setting(
        10.0, "seconds the sinkhole waits for a guest to send its request", check=positive
    )
    egress_max_connections: int = setting(
        32, "sinkhole connections a guest may hold open at once (more are closed)", check=positive
    )
    egress_events_per_minute: float = setting(
        120.0,
        "egress events a guest may cause per minute on average (beyond: counted, not sent)",
        check=positive,
    )
    egress_events_burst: int = setting(
        30, "egress events a guest may cause at once before the rate applies", check=positive
    )
    egress_fetch_proxy: str = setting(
        "",
        "host:port of the HTTP proxy downloads are fetched through (required with fetch: "
        "guests reach nothing real but through it)",
        check=optional_host_port,
    )
    egress_intercept_tls: bool = setting(
        True,
        "under sinkhole and fetch, answer guests' TLS with a leaf of the interception CA "
        "(egress_tls_ca_cert) for the server name they ask, so the HTTPS request inside is "
        "recorded (and fetched under fetch); false: TLS is recorded by server name only",
    )
    egress_tls_ca_cert: Path | None = setting(
        None,
        "the interception CA's certificate (default state_dir/egress-ca.pem, made with its "
        "key on first start); it goes into guest images' trust stores, the key never does",
    )
    egress_tls_ca_key: Path | None = setting(
        None, "the interception CA's private key (default state_dir/egress-ca.key)"
    )
    egress_fetch_ca_bundle: Path | None = setting(
        None,
        "CA certificates (PEM) HTTPS origins are checked against under fetch (default: the "
        "system's trust store)",
    )
    egress_fetch_tftp_source: str = setting(
        "",
        "local address TFTP downloads are fetched from under fetch (the operator's way out; "
        "no HTTP proxy carries TFTP); empty: whatever the node's routes choose",
    )
    egress_fetch_max_bytes: int = setting(
        10 * 1024 * 1024, "largest download fetched for a guest", check=positive
    )
    egress_fetch_timeout: float = setting(
        30.0, "seconds a download may take, connecting included", check=positive
    )
    egress_fetch_allow: tuple[str, ...] = setting(
        factory=tuple,
        help="host names downloads may come from (patterns like *.example.com; empty: any)",
        check=_host_patterns,
    )
    egress_fetch_deny: tuple[str, ...] = setting(
        factory=tuple,
        help="host names downloads never come from (checked before egress_fetch_allow)",
        check=_host_patterns,
    )

    # Events (the sensor's keys: the same spool and uploader).
    uuid: str = setting(
        "",
        "this node's identity, the uuid field of its own events; "
        "empty: made once and kept in state_dir/uuid",
        check=instance_id,
    )
    spool_path: Path | None = setting(
        None, "the event spool's database (default: state_dir/spool.sqlite3)"
    )
    spool_max_bytes: int = setting(
        64 * 1024 * 1024, "bound on undelivered events in the spool", check=positive
    )
    spool_near_full: float = setting(
        0.9,
        "spool fill fraction past which the spool counts as near full "
        "(honeyfleet_poolnode_spool_near_full)",
        check=fraction,
    )
    spool_reserve_bytes: int = setting(
        16 * 1024 * 1024,
        "disk the spool holds back for events when the disk fills up",
        check=non_negative,
    )
    upload_batch: int = uploader.batch_setting()
    upload_linger: float = uploader.linger_setting()
    upload_max_linger: float = uploader.max_linger_setting()
    downloads_max_bytes: int = setting(
        1024**3,
        "bytes state_dir/downloads (fetched downloads, files from disk diffs) may hold; "
        "beyond, the oldest are pruned (never one being served or waiting for upload)",
        check=non_negative,
    )
    downloads_max_age: float = setting(
        30 * 86400.0,
        "seconds a file stays in state_dir/downloads (0: no age limit)",
        check=non_negative,
    )
    artefact_outbox_max_bytes: int = outbox.max_bytes_setting()
    artefact_outbox_max_files: int = outbox.max_files_setting()
    json_log: Path | None = setting(None, "also write the node's events to this JSON lines file")

    # static backend.
    static_hosts: tuple[str, ...] = setting(
        factory=tuple, help='hosts of the static backend, "host:ssh_port[:telnet_port]"'
    )

    def __post_init__(self) -> None:
        if not self.backend_pass:
            raise ConfigError("backend_pass", "required: the password of backend_user on guests")
        if self.backend == "static" and not self.static_hosts:
            raise ConfigError("static_hosts", "the static backend needs at least one host")
        if self.disk_diff and self.backend == "static":
            raise ConfigError("disk_diff", "the static backend has no guest disks to compare")
        if self.egress_policy == "fetch" and not self.egress_fetch_proxy:
            raise ConfigError(
                "egress_fetch_proxy",
                'required with egress_policy = "fetch": the proxy downloads go through',
            )
        if self.egress_dns_port == self.egress_sinkhole_port:
            raise ConfigError("egress_sinkhole_port", "must differ from egress_dns_port")
        if self.egress_tftp_port == self.egress_dns_port:
            raise ConfigError("egress_tftp_port", "must differ from egress_dns_port (both UDP)")
        if self.guest_initrd is not None and self.guest_kernel is None:
            raise ConfigError("guest_initrd", "only makes sense with guest_kernel")

    @property
    def egress_ca(self) -> tuple[Path, Path]:
        """The interception CA's certificate and key files."""
        return (
            self.egress_tls_ca_cert or self.state_dir / "egress-ca.pem",
            self.egress_tls_ca_key or self.state_dir / "egress-ca.key",
        )

    @property
    def tls(self) -> TlsFiles:
        """The node's TLS files."""
        return TlsFiles(ca=self.tls_ca, cert=self.tls_cert, key=self.tls_key)

    @property
    def snapshots(self) -> Path:
        """Where saved overlays go."""
        return self.snapshot_path or self.state_dir / "snapshots"

    @property
    def spool(self) -> Path:
        """The event spool's database."""
        return self.spool_path or self.state_dir / "spool.sqlite3"

    @property
    def advertised(self) -> str:
        """The address to register with the controller."""
        return self.advertise or self.listen
