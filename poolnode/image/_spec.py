"""What to build (:class:`GuestImageSpec`) and what was built (:class:`GuestImage`)."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from ._errors import ImageBuildError

# A conservative subset of what useradd accepts: short, lower-case, no ':' or spaces,
# so the names can go into /etc/passwd and shell scripts unquoted.
_USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
# One DNS label (RFC 1123), which is also what busybox hostname and dnsmasq accept.
_LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")

#: Kernel command line the image is made for: the serial console carries boot logs
#: to libvirt's console log; the initramfs finds the root disk itself.
DEFAULT_CMDLINE = "console=ttyS0,115200 panic=10"


def _check_certificate(pem: str) -> None:
    """Refuse anything but one PEM CA certificate (a private key above all)."""
    if "PRIVATE KEY" in pem:
        raise ImageBuildError("trust_ca holds a private key: give the CA's certificate only")
    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except (ValueError, x509.ExtensionNotFound):
        raise ImageBuildError("trust_ca is not a PEM CA certificate") from None
    if not is_ca:
        raise ImageBuildError("trust_ca is a leaf certificate, not a CA's")


class Distro(enum.StrEnum):
    """What the guest's root file system is made of."""

    BUSYBOX = "busybox"
    """busybox, dropbear and bash from single .debs: tiny, boots fastest (tests' default)."""

    DEBIAN = "debian"
    """A real Debian 12 server installed by mmdebstrap: systemd, OpenSSH, apt, dpkg."""


#: Root file system size of a Debian guest: a small cloud VM's disk (sparse in qcow2).
DEBIAN_DISK_MIB = 10240


@dataclass(frozen=True)
class GuestImageSpec:
    """Everything that decides the content of a guest image.

    Two specs that compare equal (apart from ``out_dir`` and ``cache_dir``) build the
    same image, so a rebuild is skipped when the stamp of an existing image matches.
    """

    out_dir: Path
    """Directory that receives ``image-<fingerprint>/`` subdirectories, the ``current``
    symlink to the newest one, and (by default) the package cache."""

    distro: Distro = Distro.BUSYBOX
    """busybox (tiny, for fast tests) or debian (a real Debian 12 server)."""

    backend_user: str = "root"
    """Account the pool hands to sensors for logging into the guest."""

    # Cowrie's default backend password; real deployments set their own.
    backend_pass: str = "root"  # noqa: S105
    """Password of ``backend_user``; stored in the guest only as a SHA-512 crypt hash."""

    hostname: str = "srv04"
    """Guest host name, shown in the shell prompt, the telnet login prompt and logs."""

    domain: str = "localdomain"
    """DNS domain used for the guest's /etc/hosts entry."""

    extra_users: tuple[str, ...] = ("deploy",)
    """Further ordinary users (locked passwords) with home directories, for realism."""

    disk_size_mib: int = 2048
    """Size of the ext4 root file system as the guest sees it. Unused space costs
    nothing: the qcow2 base and overlays store only written clusters."""

    kernel_package: str = "linux-image-amd64"
    """Debian package (usually the meta package) that provides the guest kernel."""

    cache_dir: Path | None = None
    """Where downloaded ``.deb`` files are kept; ``out_dir / "cache"`` when None."""

    trust_ca: str = ""
    """PEM certificate of the pool node's egress interception CA, added to the guest's
    trust store so the leaves the node presents for guests' HTTPS are accepted ("" none).
    A certificate only: the CA's key never goes into an image."""

    modules: tuple[str, ...] = ("virtio_pci", "virtio_blk", "virtio_net", "ext4")
    """Kernel modules the initramfs loads (with their dependencies) before mounting
    the root disk."""

    def __post_init__(self) -> None:
        """Refuse values that would corrupt /etc files or the boot scripts."""
        for name in (self.backend_user, *self.extra_users):
            if not _USER_RE.fullmatch(name):
                raise ImageBuildError(f"invalid user name {name!r}")
        if self.backend_user in self.extra_users:
            raise ImageBuildError(f"backend_user {self.backend_user!r} is also in extra_users")
        if not _LABEL_RE.fullmatch(self.hostname):
            raise ImageBuildError(f"invalid hostname {self.hostname!r}")
        if not all(_LABEL_RE.fullmatch(p) for p in self.domain.split(".")):
            raise ImageBuildError(f"invalid domain {self.domain!r}")
        if not self.backend_pass or any(c in self.backend_pass for c in "\n\r\0"):
            raise ImageBuildError("backend_pass must be non-empty and on one line")
        if self.disk_size_mib < 64:
            raise ImageBuildError("disk_size_mib must be at least 64")
        if self.distro is Distro.DEBIAN and self.disk_size_mib < 1024:
            raise ImageBuildError("a debian image needs disk_size_mib of at least 1024")
        if self.trust_ca:
            _check_certificate(self.trust_ca)

    @property
    def package_cache(self) -> Path:
        """Directory holding downloaded packages."""
        return self.cache_dir if self.cache_dir is not None else self.out_dir / "cache"


@dataclass(frozen=True)
class GuestImage:
    """A built guest image: read-only files that per-guest overlays are based on."""

    directory: Path
    """The ``image-<fingerprint>`` directory holding the files below."""

    disk: Path
    """Read-only base qcow2 with the ext4 root file system (guests use overlays)."""

    kernel: Path
    """The guest kernel (vmlinuz), for direct kernel boot."""

    initrd: Path
    """Busybox initramfs (gzip'd newc cpio) that mounts /dev/vda as root (both distros)."""

    cmdline: str
    """Kernel command line to boot with."""

    kernel_version: str
    """Kernel release (``uname -r`` inside the guest)."""

    fingerprint: str
    """Digest of spec, package versions and builder data; names ``directory``."""
