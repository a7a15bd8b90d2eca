"""Assemble the guest's root file system tree in a staging directory."""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import stat
import string
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from ._errors import ImageBuildError
from ._host import run
from ._spec import GuestImageSpec

#: Data files copied into the guest (``*.in`` files get ``$name`` substitution).
DATA_DIR = Path(__file__).resolve().parent / "rootfs"

# A merged-/usr layout, as on any Debian 12 install.
_USR_MERGE = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}
# fmt: off
_DIRS = {
    "boot": 0o755, "dev": 0o755, "etc": 0o755, "home": 0o755, "media": 0o755,
    "mnt": 0o755, "opt": 0o755, "proc": 0o555, "root": 0o700, "run": 0o755,
    "srv": 0o755, "sys": 0o555, "tmp": 0o1777, "usr/bin": 0o755, "usr/sbin": 0o755,
    "usr/lib": 0o755, "usr/lib64": 0o755, "usr/local/bin": 0o755, "usr/share": 0o755,
    "var/backups": 0o755, "var/cache": 0o755, "var/lib": 0o755, "var/log": 0o755,
    "var/mail": 0o2775, "var/spool/cron/crontabs": 0o1730, "var/tmp": 0o1777,
    "etc/dropbear": 0o755,
}
# fmt: on
_SYMLINKS = {
    "etc/os-release": "../usr/lib/os-release",
    "etc/mtab": "../proc/self/mounts",
    "var/run": "../run",
    "var/lock": "../run/lock",
}
# Paths whose owner or mode matters for login programs, whatever the data files say.
_MODES = {"etc/shadow": 0o640, "etc/gshadow": 0o640, "root": 0o700}
_SHADOW_GID = 42
_LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu")

# Service accounts of a Debian 12 server (name, uid, gid, gecos, home, shell).
_SYSTEM_USERS = (
    ("daemon", 1, 1, "daemon", "/usr/sbin", "/usr/sbin/nologin"),
    ("bin", 2, 2, "bin", "/bin", "/usr/sbin/nologin"),
    ("sys", 3, 3, "sys", "/dev", "/usr/sbin/nologin"),
    ("sync", 4, 65534, "sync", "/bin", "/bin/sync"),
    ("games", 5, 60, "games", "/usr/games", "/usr/sbin/nologin"),
    ("man", 6, 12, "man", "/var/cache/man", "/usr/sbin/nologin"),
    ("lp", 7, 7, "lp", "/var/spool/lpd", "/usr/sbin/nologin"),
    ("mail", 8, 8, "mail", "/var/mail", "/usr/sbin/nologin"),
    ("news", 9, 9, "news", "/var/spool/news", "/usr/sbin/nologin"),
    ("uucp", 10, 10, "uucp", "/var/spool/uucp", "/usr/sbin/nologin"),
    ("proxy", 13, 13, "proxy", "/bin", "/usr/sbin/nologin"),
    ("www-data", 33, 33, "www-data", "/var/www", "/usr/sbin/nologin"),
    ("backup", 34, 34, "backup", "/var/backups", "/usr/sbin/nologin"),
    ("list", 38, 38, "Mailing List Manager", "/var/list", "/usr/sbin/nologin"),
    ("irc", 39, 39, "ircd", "/run/ircd", "/usr/sbin/nologin"),
    ("_apt", 42, 65534, "", "/nonexistent", "/usr/sbin/nologin"),
    ("nobody", 65534, 65534, "nobody", "/nonexistent", "/usr/sbin/nologin"),
    ("messagebus", 100, 107, "", "/nonexistent", "/usr/sbin/nologin"),
    ("sshd", 101, 65534, "", "/run/sshd", "/usr/sbin/nologin"),
)
# fmt: off
_SYSTEM_GROUPS = (
    ("daemon", 1), ("bin", 2), ("sys", 3), ("adm", 4), ("tty", 5), ("disk", 6),
    ("lp", 7), ("mail", 8), ("news", 9), ("uucp", 10), ("man", 12), ("proxy", 13),
    ("kmem", 15), ("dialout", 20), ("cdrom", 24), ("sudo", 27), ("audio", 29),
    ("dip", 30), ("www-data", 33), ("backup", 34), ("operator", 37), ("list", 38),
    ("irc", 39), ("src", 40), ("shadow", 42), ("utmp", 43), ("video", 44),
    ("sasl", 45), ("plugdev", 46), ("staff", 50), ("games", 60), ("users", 100),
    ("crontab", 101), ("messagebus", 107), ("nogroup", 65534),
)
# fmt: on
_LOGIN_SHELL = "/bin/bash"
# The TERM values clients commonly send; the full terminfo database is 1,600 files.
_TERMINFO = (
    "d/dumb",
    "l/linux",
    "s/screen",
    "s/screen-256color",
    "v/vt100",
    "v/vt220",
    "x/xterm",
    "x/xterm-256color",
    "x/xterm-color",
)


