"""A real Debian 12 server as the guest's root file system, installed by mmdebstrap.

mmdebstrap installs Debian's own packages with apt from the host's apt sources (so a
mirror or proxy the host is configured for is used), leaving dpkg's and apt's
databases as on any installed system. The result is then dressed as a server: the
persona's host name and users, OpenSSH with password logins for the backend account,
systemd-networkd for DHCP, Telnet on port 23 through socket activation (the sensors'
Telnet sessions land there), and the units a VM without a clock source or a package
mirror does not want masked, so it boots to its SSH banner quickly even under TCG.
"""

from __future__ import annotations

import secrets
import shutil
import time
from pathlib import Path

from . import _logins, _rootfs
from ._host import run
from ._spec import GuestImageSpec

#: Data files copied over the installed system (``*.in`` files get ``$name`` substitution).
DATA_DIR = Path(__file__).resolve().parent / "debian"
SUITE = "bookworm"

#: Installed beyond Debian's required packages (minbase): what a small cloud server
#: runs and what attackers' scripts reach for first.
PACKAGES: tuple[str, ...] = (
    "systemd-sysv",
    "udev",  # networkd configures a link only once udev has seen it
    "kmod",
    "libpam-systemd",
    "dbus",
    "openssh-server",
    "inetutils-telnetd",
    "procps",
    "iproute2",
    "iputils-ping",
    "netbase",
    # The resolver networkd's DHCP lease names: without it nothing writes resolv.conf and
    # the guest resolves no name at all (the node's DNS, and so egress, never hears).
    "systemd-resolved",
    "sudo",
    "cron",
    "less",
    "nano",
    "vim-tiny",
    "wget",
    "curl",
    "ca-certificates",
    "bash-completion",
    "locales",
    "tzdata",
    # What the kernel package (installed from the builder's own .debs) depends on.
    "linux-base",
    "initramfs-tools",
)

# Units that would only slow the boot or fail in a guest with no route out: timers
# that fetch from mirrors or scrub disks, and waiting for the network to come up.
# inetd and syslogd come with inetutils-telnetd; telnet.socket replaces the former,
# the journal the latter (as on a stock Debian 12).
_MASKED = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "systemd-networkd-wait-online.service",
    "inetutils-inetd.service",
    "inetutils-syslogd.service",
)
_BACKUP_SCRIPT = "usr/local/sbin/backup.sh"
_ENABLED = (
    "systemd-networkd.service",
    "systemd-resolved.service",
    "telnet.socket",
    "ssh.service",
    "cron.service",
)
# Left out of the image: documentation and translations. apt's package lists stay (about
# 40 MB, as of the build): `apt install` in the guest finds its package and then fails to
# fetch it, like any server's without a route out, rather than not knowing it.
_DPKG_EXCLUDES = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
)


LOCAL_CA = "usr/local/share/ca-certificates/internal-root-ca.crt"
"""The egress interception CA's certificate, as a local CA (update-ca-certificates)."""


def _host_sources() -> list[str]:
    """The host's apt source files, passed to mmdebstrap in place of a mirror URL."""
    apt = Path("/etc/apt")
    files = [apt / "sources.list"] if (apt / "sources.list").is_file() else []
    files += sorted((apt / "sources.list.d").glob("*.list"))
    files += sorted((apt / "sources.list.d").glob("*.sources"))
    return [
        str(f) for f in files if any(_is_source_line(line) for line in f.read_text().splitlines())
    ]


def _is_source_line(line: str) -> bool:
    """Whether a line of a sources file names a repository (one-line or deb822 style)."""
    text = line.strip()
    return text.startswith(("deb ", "URIs:"))


def install(root: Path, spec: GuestImageSpec, kernel_release: str, kernel_debs: list[Path]) -> None:
    """Install Debian into ``root`` (which must not exist yet) and dress it as the persona.

    ``kernel_debs`` are the kernel packages the guest boots (``kernel_release``).
    """
    sources = _host_sources() or ["http://deb.debian.org/debian"]
    argv: list[str | Path] = [
        "mmdebstrap",
        "--mode=root",
        "--variant=minbase",
        "--format=directory",
        f"--include={','.join(PACKAGES)}",
        # No recommends: a cloud image's lean install, and no stray daemons.
        "--aptopt=APT::Install-Recommends false",
        "--skip=cleanup/apt/lists",
    ]
    argv += [f"--dpkgopt={opt}" for opt in _DPKG_EXCLUDES]
    run([*argv, SUITE, root, *sources], timeout=1800.0)
    _install_kernel(root, kernel_debs)
    _dress(root, spec)
    if spec.trust_ca:
        _trust(root, spec.trust_ca)
    # The administrator's logins of the last two weeks (`last`, sshd's "Last login").
    admins = sorted({spec.backend_user, _rootfs.admin_user(spec)})
    _logins.seed(root, admins, int(time.time()), kernel_release, spec.hostname)


