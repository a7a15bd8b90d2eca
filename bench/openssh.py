"""Throwaway Debian servers on loopback for the benchmarks: OpenSSH's ``sshd`` with a root
password of the benchmark's choosing, and busybox ``telnetd``.

sshd checks passwords against /etc/shadow (``UsePAM no``). So that the machine's root
password is neither needed nor changed, sshd runs in a mount namespace of its own
(``unshare -m``: private propagation) where an overlay on /etc holds a throwaway shadow
file with only the login account's entry (root, or a throwaway user that exists only in
that overlay's passwd and group files, its home in the work directory). An overlay rather
than a bind mount of the file: tools that add users replace /etc/shadow by a rename,
which would unmask the real file. That needs root, as sshd itself does. Apart from what
a loopback benchmark needs (port, host key, root password login, no PAM, no DNS),
sshd keeps Debian's defaults: ``MaxStartups 10:30:100``, ``LoginGraceTime 120``,
``MaxAuthTries 6``, ``MaxSessions 10``.

    apt-get install openssh-server busybox-static
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

from bench.fleet import Processes

SSHD = "/usr/sbin/sshd"
# A throwaway account's ids: unused on Debian (system ids end at 999, users start at 1000).
THROWAWAY_ID = 4242
# sshd refuses to start without its privilege separation directory (Debian's service
# creates it at boot).
PRIVSEP_DIR = Path("/run/sshd")
READY_TIMEOUT = 30.0


def require(tool: str, package: str) -> str:
    """The path of a tool, or exit saying which Debian package has it."""
    path = shutil.which(tool)
    if path is None:
        raise SystemExit(f"{tool} not found: apt-get install {package}")
    return path


def _shadow_hash(password: str) -> str:
    """A SHA-512 crypt(3) hash of ``password``, as /etc/shadow holds it."""
    openssl = require("openssl", "openssl")
    result = subprocess.run(
        [openssl, "passwd", "-6", "-stdin"],
        input=password,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


def _add_account(etc: Path, user: str, home: Path) -> None:
    """``user`` in the overlay's passwd and group files (copies of the machine's)."""
    home.mkdir()
    os.chown(home, THROWAWAY_ID, THROWAWAY_ID)
    passwd = Path("/etc/passwd").read_text()
    entry = f"{user}:x:{THROWAWAY_ID}:{THROWAWAY_ID}:benchmark:{home}:/bin/sh\n"
    (etc / "passwd").write_text(passwd + entry)
    group = Path("/etc/group").read_text()
    (etc / "group").write_text(group + f"{user}:x:{THROWAWAY_ID}:\n")


def _prepare(workdir: Path, port: int, password: str, user: str) -> Path:
    """sshd_config, host key and the /etc overlay's upper layer in ``workdir``."""
    keygen = require("ssh-keygen", "openssh-client")
    workdir.mkdir(parents=True)
    PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    etc = workdir / "etc"
    (workdir / "overlay-work").mkdir()
    etc.mkdir()
    shadow = etc / "shadow"
    shadow.touch(mode=0o600)
    shadow.write_text(f"{user}:{_shadow_hash(password)}:19000:0:99999:7:::\n")
    if user != "root":
        _add_account(etc, user, workdir / "home")
    key = workdir / "ssh_host_ed25519_key"
    subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    config = workdir / "sshd_config"
    config.write_text(
        f"Port {port}\n"
        "ListenAddress 127.0.0.1\n"
        f"HostKey {key}\n"
        "PidFile none\n"
        "PermitRootLogin yes\n"
        "PasswordAuthentication yes\n"
        "KbdInteractiveAuthentication no\n"
        "PubkeyAuthentication no\n"
        "UsePAM no\n"
        "UseDNS no\n"
        "PrintMotd no\n"
        "PrintLastLog no\n"
        "Subsystem sftp internal-sftp\n"
    )
    return config


async def start_sshd(
    procs: Processes, workdir: Path, port: int, password: str, user: str = "root"
) -> int:
    """Start sshd on 127.0.0.1:``port`` where ``user`` (root, or a throwaway account made
    for it) logs in with ``password``; returns its pid (the listener, parent of one process
    per connection) once it answers. ``workdir``'s parents must be searchable by all when
    ``user`` is not root."""
    if os.geteuid() != 0:
        raise SystemExit("the OpenSSH baseline runs sshd, which needs root")
    require(SSHD, "openssh-server")
    unshare = require("unshare", "util-linux")
    config = await asyncio.to_thread(_prepare, workdir, port, password, user)
    overlay = f"lowerdir=/etc,upperdir={workdir / 'etc'},workdir={workdir / 'overlay-work'}"
    # unshare execs sh, which execs sshd: the pid is sshd's.
    script = f'mount -t overlay overlay -o "$1" /etc && exec {SSHD} -D -e -f "$2"'
    proc = await procs.start(
        f"sshd-{port}", unshare, "-m", "sh", "-c", script, "sh", overlay, str(config)
    )
    await until_banner(port, b"SSH-2.0-")
    return proc.pid


async def start_telnetd(procs: Processes, port: int) -> int:
    """Start busybox telnetd on 127.0.0.1:``port`` (``/bin/login`` per connection, as
    inetd's telnetd would run); returns its pid once it answers."""
    busybox = require("busybox", "busybox-static")
    proc = await procs.start(
        f"telnetd-{port}", busybox, "telnetd", "-F", "-b", f"127.0.0.1:{port}", "-l", "/bin/login"
    )
    await until_banner(port, b"")
    return proc.pid


async def until_banner(port: int, prefix: bytes, within: float = READY_TIMEOUT) -> None:
    """Wait until 127.0.0.1:``port`` accepts and its first bytes start with ``prefix``."""
    try:
        await asyncio.wait_for(_banner(port, prefix), within)
    except TimeoutError:
        raise SystemExit(f"nothing answered on port {port} within {within:.0f}s") from None


async def _banner(port: int, prefix: bytes) -> None:
    """Poll 127.0.0.1:``port`` until its first bytes start with ``prefix``."""
    while True:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        try:
            first: bytes | None = await asyncio.wait_for(reader.read(len(prefix) or 1), 5)
        except TimeoutError:
            first = None  # accepted but silent: a forwarder (QEMU's) whose target is not up
        finally:
            writer.close()
        if first is not None and first.startswith(prefix):
            return
        await asyncio.sleep(0.1)