@dataclass(frozen=True)
class _Account:
    """A login account in the guest."""

    name: str
    uid: int
    home: str
    password: str | None  # None: a random password nobody knows


def make_layout(root: Path) -> None:
    """Create the directory skeleton and the merged-/usr symlinks."""
    for rel, mode in sorted(_DIRS.items()):
        path = root / rel
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(mode)
    for link, target in _USR_MERGE.items():
        (root / link).symlink_to(target)


def copy_data_tree(root: Path, values: dict[str, str], source: Path = DATA_DIR) -> None:
    """Copy ``source`` into root; ``*.in`` files are Templates filled from ``values``."""
    for src in sorted(source.rglob("*")):
        rel = src.relative_to(source)
        if "__pycache__" in rel.parts:
            continue
        dest = root / rel
        if src.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        data = src.read_bytes()
        if src.suffix == ".in":
            dest = dest.with_suffix("")
            data = string.Template(data.decode()).substitute(values).encode()
        dest.write_bytes(data)
        # Scripts are recognised by their #! line rather than by the file mode, which
        # packaging (sdists, wheels, some checkouts) does not reliably preserve.
        dest.chmod(0o755 if data.startswith(b"#!") else 0o644)


def install_busybox(root: Path, busybox: Path) -> None:
    """Install busybox and a symlink for each of its applets."""
    target = root / "usr/bin/busybox"
    shutil.copy2(busybox, target)
    target.chmod(0o755)
    # The package's busybox is static, so the host can ask it for its applet list.
    for line in run([busybox, "--list-full"]).split():
        first, _, rest = line.partition("/")
        if not rest:
            continue  # "linuxrc" is for initrd-style boots, not a real system
        rel = f"{_USR_MERGE.get(first, first)}/{rest}"
        link = root / rel
        if link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/usr/bin/busybox")


def _needed(binary: Path) -> tuple[list[str], str | None]:
    """Return (DT_NEEDED sonames, ELF interpreter) of a binary."""
    needed = [
        line.split("[", 1)[1].split("]", 1)[0]
        for line in run(["readelf", "-d", "-W", binary]).splitlines()
        if "(NEEDED)" in line
    ]
    interp = None
    for line in run(["readelf", "-l", "-W", binary]).splitlines():
        if "program interpreter:" in line:
            interp = line.split("interpreter:", 1)[1].strip(" ]")
    return needed, interp


def _find_lib(soname: str, pkg_dirs: list[Path]) -> Path:
    """Find a library in the unpacked packages, resolving symlinks inside them."""
    for pkg in pkg_dirs:
        for libdir in _LIB_DIRS:
            path = pkg / libdir / soname
            for _ in range(8):  # bounded: a symlink loop must not hang the build
                if not path.is_symlink():
                    break
                target = str(path.readlink())
                path = pkg / target.lstrip("/") if target.startswith("/") else path.parent / target
            if path.is_file():
                return path
    raise ImageBuildError(f"shared library {soname} not found in the unpacked packages")


def install_dynamic(root: Path, binaries: dict[Path, str], pkg_dirs: list[Path]) -> None:
    """Copy binaries (source -> path in guest) plus the shared libraries they need."""
    queue: list[Path] = []
    for src, rel in binaries.items():
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)
        dest.chmod(0o755)
        queue.append(src)
    done: set[str] = set()
    libdir = root / "usr/lib/x86_64-linux-gnu"
    libdir.mkdir(parents=True, exist_ok=True)
    while queue and len(done) < 64:
        needed, interp = _needed(queue.pop())
        if interp is not None and interp not in done:
            done.add(interp)
            name = Path(interp).name
            shutil.copy2(_find_lib(name, pkg_dirs), libdir / name)
            (root / "usr/lib64" / name).symlink_to(f"../lib/x86_64-linux-gnu/{name}")
        for soname in needed:
            if soname in done or soname == Path(interp or "").name:
                continue
            done.add(soname)
            lib = _find_lib(soname, pkg_dirs)
            shutil.copy2(lib, libdir / soname)
            queue.append(lib)


def install_terminfo(root: Path, ncurses_base: Path) -> None:
    """Copy the terminal descriptions for the usual TERM values."""
    for entry in _TERMINFO:
        src = ncurses_base / "lib/terminfo" / entry
        if src.is_file():
            dest = root / "usr/lib/terminfo" / entry
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest)


def hashes(passwords: list[str]) -> list[str]:
    """SHA-512 crypt hashes (random salts) via openssl; passwords go over stdin."""
    out = run(["openssl", "passwd", "-6", "-stdin"], stdin="".join(p + "\n" for p in passwords))
    crypted = out.split()
    if len(crypted) != len(passwords) or not all(h.startswith("$6$") for h in crypted):
        raise ImageBuildError("openssl passwd -6 returned unexpected output")
    return crypted