def _install_kernel(root: Path, debs: list[Path]) -> None:
    """Install the very kernel .debs the guest boots from, as on any installed server.

    dpkg then lists the running kernel's package, ``/usr/lib/modules`` holds all its
    modules and ``/boot`` its initrd; from mmdebstrap's mirror it could be a newer
    release than the one booted.
    """
    staged = root / "var/cache/apt/archives"
    for deb in debs:
        shutil.copy2(deb, staged / deb.name)
    try:
        _chroot(root, "dpkg", "--install", *(f"/var/cache/apt/archives/{d.name}" for d in debs))
    finally:
        for deb in debs:
            (staged / deb.name).unlink(missing_ok=True)


def _trust(root: Path, pem: str) -> None:
    """Add the egress interception CA the way an administrator adds a local CA."""
    local = root / LOCAL_CA
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_text(pem.strip() + "\n")
    local.chmod(0o644)
    _chroot(root, "update-ca-certificates", "--fresh")


def _chroot(root: Path, *argv: str, stdin: str | None = None) -> str:
    """Run a program of the installed system inside it."""
    return run(["chroot", root, *argv], stdin=stdin, timeout=300.0)


def _dress(root: Path, spec: GuestImageSpec) -> None:
    """Host name, users, passwords, services and set dressing of the persona."""
    admin = _rootfs.admin_user(spec)
    values = {
        "hostname": spec.hostname,
        "domain": spec.domain,
        "admin_user": admin,
        "permit_root_login": "yes" if spec.backend_user == "root" else "prohibit-password",
    }
    _rootfs.copy_data_tree(root, values, DATA_DIR)
    # The nightly backup script cron.d/backup runs: the busybox guest's own.
    shutil.copy2(_rootfs.DATA_DIR / _BACKUP_SCRIPT, root / _BACKUP_SCRIPT)
    (root / _BACKUP_SCRIPT).chmod(0o755)
    (root / "etc/hostname").write_text(spec.hostname + "\n")
    (root / "etc/hosts").write_text(
        f"127.0.0.1\tlocalhost\n127.0.1.1\t{spec.hostname}.{spec.domain}\t{spec.hostname}\n\n"
        "::1\t\tlocalhost ip6-localhost ip6-loopback\nff02::1\t\tip6-allnodes\n"
        "ff02::2\t\tip6-allrouters\n"
    )
    # One identity per image; an empty machine-id would run first-boot units on
    # every guest boot, which costs seconds under TCG.
    (root / "etc/machine-id").write_text(secrets.token_hex(16) + "\n")

    humans = [u for u in (spec.backend_user, *spec.extra_users) if u != "root"]
    for i, name in enumerate(humans):
        groups = ["--groups", "sudo,adm"] if i == 0 else []
        _chroot(root, "useradd", "--create-home", "--shell", "/bin/bash", *groups, name)
    passwords = {a: secrets.token_urlsafe(24) for a in ("root", *humans)}
    passwords[spec.backend_user] = spec.backend_pass
    names = list(passwords)
    hashes = _rootfs.hashes([passwords[n] for n in names])
    _chroot(
        root,
        "chpasswd",
        "--encrypted",
        stdin="".join(f"{n}:{h}\n" for n, h in zip(names, hashes, strict=True)),
    )
    history = (root / "root/.bash_history").read_text()
    for name in humans:
        home = root / "home" / name
        (home / ".bash_history").write_text(history.replace("apt ", "sudo apt "))
        _chroot(root, "chown", "-R", f"{name}:{name}", f"/home/{name}")
    (root / "root/.bash_history").chmod(0o600)

    _chroot(root, "systemctl", "mask", *_MASKED)
    _chroot(root, "systemctl", "enable", *_ENABLED)
    # The image is built once and copied for every guest: host keys stay (as after a
    # provider's image build); logs of the installation are kept, as on a real box.
    # resolv.conf points at resolved's stub (as systemd-resolved's installation makes it),
    # not at anything of the build; the persona's domain is searched, as before.
    (root / "etc/resolv.conf").unlink(missing_ok=True)
    (root / "etc/resolv.conf").symlink_to("../run/systemd/resolve/stub-resolv.conf")
    dropin = root / "etc/systemd/resolved.conf.d/domain.conf"
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text(f"[Resolve]\nDomains={spec.domain}\n")
