"""Debian's own OpenSSH server on loopback, configured as the package ships it.

The stealth tests compare the sensor with it probe for probe. It runs
``/usr/sbin/sshd -D`` with Debian's pristine ``sshd_config`` (the package's copy in
/usr/share/openssh, without its ``Include`` of the machine's drop-ins) and host keys of
its own in a temporary directory. It needs root (privilege separation, PAM) and the
openssh-server package; a test that cannot have either fails in CI and skips elsewhere.

One account can log in with a password (:data:`USER`, :data:`PASSWORD`), so what sshd
says after a login can be probed too. The machine's account files are left alone: sshd
runs in a mount namespace of its own (``unshare -m``) where copies of /etc/passwd and
/etc/shadow with that account added are mounted over the originals; PAM reads them there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from tests.conftest import free_port, require_tool, unmet

PRISTINE_CONFIG = Path("/usr/share/openssh/sshd_config")
KEY_TYPES = ("rsa", "ecdsa", "ed25519")
USER = "visitor"
PASSWORD = "visitor-secret"
# Mount the account files, then become sshd (the same process: ``stop`` ends sshd).
IN_NAMESPACE = (
    'mount --bind "$1" /etc/passwd && mount --bind "$2" /etc/shadow && shift 2 && exec "$@"'
)


async def package_version(package: str) -> str:
    """The installed version of a Debian package (e.g. ``1:9.2p1-2+deb12u10``)."""
    process = await asyncio.create_subprocess_exec(
        "dpkg-query", "-W", "-f=${Version}", package,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    out, _ = await process.communicate()
    if process.returncode != 0 or not out:
        unmet(f"{package} is not installed (scripts/install-system-deps.sh installs it)")
    return out.decode()


async def debian_banner() -> str:
    """The identification string Debian's sshd sends, from the installed package version."""
    version = await package_version("openssh-server")
    upstream, _, debian = version.partition(":")[2].partition("-")
    return f"SSH-2.0-OpenSSH_{upstream} Debian-{debian}"


class DebianSshd:
    """``/usr/sbin/sshd`` on 127.0.0.1; ``start`` then ``stop``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = 0
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> int:
        """Generate host keys, write the config, start sshd and wait for its banner."""
        sshd = require_tool("sshd", "openssh-server")
        keygen = require_tool("ssh-keygen", "openssh-client")
        if os.geteuid() != 0:
            unmet("Debian's sshd needs root here (privilege separation and PAM)")
        if not PRISTINE_CONFIG.exists():
            unmet(f"{PRISTINE_CONFIG} missing: install openssh-server")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.directory.mkdir(parents=True, exist_ok=True)
        lines = [
            line
            for line in PRISTINE_CONFIG.read_text().splitlines()
            if not line.startswith("Include")
        ]
        for key_type in KEY_TYPES:
            key = self.directory / f"ssh_host_{key_type}_key"
            if not key.exists():
                keygen_process = await asyncio.create_subprocess_exec(
                    keygen,
                    "-q",
                    "-N",
                    "",
                    "-t",
                    key_type,
                    "-f",
                    str(key),
                    stdout=asyncio.subprocess.DEVNULL,
                )
                await keygen_process.wait()
            lines.append(f"HostKey {key}")
        self.port = free_port()
        lines += [
            f"ListenAddress 127.0.0.1:{self.port}",
            f"PidFile {self.directory / 'sshd.pid'}",
        ]
        config = self.directory / "sshd_config"
        config.write_text("\n".join(lines) + "\n")
        passwd, shadow = await self._account_files()
        unshare = require_tool("unshare", "util-linux")
        self._process = await asyncio.create_subprocess_exec(
            unshare, "--mount", "--propagation", "private", "sh", "-c", IN_NAMESPACE, "sh",
            str(passwd), str(shadow), sshd, "-D", "-e", "-f", str(config),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        async with asyncio.timeout(20):
            while True:
                with contextlib.suppress(OSError):
                    _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                    writer.close()
                    break
                await asyncio.sleep(0.05)
        return self.port

    async def _account_files(self) -> tuple[Path, Path]:
        """A copy of /etc/passwd with :data:`USER` added (home: here), and a shadow file
        with its password."""
        openssl = require_tool("openssl", "openssl")
        process = await asyncio.create_subprocess_exec(
            openssl, "passwd", "-6", "-stdin", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        hashed, _ = await process.communicate(PASSWORD.encode())
        home = self.directory / "home"
        home.mkdir(exist_ok=True)
        passwd, shadow = self.directory / "passwd", self.directory / "shadow"
        passwd.write_text(
            Path("/etc/passwd").read_text() + f"{USER}:x:4242:4242:Visitor:{home}:/bin/sh\n"
        )
        # Only this account's entry: the machine's password hashes are not copied anywhere.
        shadow.write_text(f"{USER}:{hashed.decode().strip()}:19000:0:99999:7:::\n")
        shadow.chmod(0o600)
        return passwd, shadow

    def host_keys(self) -> list[Path]:
        """The public halves of sshd's host keys."""
        return [self.directory / f"ssh_host_{key_type}_key.pub" for key_type in KEY_TYPES]

    async def stop(self) -> None:
        """Stop sshd (its per-connection children end with their connections)."""
        if self._process is not None and self._process.returncode is None:
            self._process.terminate()
            await self._process.wait()