def _fake_authorized_key(comment: str) -> str:
    """An ed25519 public key line whose private half nobody has (set dressing)."""

    def sshstr(b: bytes) -> bytes:
        return struct.pack(">I", len(b)) + b

    blob = sshstr(b"ssh-ed25519") + sshstr(secrets.token_bytes(32))
    return f"ssh-ed25519 {base64.b64encode(blob).decode()} {comment}\n"


def admin_user(spec: GuestImageSpec) -> str:
    """The user the set-dressing logs show administering the box (uid 1000)."""
    if spec.backend_user != "root":
        return spec.backend_user
    return spec.extra_users[0] if spec.extra_users else "root"


def write_accounts(root: Path, spec: GuestImageSpec) -> None:
    """Write passwd/group/shadow/gshadow and the ordinary users' home directories."""
    humans: list[_Account] = []
    uid = 1000
    if spec.backend_user != "root":
        humans.append(
            _Account(spec.backend_user, uid, f"/home/{spec.backend_user}", spec.backend_pass)
        )
        uid += 1
    for name in spec.extra_users:
        humans.append(_Account(name, uid, f"/home/{name}", None))
        uid += 1
    root_pw = spec.backend_pass if spec.backend_user == "root" else None
    accounts = [_Account("root", 0, "/root", root_pw), *humans]
    crypted = hashes([a.password or secrets.token_urlsafe(24) for a in accounts])
    today = int(time.time() // 86400)

    passwd = ["root:x:0:0:root:/root:" + _LOGIN_SHELL]
    passwd += [f"{n}:x:{u}:{g}:{c}:{h}:{s}" for n, u, g, c, h, s in _SYSTEM_USERS]
    passwd += [f"{a.name}:x:{a.uid}:{a.uid}:{a.name},,,:{a.home}:{_LOGIN_SHELL}" for a in humans]
    shadow = [f"root:{crypted[0]}:{today}:0:99999:7:::"]
    shadow += [f"{u[0]}:*:{today}:0:99999:7:::" for u in _SYSTEM_USERS]
    pairs = zip(humans, crypted[1:], strict=True)
    shadow += [f"{a.name}:{h}:{today}:0:99999:7:::" for a, h in pairs]
    admins = ",".join(a.name for a in humans[:1])
    groups = (
        [("root", 0, "")]
        + [(g, gid, admins if g in ("adm", "sudo") else "") for g, gid in _SYSTEM_GROUPS]
        + [(a.name, a.uid, "") for a in humans]
    )
    group = [f"{g}:x:{gid}:{members}" for g, gid, members in groups]
    gshadow = [f"{g}:*::{members}" for g, _, members in groups]

    etc = root / "etc"
    for name, lines in (
        ("passwd", passwd),
        ("shadow", shadow),
        ("group", group),
        ("gshadow", gshadow),
    ):
        (etc / name).write_text("\n".join(lines) + "\n")
    for name in ("shadow", "gshadow"):
        os.chown(etc / name, 0, _SHADOW_GID)
        (etc / name).chmod(_MODES[f"etc/{name}"])

    for acct in humans:
        home = root / acct.home.lstrip("/")
        shutil.copytree(root / "etc/skel", home, dirs_exist_ok=True)
        ssh = home / ".ssh"
        ssh.mkdir(mode=0o700, exist_ok=True)
        (ssh / "authorized_keys").write_text(_fake_authorized_key(f"{acct.name}@workstation"))
        (ssh / "authorized_keys").chmod(0o600)
        (home / ".bash_history").write_text("ls -la\nsudo -i\ndf -h\nexit\n")
        for dirpath, _, files in os.walk(home):
            os.chown(dirpath, acct.uid, acct.uid)
            for f in files:
                os.chown(Path(dirpath) / f, acct.uid, acct.uid)
        home.chmod(0o750)


TRUST_BUNDLE = "etc/ssl/certs/ca-certificates.crt"
"""Where Debian's ca-certificates keeps the bundle, and where TLS clients look."""


def trust_bundle(root: Path, pem: str) -> None:
    """Make the guest's CA bundle hold ``pem`` (busybox's wget checks nothing, but a
    client an attacker brings reads the usual bundle)."""
    bundle = root / TRUST_BUNDLE
    bundle.parent.mkdir(parents=True, exist_ok=True)
    bundle.write_text(pem.strip() + "\n")
    bundle.chmod(0o644)


def finish(root: Path) -> None:
    """Add the fixed symlinks, log files and modes the data files cannot express."""
    for link, target in _SYMLINKS.items():
        path = root / link
        if path.exists() or path.is_symlink():
            path.unlink()
        path.symlink_to(target)
    for name in ("wtmp", "btmp", "lastlog", "messages"):
        (root / "var/log" / name).touch()
    (root / "root").chmod(_MODES["root"])
    crontab = root / "var/spool/cron/crontabs/root"
    if crontab.exists():
        crontab.chmod(stat.S_IRUSR | stat.S_IWUSR)
